"""run_toy.py -- the laptop demo: distil a 2-D flow-matching teacher into a four-step generator with SiD.

    python run_toy.py                       # checkerboard, ~1 min on 2 CPU cores: out/toy/{toy.png, metrics.json}
    python run_toy.py --compare             # + DMD, alpha 1.2, one step, uniform-mixture training, side by side
    python run_toy.py --dataset spiral      # also: 8gaussians, moons

1. train (or load the cached) teacher: an MLP velocity field fitted by flow matching (D8) on the 2-D data;
2. distil it with sid_flow.distill -- the same loss and loop as the DiT teachers, through sid_flow.ToyBackbone;
3. measure the energy distance (D15) of every sampler to fresh data; write the table, figure and samples.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

import sid_flow as sf

# ------------------------------------------------------------------------------------------------------------------
# 2-D data: each sampler returns (n, 2) float32 from a torch.Generator
# ------------------------------------------------------------------------------------------------------------------


def checkerboard(n, g):
    x = torch.rand(n, generator=g) * 4 - 2  # columns in [-2, 2)
    y = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).float()  # [-2, 1)
    y = y + torch.floor(x) % 2  # shift every other column by one square
    return torch.stack([x, y], 1)  # (n, 2)


def eight_gaussians(n, g):
    angle = torch.randint(0, 8, (n,), generator=g).float() * (math.pi / 4)
    centers = 2 * torch.stack([angle.cos(), angle.sin()], 1)  # (n, 2) on a circle of radius 2
    return centers + 0.15 * torch.randn(n, 2, generator=g)


def moons(n, g):
    which = torch.randint(0, 2, (n,), generator=g).float()  # upper or lower moon
    theta = torch.rand(n, generator=g) * math.pi
    x = torch.where(which == 0, theta.cos(), 1 - theta.cos())
    y = torch.where(which == 0, theta.sin(), 0.5 - theta.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6  # centred, std ~ 1
    return pts + 0.08 * torch.randn(n, 2, generator=g)


def spiral(n, g):
    r = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi  # denser near the centre, like the classic 2-D spiral
    pts = torch.stack([r * r.cos(), r * r.sin()], 1) / 4.5
    return pts + 0.08 * torch.randn(n, 2, generator=g)


DATASETS = {"checkerboard": checkerboard, "8gaussians": eight_gaussians, "moons": moons, "spiral": spiral}

# ------------------------------------------------------------------------------------------------------------------
# The metric: energy distance (D15) -- zero iff the two distributions are equal
#
#   ED(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|.   In 2-D, |v| = (pi/2) E_theta |<theta, v>| over directions theta,
#   so ED is (pi/2) times the mean over directions of the 1-D energy distance of the projections, and each 1-D one is
#   exact in O(N log N) from sorted samples. The estimate is the unbiased U-statistic (it can dip below zero).
# ------------------------------------------------------------------------------------------------------------------


def _sum_abs_within(x):
    """sum_{i<j} |x_i - x_j| for each row of x (M, n), by sorting: x_(i) appears with sign + i times, - (n-1-i)."""
    n = x.shape[1]
    coef = 2 * torch.arange(n, dtype=x.dtype) - (n - 1)  # (n,)
    return (x.sort(dim=1).values * coef).sum(1)  # (M,)


def _sum_abs_between(x, y):
    """sum_{i,j} |x_i - y_j| for each row, (M, n) and (M, m): for each x_i, the y's below and above it."""
    y = y.sort(dim=1).values  # (M, m)
    cum = torch.cat([torch.zeros_like(y[:, :1]), y.cumsum(1)], 1)  # (M, m+1) prefix sums
    c = torch.searchsorted(y, x)  # (M, n) how many y_j lie below x_i
    below = x * c - cum.gather(1, c)  # sum_j (x_i - y_j) over y_j < x_i
    above = (cum[:, -1:] - cum.gather(1, c)) - x * (y.shape[1] - c)  # sum_j (y_j - x_i) over y_j >= x_i
    return (below + above).sum(1)  # (M,)


def energy_distance(x, y, directions=128):
    """Energy distance between samples x (n, 2) and y (m, 2), float64, via `directions` projections in [0, pi)."""
    theta = torch.arange(directions, dtype=torch.float64) * (math.pi / directions)  # (M,)
    u = torch.stack([theta.cos(), theta.sin()], 1)  # (M, 2) unit directions
    px, py = u @ x.double().T, u @ y.double().T  # (M, n), (M, m) projections
    n, m = px.shape[1], py.shape[1]
    ed_1d = (2 * _sum_abs_between(px, py) / (n * m) - 2 * _sum_abs_within(px) / (n * (n - 1))
             - 2 * _sum_abs_within(py) / (m * (m - 1)))  # (M,) the 1-D energy distances, U-statistic
    return (math.pi / 2) * ed_1d.mean().item()

# ------------------------------------------------------------------------------------------------------------------
# The teacher: an MLP trained by flow matching (D8), cached in --out
# ------------------------------------------------------------------------------------------------------------------

TEACHER = dict(width=128, depth=4, iters=2500, batch=2048, lr=3e-3)  # the teacher's recipe, in one place


def train_teacher(dataset, seed, path, progress=True):
    """Load the cached teacher at `path` when its recipe matches, else train and save it."""
    recipe = dict(TEACHER, dataset=dataset, seed=seed)
    if os.path.exists(path):
        ck = torch.load(path, weights_only=False)
        if ck["recipe"] == recipe:
            net = sf.ToyMLP(**ck["config"])
            net.load_state_dict(ck["state"])
            return net, 0.0
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = sf.ToyMLP(width=TEACHER["width"], depth=TEACHER["depth"])
    opt = torch.optim.Adam(net.parameters(), lr=TEACHER["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TEACHER["lr"], total_steps=TEACHER["iters"], pct_start=0.05)
    from tqdm.auto import tqdm
    for _ in tqdm(range(TEACHER["iters"]), desc="teacher", disable=not progress, dynamic_ncols=True):
        x0 = DATASETS[dataset](TEACHER["batch"], g)  # (B, 2) the teacher's training data
        eps = torch.randn(x0.shape, generator=g)  # (B, 2)
        t = torch.rand(x0.shape[0], generator=g)  # (B,) uniform times for the teacher
        loss = sf.flow_matching_loss(net(sf.add_noise(x0, eps, t), t), x0, eps, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    sf.atomic_save(dict(recipe=recipe, config=net.config, state=net.state_dict()), path)
    return net, time.time() - t0

# ------------------------------------------------------------------------------------------------------------------
# Variants compared by --compare: name -> Config overrides on top of the command line's
# ------------------------------------------------------------------------------------------------------------------

VARIANTS = {  # 'data_aided' is not a Config field: it hands the true distribution to the backbone (D16)
    "SiD": {},
    "DMD": dict(loss="dmd"),
    "SiD alpha=1.2": dict(alpha=1.2),
    "SiD 1 step": dict(steps=1),
    "SiD uniform k": dict(train_step="uniform"),
    "SiD data-aided": dict(data_aided=True),
}


def parse_args(argv):
    p = sf.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="checkerboard", choices=sorted(DATASETS))
    p.add_argument("--compare", action="store_true", help="also distil the VARIANTS and put them in one table")
    p.add_argument("--data-aided", action="store_true",
                   help="data-aided SiD (D16): the fake network also discriminates fresh true samples from fakes")
    p.add_argument("--n-eval", type=int, default=24000, help="samples per sampler for the energy distance")
    sf.add_config_flags(p, skip=("teacher", "device", "precision"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("dataset", "compare", "n_eval", "data_aided")}
    cfg = sf.make_config("toy", **overrides)
    if args.n_eval < 100:
        raise sf.UserError(f"--n-eval must be at least 100, got {args.n_eval}")
    t_start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    teacher, t_teacher = train_teacher(args.dataset, cfg.seed, os.path.join(cfg.out, f"teacher-{args.dataset}.pt"),
                                       cfg.progress)
    # data-aided runs draw "real" samples from the true distribution with the loop's own RNG (resumable)
    backbones = {False: sf.ToyBackbone(teacher), True: sf.ToyBackbone(teacher, real=DATASETS[args.dataset])}
    T = lambda x, t: teacher(x, t)  # noqa: E731  the teacher's velocity

    # fixed evaluation draws: fresh data (never the teacher's training stream) and one noise batch for every sampler
    g_eval = torch.Generator().manual_seed(10_000 + cfg.seed)
    data = DATASETS[args.dataset](args.n_eval, g_eval)  # (N, 2)
    z = torch.randn(args.n_eval, 2, generator=g_eval)  # (N, 2)
    # a second fresh data draw: its distance to `data` is the estimator's noise floor at this N
    samples = {"fresh data (noise floor)": DATASETS[args.dataset](args.n_eval, g_eval)}
    samples.update({f"teacher {n} steps": sf.euler_sample(T, z, n) for n in (1, 2, 4, 8, 32, 128)})
    # the teacher's own weights used as a K-step SiD sampler: where distillation starts
    samples["teacher as 4-step generator"] = sf.generate(T, z, 4, cfg.noise,
                                                         sf.gaussian(torch.Generator().manual_seed(1)))

    def student_samples(net, K):
        return sf.generate(lambda x, t: net(x, t), z, K, cfg.noise, sf.gaussian(torch.Generator().manual_seed(1)))

    variants = VARIANTS if args.compare else {"SiD": dict(data_aided=args.data_aided)}
    curves, t_distill = {}, {}
    for name, extra in variants.items():
        extra = dict(extra)
        aided = extra.pop("data_aided", False) or args.data_aided
        name = name + (" data-aided" if aided and "data-aided" not in name else "")
        vcfg = sf.make_config("toy", **{**overrides, **extra})
        # one folder per distinct config: the same command resumes (or reuses) its run, a changed flag starts anew
        vcfg.out = os.path.join(cfg.out, "runs", f"{sf._slug(name)}-{_config_hash(vcfg, args.dataset, aided)}")
        curve_path, ckpt_path = os.path.join(vcfg.out, "curve.json"), os.path.join(vcfg.out, "checkpoint.pt")
        done = torch.load(ckpt_path, weights_only=False)["step"] if os.path.exists(ckpt_path) else 0
        curve = [p for p in json.load(open(curve_path)) if p["step"] <= done] if os.path.exists(curve_path) else []
        curves[name] = curve
        n_curve = min(5000, args.n_eval)

        def on_eval(step, gen, ema, vcfg=vcfg, curve=curve):
            curve.append(dict(step=step,
                              raw=energy_distance(student_samples(gen, vcfg.steps)[:n_curve], data[:n_curve]),
                              ema=energy_distance(student_samples(ema, vcfg.steps)[:n_curve], data[:n_curve])))

        vcfg.eval_every = vcfg.eval_every or max(1, vcfg.iters // 20)
        t0 = time.time()
        res = sf.distill(vcfg, backbones[aided], on_eval=on_eval)
        t_distill[name] = time.time() - t0
        with open(curve_path, "w") as f:
            json.dump(curve, f)
        samples[f"{name} ({vcfg.steps} step{'s' * (vcfg.steps > 1)}, EMA)"] = student_samples(res["ema"], vcfg.steps)
        samples[f"{name} ({vcfg.steps} step{'s' * (vcfg.steps > 1)}, raw)"] = student_samples(res["generator"],
                                                                                           vcfg.steps)
    ed = {name: energy_distance(x, data) for name, x in samples.items()}
    t_total = time.time() - t_start

    # ---- report -------------------------------------------------------------------------------------------------
    ref4, ref128 = ed["teacher 4 steps"], ed["teacher 128 steps"]
    print(f"\nenergy distance to {args.n_eval} fresh {args.dataset} samples (lower is better)")
    print(f"{'sampler':<36} {'distance':>9} {'/ teacher-128':>14} {'/ teacher-4':>12}")
    for name, d in ed.items():
        print(f"{name:<36} {d:9.5f} {d / ref128:14.2f} {d / ref4:12.3f}")
    print(f"time: teacher {'cached' if t_teacher == 0 else f'{t_teacher:.1f} s'}, "
          + ", ".join(f"{k} {v:.1f} s" for k, v in t_distill.items()) + f", total {t_total:.1f} s")

    np.save(os.path.join(cfg.out, "data.npy"), data.numpy())
    np.save(os.path.join(cfg.out, "teacher_4.npy"), samples["teacher 4 steps"].numpy())
    np.save(os.path.join(cfg.out, "teacher_128.npy"), samples["teacher 128 steps"].numpy())
    main_student = next(k for k in samples if k.startswith("SiD") and k.endswith("EMA)"))
    np.save(os.path.join(cfg.out, "student.npy"), samples[main_student].numpy())
    metrics = dict(dataset=args.dataset, n_eval=args.n_eval, energy_distance=ed, curves=curves,
                   seconds=dict(teacher=t_teacher, distill=t_distill, total=t_total),
                   config=sf.dataclasses.asdict(cfg), command="python run_toy.py " + " ".join(sys.argv[1:]))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot(samples, data, curves, ref4, ref128, main_student, os.path.join(cfg.out, "toy.png"))
    print(f"wrote {cfg.out}/toy.png, metrics.json, data.npy, teacher_4.npy, teacher_128.npy, student.npy")
    return metrics


def _config_hash(cfg, dataset, aided):
    fields = {k: v for k, v in sf.dataclasses.asdict(cfg).items() if k not in sf.RESUMABLE_FIELDS}
    key = json.dumps(dict(fields, dataset=dataset, teacher=TEACHER, data_aided=aided), sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def plot(samples, data, curves, ref4, ref128, student, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("data", data), ("teacher, 4 steps", samples["teacher 4 steps"]),
              ("teacher, 128 steps", samples["teacher 128 steps"]), (f"student: {student}", samples[student])]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.4))
    for ax, (title, x) in zip(axes, panels):
        x = x[:5000].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=0.6, alpha=0.5, color="k", rasterized=True)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-3, 3); ax.set_ylim(-3, 3); ax.set_aspect("equal"); ax.set_xticks([]); ax.set_yticks([])
    ax = axes[4]
    for name, c in curves.items():
        steps = [p["step"] for p in c]
        line, = ax.plot(steps, [p["ema"] for p in c], label=f"{name} (EMA)")
        ax.plot(steps, [p["raw"] for p in c], ls=":", color=line.get_color(), label=f"{name} (raw)")
    ax.axhline(ref4, color="tab:red", ls="--", lw=1, label="teacher 4 steps")
    ax.axhline(ref128, color="tab:green", ls="--", lw=1, label="teacher 128 steps")
    ax.set_yscale("symlog", linthresh=1e-4)  # the unbiased estimate can dip below zero at the noise floor
    ax.set_xlabel("iteration"); ax.set_ylabel("energy distance to data")
    ax.set_title("distance vs iteration (5k-sample estimate, noise ~3e-4)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except sf.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
