"""metric_variants.py -- how the run's quality number (sid_flow.py, section 11) was chosen: variants of its features,
its noise level and its sample size, scored on the samples the digits metric study saved.

    python experiments/digits.py --metric-study     # first: out/digits/metric-study.json, samples.npz, the teacher
    python experiments/metric_variants.py           # then: 77 s on 2 CPU cores

For each variant it prints the Spearman rank correlation of the number with the classifier's FD to the reference (the
metric study's `fd_to_reference`) over all rows. The study saved QUALITY_SIZE run samples per row; a variant with n
samples is scored on each of the QUALITY_SIZE / n disjoint blocks of them (each block its own prompts, seeds and
reference rows, as a run with n samples would draw), and the mean and the lowest correlation over the blocks are shown.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # sid_flow.py, run_toy.py
import sid_flow as sf  # noqa: E402
from digits import DigitsBench, spearman  # noqa: E402  experiments/digits.py


def mean_pooled(hidden, B):  # the number's first features: the last hidden states averaged over the whole image
    return hidden[-B:].float().mean(1)


FEATURES = {"4 x 4 grid (the run's)": sf.grid_features, "mean over the image": mean_pooled}


def block_numbers(quality, samples, reference, n):
    """{row: [the number on each block of n samples]}: each row's samples (QUALITY_SIZE, ...) and the reference's."""
    ref = quality.features(reference)
    feats = {row: quality.features(x) for row, x in samples.items()}
    out = {row: [] for row in samples}
    for i in range(0, len(ref), n):
        r = ref[i:i + n]
        mean, std = r.mean(0), r.std(0) + 1e-6
        for row, f in feats.items():
            out[row].append(sf.kernel_distance((f[i:i + n] - mean) / std, (r - mean) / std))
    return out


def main(out="out/digits"):
    study = json.load(open(os.path.join(out, "metric-study.json")))
    npz = np.load(os.path.join(out, "samples.npz"))
    fd = {r["row"]: r["fd_to_reference"] for r in study["rows"]}
    if f"quality: {study['reference']}" not in npz:  # (the guidance study writes a samples.npz of its own)
        raise SystemExit(f"{out}/samples.npz is another study's: run `python experiments/digits.py --metric-study`")
    samples = {row: torch.from_numpy(npz[f"quality: {row}"]) for row in fd}
    size = len(samples[study["reference"]])
    cfg = sf.make_config("digits", out=out)
    quality = sf.Quality(DigitsBench(cfg).bb, cfg)  # the run's prompts (quality.cond), from the cached teacher
    assert len(quality.z) == size, f"{out}: saved with QUALITY_SIZE {size}, now {len(quality.z)}: rerun the study"
    print(f"Spearman of the number with the classifier's FD over {len(fd)} rows: mean (lowest) over the blocks")
    print(f"{'features':<24} {'t':>4} " + " ".join(f"{f'n = {n}':>15}" for n in (64, 128, 256)))
    for name, features in FEATURES.items():
        for t in (0.3, 0.5, 0.7):
            sf.grid_features, sf.QUALITY_T = features, t  # what Quality.features calls, and where it noises to
            cells = []
            for n in (64, 128, 256):
                numbers = block_numbers(quality, samples, samples[study["reference"]], n)
                rho = [spearman([numbers[row][b] for row in fd], list(fd.values())) for b in range(size // n)]
                cells.append(f"{sum(rho) / len(rho):.3f} ({min(rho):.3f})")
            print(f"{name:<24} {t:4.1f} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main(*sys.argv[1:])
