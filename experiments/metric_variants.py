"""metric_variants.py -- how the run's quality number (sid_flow.py, section 14) was chosen: alternatives for its
features (the teacher given the prompt or the empty prompt, the noise level t, how many of the reference's principal
directions) and for its distance (KID's unbiased squared MMD, or a Frechet distance), each judged as the metric study
judges the number: by its Spearman correlation with the classifier's FD to the reference over all rows, on each of the
study's evaluation draws.

    python experiments/digits.py --metric-study     # first: out/digits/metric-study.json, the teacher, the students
    python experiments/metric_variants.py           # then: about 8 minutes on 2 CPU cores
    python experiments/metric_variants.py out/digits 100    # the same on 8 other draws (seeds 100, 104, ...)

Every draw is drawn again as the study drew it (digits.run_numbers at sf.Quality's seeds 0, 4, 8, ...), and the run's
own variant must reproduce the study's numbers: a check of this file's features against sid_flow.py's.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # sid_flow.py
from digits import (  # noqa: E402  experiments/digits.py
    DRAWS,
    DigitsBench,
    benchmark_students,
    frechet_distance,
    interval_row,
    run_numbers,
    spearman,
)

import sid_flow as sf  # noqa: E402

# (the teacher's conditioning, t, principal directions (0: every dimension, standardized), distance)
RUN = ("empty", sf.QUALITY_T, sf.QUALITY_DIMS, "FD")
VARIANTS = [
    ("prompt", 0.5, 0, "MMD"),  # an earlier number (then on 256 samples): the prompt's states, t = 0.5
    ("prompt", 0.3, 0, "MMD"),
    ("prompt", 0.3, 8, "MMD"),
    ("prompt", 0.3, 8, "FD"),
    ("empty", 0.3, 0, "MMD"),
    ("empty", 0.3, 4, "MMD"),
    ("empty", 0.3, 6, "MMD"),
    ("empty", 0.3, 8, "MMD"),
    ("empty", 0.3, 12, "MMD"),
    ("empty", 0.2, 8, "MMD"),
    ("empty", 0.4, 8, "MMD"),
    ("empty", 0.3, 4, "FD"),
    ("empty", 0.3, 6, "FD"),
    RUN,
    ("empty", 0.3, 12, "FD"),
    ("empty", 0.2, 8, "FD"),
    ("empty", 0.4, 8, "FD"),
]


def kernel_distance(f, g):
    """KID's unbiased squared MMD between f and g (n, d), cubic kernel k(a, b) = (a.b / d + 1)^3; the sets are paired
    row for row (sample i of each from the same noise), so every mean skips the pairs i = i."""

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    def off_diagonal(K):  # the mean over i != j
        return (K.sum() - K.diagonal().sum()) / (len(K) * (len(K) - 1))

    return (off_diagonal(k(f, f)) + off_diagonal(k(g, g)) - 2 * off_diagonal(k(f, g))).item()


def features(quality, x, conditioning, t):
    """The teacher's grid-averaged last hidden states of x noised to t (the draw's noise, as sf.Quality), given the
    draw's prompts (quality.cond) or the empty prompt: (N, 16 C) in float64."""
    bb, tt = quality.backbone, torch.full((len(x),), t)

    def pooled(x_t, cond):
        if conditioning == "empty":
            cond = {k: v.expand(len(x_t), *v.shape[1:]) for k, v in bb.uncond.items()}
        with torch.no_grad():
            _, hidden = sf.velocity_and_features(bb.velocity, bb.teacher, x_t, tt[: len(x_t)], cond, 1.0)
        return sf.grid_features(hidden, len(x_t))

    eps = bb.noise(x.shape, torch.Generator().manual_seed(quality.seed + 1))
    return quality.chunked(pooled, sf.add_noise(x, eps, tt)).double()


def scores(feats, ref, dims, distance):
    """{row: its distance to the reference features ref (n, C)}, standardized by the reference, then on its top `dims`
    principal directions scaled to variance 1 (as sf.Quality), or on every dimension (dims 0)."""
    mean, std = ref.mean(0), ref.std(0) + 1e-6
    basis = torch.diag(1 / std)
    if dims:
        _, s, v = torch.linalg.svd((ref - mean) / std, full_matrices=False)
        basis = v[:dims].T * (len(ref) - 1) ** 0.5 / s[:dims] / std[:, None]
    dist, projected = (kernel_distance if distance == "MMD" else frechet_distance), (ref - mean) @ basis
    return {row: dist((f - mean) @ basis, projected) for row, f in feats.items()}


def main(out="out/digits", first_seed="0"):
    study = json.load(open(os.path.join(out, "metric-study.json")))
    fd = {r["row"]: r["fd_to_reference"] for r in study["rows"]}
    if "--data-aided" in study["command"]:
        raise SystemExit("the study's students were data-aided: this file redraws the default ones")
    config = sf.make_config("digits", out=out)
    bb = DigitsBench(config).bb  # the cached teacher; the students below are the cached ones (OUT/runs/)
    students = [(name, scfg, res) for name, scfg, res, _ in benchmark_students(config, {}, bb, False)]
    reference, rho = interval_row(config, sf.REFERENCE_STEPS), {v: [] for v in VARIANTS}
    saved = {r["row"]: r["metric_draws"] for r in study["rows"]}  # the study's number on each draw
    for d in range(DRAWS):
        quality = sf.Quality(bb, config, seed=int(first_seed) + 4 * d)
        drawn = run_numbers(config, bb, students, quality)  # {row: (the run's number, its samples)}
        for look in dict.fromkeys(v[:2] for v in VARIANTS):  # (conditioning, t): the features, once per draw
            feats = {row: features(quality, x, *look) for row, (_, x) in drawn.items()}
            for v in (v for v in VARIANTS if v[:2] == look):
                number = scores(feats, feats[reference], *v[2:])
                if v == RUN and first_seed == "0":  # (sf.Quality draws 16 samples at a time: float rounding)
                    assert all(abs(number[r] - saved[r][d]) < 1e-5 * (1 + saved[r][d]) for r in fd), "not the study's"
                rho[v].append(spearman([number[r] for r in fd], list(fd.values())))
        print(f"draw {d + 1} of {DRAWS}", flush=True)
    print(
        f"Spearman of the number with the classifier's FD over {len(fd)} rows, on {DRAWS} evaluation draws of "
        f"{sf.QUALITY_SIZE} samples (seeds {first_seed}, +4, ...): mean +- sd (lowest), and each draw's"
    )
    print(f"{'conditioning':<13} {'t':>4} {'dims':>5} {'distance':>9} {'Spearman':>22}")
    for v, r in rho.items():
        r = torch.tensor(r)
        cell = f"{r.mean():.3f} +- {r.std():.3f} ({r.min():.3f})"
        print(
            f"{v[0]:<13} {v[1]:4.1f} {v[2] or 'all':>5} {v[3]:>9} {cell:>22}  "
            f"{' '.join(f'{x:.2f}' for x in r.tolist())}{'  <- the run' if v == RUN else ''}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
