"""run_toy.py -- the laptop demo: distil a 2-D flow-matching teacher into a four-step generator with SiD.

    python run_toy.py                       # checkerboard, 1.5-2.5 min on 2 CPU cores: out/toy/checkerboard/
    python run_toy.py --dataset moons       # also: 8gaussians, spiral; each in its own out/toy/<dataset>/
    python run_toy.py --compare             # + DMD, alpha 1.2, 1 step, uniform k, data-aided, side by side
    python experiments/digits.py            # next: a SANA-architecture DiT on real 8x8 digits (out/digits/)

1. train (or load the cached) teacher: an MLP velocity field fitted by flow matching (D8) on the 2-D data;
2. distil it with sid_flow.distill -- the same loss and loop as the DiT teachers, through sid_flow.ToyBackbone;
3. measure the energy distance (D19) of every sampler to the data, with its standard error; write the table, the
   figure (toy.png) and the samples to OUT/<dataset and the flags that change them>/ (teacher and runs: cached in OUT).
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

import sid_flow as sf

# ------------------------------------------------------------------------------------------------------------------
# 2-D data: each dataset maps uniforms u (n, dims) in [0, 1) to samples (n, 2), so that one map draws the i.i.d.
# training batches (u from a torch.Generator) and the low-discrepancy evaluation sets (u from scrambled Sobol points)
# ------------------------------------------------------------------------------------------------------------------


def normal(u):
    """Standard normal draws from uniforms by the inverse CDF: (n, k) -> (n, k)."""
    return math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-7, 1 - 1e-7) - 1)


def checkerboard(u):  # u: (n, 3)
    x = u[:, 0] * 4 - 2  # columns in [-2, 2)
    y = u[:, 1] - 2 * (u[:, 2] < 0.5).float()  # one of the column's two rows of squares: [-2, -1) or [0, 1)
    y = y + torch.floor(x) % 2  # shift every other column by one square
    return torch.stack([x, y], 1)  # (n, 2)


def eight_gaussians(u):  # u: (n, 3)
    angle = torch.floor(u[:, 0] * 8) * (math.pi / 4)
    centers = 2 * torch.stack([angle.cos(), angle.sin()], 1)  # (n, 2) on a circle of radius 2
    return centers + 0.15 * normal(u[:, 1:3])


def moons(u):  # u: (n, 4)
    upper = u[:, 0] < 0.5  # upper or lower moon
    theta = u[:, 1] * math.pi
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6  # centred, std ~ 1
    return pts + 0.08 * normal(u[:, 2:4])


def spiral(u):  # u: (n, 3)
    r = torch.sqrt(u[:, 0]) * 3 * math.pi  # denser near the centre, like the classic 2-D spiral
    pts = torch.stack([r * r.cos(), r * r.sin()], 1) / 4.5
    return pts + 0.08 * normal(u[:, 1:3])


DATASETS = {
    "checkerboard": (checkerboard, 3),
    "8gaussians": (eight_gaussians, 3),
    "moons": (moons, 4),
    "spiral": (spiral, 3),
}  # name -> (map from uniforms, number of uniforms per sample)


def draw(dataset, n, generator):
    """n i.i.d. samples (n, 2) of a dataset, from a torch.Generator: the teacher's training data."""
    f, dims = DATASETS[dataset]
    return f(torch.rand(n, dims, generator=generator))


# ------------------------------------------------------------------------------------------------------------------
# The metric: energy distance (D19) -- zero iff the two distributions are equal
#
#   ED(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|.   In 2-D, |v| = (pi/2) E_theta |<theta, v>| over directions theta,
#   so ED is (pi/2) times the mean over directions of the 1-D energy distance of the projections, and each 1-D one is
#   exact in O(N log N) from sorted samples.
#
#   With independent samples the estimate's noise is ~1e-4 at 24k samples, as large as the distances it should resolve.
#   So the demo evaluates randomised quasi-Monte Carlo: every sampler's input noise and the reference data come from
#   scrambled Sobol points (a sampler is a fixed function of its input noise), R independent scrambles give R
#   independent estimates, and their mean +- standard error is reported: ~100x less noise at equal cost. Points of one
#   Sobol set are not independent, so the within-set means use all n^2 pairs (the V-statistic, >= 0; its bias is the
#   "data" row's distance, ~5e-6 at 4096 points); the U-statistic is for independent samples.
# ------------------------------------------------------------------------------------------------------------------


def _sum_abs_diff(x, y):
    """sum_{i,j} |x_i - y_j| per row of x (M, n) and y (M, m), in O((n + m) log m) by prefix sums of the sorted y."""
    y = y.sort(dim=1).values  # (M, m)
    cum = torch.cat([torch.zeros_like(y[:, :1]), y.cumsum(1)], 1)  # (M, m+1) prefix sums
    c = torch.searchsorted(y, x)  # (M, n) how many y_j lie below x_i
    below = x * c - cum.gather(1, c)  # sum_j (x_i - y_j) over y_j < x_i
    above = (cum[:, -1:] - cum.gather(1, c)) - x * (y.shape[1] - c)  # sum_j (y_j - x_i) over y_j >= x_i
    return (below + above).sum(1)  # (M,)


def energy_distance(x, y, directions=128, independent=True):
    """Energy distance of samples x (n, 2) and y (m, 2), float64, from `directions` projections in [0, pi).
    independent: the unbiased U-statistic for i.i.d. samples (it can dip below zero); False: the V-statistic, for QMC
    sets."""
    theta = torch.arange(directions, dtype=torch.float64) * (math.pi / directions)  # (M,)
    u = torch.stack([theta.cos(), theta.sin()], 1)  # (M, 2) unit directions
    px, py = u @ x.double().T, u @ y.double().T  # (M, n), (M, m) projections
    pairs = (lambda k: k * (k - 1)) if independent else (lambda k: k * k)  # ordered pairs i != j, or all of them
    # (M,) the 1-D energy distances; within a set the pairs i = j add |x_i - x_i| = 0, so one count serves U and V
    ed_1d = (
        2 * _sum_abs_diff(px, py) / (len(x) * len(y))
        - _sum_abs_diff(px, px) / pairs(len(x))
        - _sum_abs_diff(py, py) / pairs(len(y))
    )
    return (math.pi / 2) * ed_1d.mean().item()


DIRECTIONS = 32  # for the demo's table: quadrature error ~4e-4 of the distance, below its standard error
R = 4  # independent replicates of the demo's evaluation


class Evaluation:
    """R independent randomised-QMC replicates: replicate r holds a reference set of `ref_factor` x n data points
    and n input-noise points (n, 2 max_steps) for the samplers, from independently scrambled Sobol sequences."""

    def __init__(self, dataset, n, replicates=R, seed=0, max_steps=4, ref_factor=4):
        f, dims = DATASETS[dataset]
        sobol = lambda k, d, s: torch.quasirandom.SobolEngine(d, scramble=True, seed=s).draw(k)  # noqa: E731  (k, d)
        base = 10_000 + 100 * seed  # never the training stream
        self.data = [f(sobol(ref_factor * n, dims, base + r)) for r in range(replicates)]  # R x (4n, 2)
        self.twin = [f(sobol(n, dims, base + 50 + r)) for r in range(replicates)]  # another draw of the data
        self.noise = [normal(sobol(n, 2 * max_steps, base + 80 + r)) for r in range(replicates)]  # R x (n, 2K)

    def inputs(self, r, K):
        """The noises of replicate r for a K-step sampler, (n, K, 2): z, then a re-noising draw per later step."""
        return self.noise[r][:, : 2 * K].reshape(-1, K, 2)

    def samples(self, sampler, K):
        """sampler(noises (n, K, 2)) -> (n, 2), once per replicate: a list of R sample sets."""
        return [sampler(self.inputs(r, K)) for r in range(len(self.noise))]

    def distance(self, xs):
        """(mean, standard error) over the replicates of the energy distance of xs (R sets) to the data."""
        eds = torch.tensor(
            [energy_distance(x, y, DIRECTIONS, independent=False) for x, y in zip(xs, self.data, strict=True)]
        )
        return eds.mean().item(), (eds.std() / math.sqrt(len(eds))).item()


# ------------------------------------------------------------------------------------------------------------------
# The teacher: an MLP trained by flow matching (D8), cached in --out
# ------------------------------------------------------------------------------------------------------------------

# the teacher's recipe, in one place: random Fourier features of x_t (frequencies ~ N(0, fourier_scale^2)) let the
# MLP draw the squares' sharp edges in the time a plain MLP draws round blobs (experiments/README.md, "The default
# run")
TEACHER = dict(width=128, depth=4, fourier=32, fourier_scale=2.0, iters=2500, batch=2048, lr=3e-3)


class TimeEmbedding(torch.nn.Module):
    """sin and cos of t at frequencies pi, 2 pi, ..., (dim/2) pi: (B,) -> (B, dim); on the toy these trained a sharper
    teacher than DiTs' geometric frequencies of 1000 t in the same time."""

    def __init__(self, dim=32):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, dim // 2 + 1, dtype=torch.float32))

    def forward(self, t):
        arg = t[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([arg.sin(), arg.cos()], dim=1)  # (B, dim)


class ToyMLP(torch.nn.Module):
    """The 2-D velocity v(x_t, t): an MLP on x_t, the time's features and (fourier > 0) sin and cos of x_t B, with
    B (dim, F) ~ N(0, fourier_scale^2) a fixed buffer; `features` is its last hidden layer, `head` the velocity."""

    def __init__(self, dim=2, width=256, depth=3, tdim=32, fourier=0, fourier_scale=1.0):
        super().__init__()
        self.config = dict(dim=dim, width=width, depth=depth, tdim=tdim)  # saved with the weights
        self.embed_t = TimeEmbedding(tdim)
        self.body = torch.nn.Sequential(
            *[m for i in range(depth) for m in (torch.nn.Linear(width if i else dim + tdim, width), torch.nn.SiLU())]
        )
        self.head = torch.nn.Linear(width, dim)
        if fourier:  # widened last, so that every other layer starts from the weights it has without the features
            self.body[0] = torch.nn.Linear(dim + 2 * fourier + tdim, width)
        self.register_buffer(
            "B", fourier_scale * torch.randn(dim, fourier, generator=torch.Generator().manual_seed(0))
        )

    def features(self, x_t, t):
        proj = x_t @ self.B  # (B, F), F = 0 without Fourier features
        return self.body(torch.cat([x_t, proj.sin(), proj.cos(), self.embed_t(t)], dim=1))  # (B, width)

    def forward(self, x_t, t):
        return self.head(self.features(x_t, t))  # (B, dim)


def trained(net, path, recipe, batch_loss, iters, lr, desc):
    """`net` with the weights saved at `path` if they were trained by the same recipe (0 s), else trained by Adam with
    a one-cycle learning rate on batch_loss() for `iters` steps and saved there with its recipe: (net, seconds)."""
    if os.path.exists(path) and (ck := torch.load(path, weights_only=False))["recipe"] == recipe:
        net.load_state_dict(ck["state"])
        return net, 0.0
    t0, opt = time.time(), torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters, pct_start=0.05)
    for _ in tqdm(range(iters), desc=desc, disable=None, dynamic_ncols=True):
        opt.zero_grad()
        batch_loss().backward()
        opt.step()
        sched.step()
    sf.atomic_save(dict(recipe=recipe, state=net.state_dict()), path)
    return net, time.time() - t0


def train_teacher(dataset, seed, path):
    """The 2-D teacher: an MLP fitted by flow matching (D8) on fresh draws of the data; cached at `path`."""
    torch.manual_seed(seed)  # its initial weights
    net = ToyMLP(**{k: TEACHER[k] for k in ("width", "depth", "fourier", "fourier_scale")})
    g = torch.Generator().manual_seed(seed)

    def batch_loss():
        x0 = draw(dataset, TEACHER["batch"], g)  # (B, 2) the teacher's training data
        eps = torch.randn(x0.shape, generator=g)  # (B, 2)
        t = torch.rand(x0.shape[0], generator=g)  # (B,) uniform times for the teacher
        return sf.flow_matching_loss(net(sf.add_noise(x0, eps, t), t), x0, eps, t).mean()

    return trained(
        net, path, dict(TEACHER, dataset=dataset, seed=seed), batch_loss, TEACHER["iters"], TEACHER["lr"], "teacher"
    )


def run_folder(out, name, config, **teacher):
    """(OUT/runs/<name>-<hash>, the iterations its checkpoint holds): a folder per config (less the fields a resumed
    run may change: sf.changeable_on_resume) and teacher: the same command resumes or reuses its run, a changed one
    trains anew."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in sf.changeable_on_resume(config)}
    key = json.dumps(dict(fields, **teacher), sort_keys=True)
    folder = os.path.join(out, "runs", f"{sf.slug(name)}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    path = sf.checkpoint_path(folder)
    return folder, sf.read_meta(path)["step"] if os.path.exists(path) else 0


# ------------------------------------------------------------------------------------------------------------------
# The demo: its command line, the teacher's samplers, a student per variant, the table, the figure
# ------------------------------------------------------------------------------------------------------------------

# --compare: name -> Config overrides over the command line's; a name ending in "data-aided" gets the true data (D17)
VARIANTS = {
    "SiD": {},
    "DMD": dict(loss="dmd"),
    "SiD alpha=1.2": dict(alpha=1.2),
    "SiD 1 step": dict(steps=1),
    "SiD uniform k": dict(train_step="uniform"),
    "SiD data-aided": {},
}
NOT_HERE = (
    "teacher",
    "device",
    "precision",
    "prompts",
    "resolution",
    "data",
    "mode",
    "lora_rank",  # sid_flow.py
    "grad_checkpointing",
    "embedded_guidance_only",
    "guidance_train_fake",
    "guidance_eval_fake",
    "guidance_eval_real",
    "guidance_t_min",
    "guidance_t_max",
    "compile",
)  # flags that mean nothing for the 2-D MLPs (unconditional, CPU): not offered


def parse_flags(parser, argv, not_here):
    """(args, the Config fields they set or None); a sid_flow.py flag in `not_here` is refused with the reason."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        flag = rest[0].split("=")[0]
        if flag.startswith("--") and flag[2:].replace("-", "_") in not_here:
            parser.error(f"{flag} is a sid_flow.py flag for image teachers; {parser.prog} does not offer it")
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, {f.name: getattr(args, f.name) for f in dataclasses.fields(sf.Config) if hasattr(args, f.name)}


def parse_args(argv):
    p = sf.Parser(prog="run_toy.py", description=__doc__)
    p.add_argument("--dataset", default="checkerboard", choices=sorted(DATASETS), help="[default: checkerboard]")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also distil the variants (DMD, alpha 1.2, one step, uniform k, data-aided) into one table",
    )
    p.add_argument(
        "--data-aided",
        action="store_true",
        help="data-aided SiD (D17): the fake network also discriminates true samples from fakes",
    )
    p.add_argument(
        "--n-eval",
        type=int,
        default=16384,
        help=f"samples per sampler for the energy distance, in {R} replicates [default: 16384]",
    )
    sf.add_config_flags(p, skip=NOT_HERE + ("out", "eval_every"), presets={"toy": "toy"})
    p.add_argument(
        "--out",
        help="the cached teacher, the runs (OUT/runs/) and one folder of results per command, "
        f"named after the dataset and the flags that change them [default: {sf.PRESETS['toy']['out']}]",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        help="iterations between points of the distance curve; 0 means every "
        "tenth of --iters (for sid_flow.py 0 means never) [default: 0]",
    )
    return parse_flags(p, argv, NOT_HERE)


def run_name(args, overrides):
    """The folder of one command's results: the dataset, then every flag given that changes them, e.g.
    'moons', 'checkerboard-compare', 'checkerboard-alpha-1.2' -- so no run overwrites another's figure."""
    parts = [args.dataset] + ["compare"] * args.compare + ["data-aided"] * args.data_aided
    parts += [
        f"{k.replace('_', '-')}-{v}"
        for k, v in sorted(overrides.items())
        if v is not None and k not in ("out", "save_every", "eval_every")
    ]  # these leave the results alone
    parts += [f"n-eval-{args.n_eval}"] if args.n_eval != 16384 else []
    return sf.slug("-".join(parts).replace("/", "_"))  # a '/' in a value ('1/t') would make a subfolder


def strict_sums():
    """MKL, torch's BLAS on x86 CPUs, splits a matrix product's long sums (a weight gradient's, over the batch) among
    its threads, so the thread count would change their rounding -- and distillation, which amplifies any difference,
    the student by about 0.1x its teacher's distance. Its strict reproducible mode keeps one order at any thread
    count: the same seed prints the same table at one thread or two. MKL reads the setting once, at its first call:
    this works in a fresh process, before any computation. A value already in the environment is kept; the setting
    means nothing to other BLAS (Apple silicon's, ARM's)."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def main(argv=None):
    strict_sums()
    args, overrides = parse_args(argv)
    config = sf.make_config("toy", **overrides)
    if args.n_eval < 64 * R:
        raise sf.UserError(f"--n-eval must be at least {64 * R}, got {args.n_eval}")
    t_start, folder = time.time(), os.path.join(config.out, run_name(args, overrides))
    os.makedirs(folder, exist_ok=True)
    teacher, t_teacher = train_teacher(
        args.dataset, config.seed, os.path.join(config.out, f"teacher-{args.dataset}.pt")
    )
    ev = Evaluation(args.dataset, args.n_eval // R, R, config.seed, max_steps=max(4, config.steps))
    t0 = time.time()
    samples = {"data (another draw)": ev.twin}  # its distance is the estimator's floor at this n
    for n in (1, 2, 4, 8, 32, 128):
        samples[f"teacher {n} steps"] = ev.samples(lambda noises, n=n: sf.euler_sample(teacher, noises[:, 0], n), 1)
    # the teacher's own weights used as a K-step SiD generator: where distillation starts
    samples["teacher as 4-step generator"] = ev.samples(lambda noises: sf.generate(teacher, noises, config.noise), 4)
    t_eval = time.time() - t0

    curves, t_distill = {}, {}
    for name, extra in (VARIANTS if args.compare else {"SiD": {}}).items():
        aided = args.data_aided or name.endswith("data-aided")
        name += " data-aided" if aided and not name.endswith("data-aided") else ""
        vcfg = sf.make_config("toy", **{**overrides, **extra})
        vcfg.out, done = run_folder(config.out, name, vcfg, dataset=args.dataset, teacher=TEACHER, data_aided=aided)
        backbone = sf.ToyBackbone(teacher, real=(lambda n, g: draw(args.dataset, n, g)) if aided else None)
        curves[name], res, t_distill[name] = distil_variant(vcfg, backbone, ev, done)
        for kind, net in (("EMA", res["ema"]), ("raw", res["generator"])):
            if net is not None:  # (no EMA with --ema-decay 0)
                samples[f"{name} ({vcfg.steps} step{'s' * (vcfg.steps > 1)}, {kind})"] = ev.samples(
                    lambda noises, net=net, mode=vcfg.noise: sf.generate(net, noises, mode), vcfg.steps
                )
    t0 = time.time()
    ed = {name: ev.distance(xs) for name, xs in samples.items()}
    seconds = dict(
        teacher=t_teacher, distill=t_distill, evaluation=t_eval + time.time() - t0, total=time.time() - t_start
    )
    return report(args, config, folder, ev, samples, ed, curves, seconds, argv)


def distil_variant(vcfg, backbone, ev, done):
    """One student: distil, resume or reuse the run in vcfg.out, its distance curve (replicate 0) kept beside it in
    curve.json. Returns (curve, sf.distill's result, seconds trained; None when the run was finished already)."""
    curve_path = os.path.join(vcfg.out, "curve.json")
    curve = [p for p in json.load(open(curve_path)) if p["step"] <= done] if os.path.exists(curve_path) else []

    def first_replicate(net):  # one point of the curve: replicate 0 only, cheap
        x = sf.generate(net, ev.inputs(0, vcfg.steps), vcfg.noise)
        return energy_distance(x, ev.data[0], DIRECTIONS, False)

    curve = curve or [dict(step=0, raw=(d0 := first_replicate(backbone.teacher)), ema=d0)]  # 0: it is the teacher
    vcfg.eval_every = vcfg.eval_every or max(1, vcfg.iters // 10)  # 0: every tenth of the run

    def on_eval(step, gen, ema):  # a point, saved at once: an interrupted run keeps the points up to its checkpoint
        curve.append(dict(step=step, raw=first_replicate(gen), ema=first_replicate(gen if ema is None else ema)))
        with open(curve_path, "w") as f:
            json.dump(curve, f)

    t0 = time.time()
    res = sf.distill(vcfg, backbone, on_eval=on_eval, runtime=sf.Checkpoints())
    return curve, res, None if done >= vcfg.iters else time.time() - t0


def report(args, config, folder, ev, samples, ed, curves, seconds, argv):
    """Print the table and the times; write the samples (*.npy), metrics.json and toy.png to `folder`."""
    ref4, ref128 = ed["teacher 4 steps"][0], ed["teacher 128 steps"][0]
    print(
        f"\nenergy distance to {args.dataset} (lower is better): mean +- standard error over {R} replicates of "
        f"{args.n_eval // R} scrambled-Sobol samples each"
    )
    print(f"{'sampler':<36} {'distance':>10} {'+-':>8} {'/ teacher-128':>14} {'/ teacher-4':>12}")
    for name, (d, se) in ed.items():
        print(f"{name:<36} {d:10.6f} {se:8.6f} {d / ref128:14.3f} {d / ref4:12.4f}")
    runs = ", ".join(f"{k} {'reused' if v is None else f'{v:.1f} s'}" for k, v in seconds["distill"].items())
    print(
        f"time: teacher {format(seconds['teacher'], '.1f') + ' s' if seconds['teacher'] else 'cached'}, {runs}, "
        f"evaluation {seconds['evaluation']:.1f} s, total {seconds['total']:.1f} s before the figure"
    )

    student = next(k for k in samples if k.startswith("SiD") and k.endswith("EMA)"))
    for file, x in (
        ("data", ev.data[0][: len(ev.twin[0])]),
        ("teacher_4", samples["teacher 4 steps"][0]),
        ("teacher_128", samples["teacher 128 steps"][0]),
        ("student", samples[student][0]),
    ):
        np.save(os.path.join(folder, f"{file}.npy"), x.numpy())
    metrics = dict(
        dataset=args.dataset,
        n_eval=args.n_eval,
        replicates=R,
        curves=curves,
        seconds=seconds,
        energy_distance={k: v[0] for k, v in ed.items()},
        standard_error={k: v[1] for k, v in ed.items()},
        config=dataclasses.asdict(config),
        folder=folder,
        command="python run_toy.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot({k: v[0] for k, v in samples.items()}, ev.data[0], curves, ed, student, os.path.join(folder, "toy.png"))
    print(f"wrote {folder}/: toy.png, metrics.json, data.npy, teacher_4.npy, teacher_128.npy, student.npy")
    return metrics


def plot(samples, data, curves, ed, student, path):
    """Data, the teacher at 4 and 128 Euler steps, the teacher as a 4-step generator (iteration 0), the student,
    and the distance during distillation (replicate 0) against the teacher's, with +- one standard error."""
    panels = {
        "data": None,
        "teacher, 4 Euler steps": "teacher 4 steps",  # title -> the sampler shown (None: data)
        "teacher, 128 Euler steps": "teacher 128 steps",
        "teacher as 4-step generator (iteration 0)": "teacher as 4-step generator",
        f"student: {student}": student,
    }
    fig, axes = plt.subplots(1, 6, figsize=(25, 4.6))
    for ax, (title, name) in zip(axes, panels.items(), strict=False):
        x = (samples[name] if name else data)[:4096].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=0.8, alpha=0.6, color="k", rasterized=True)
        ax.set_title(title + (f"\ndistance {ed[name][0]:.2e} ± {ed[name][1]:.0e}" if name else ""), fontsize=10)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
    ax = axes[5]
    for name, c in curves.items():
        steps = [p["step"] for p in c]
        (line,) = ax.plot(steps, [p["ema"] for p in c], marker=".", label=f"{name} (EMA)")
        ax.plot(steps, [p["raw"] for p in c], ls=":", color=line.get_color(), label=f"{name} (raw)")
    for key, color in (("teacher 4 steps", "tab:red"), ("teacher 128 steps", "tab:green")):
        d, se = ed[key]
        ax.axhline(d, color=color, ls="--", lw=1, label=key)
        ax.axhspan(d - se, d + se, color=color, alpha=0.2)
    ax.set(yscale="log", xlabel="iteration", ylabel="energy distance to data")  # the V-statistic is never negative
    ax.set_title("during distillation (replicate 0)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except (sf.UserError, sf.Interrupted) as e:  # a bad flag; or SIGTERM / Ctrl-C, its iteration checkpointed
        print(f"error: {e}" if isinstance(e, sf.UserError) else e, file=sys.stderr)
        sys.exit(2 if isinstance(e, sf.UserError) else 130)
