"""run_toy.py -- the laptop demo: distil a 2-D flow-matching teacher into a four-step generator with SiD.

    python run_toy.py                       # checkerboard, about 2 min on 2 CPU cores: out/toy/checkerboard/
    python run_toy.py --dataset moons       # also: 8gaussians, spiral; each in its own out/toy/<dataset>/
    python run_toy.py --compare             # + DMD, alpha 1.2, 1 step, uniform k, data-aided, side by side
    python run_toy.py --dataset digits      # a SANA-architecture DiT on 8x8 digits: out/digits/

1. train (or load the cached) teacher: an MLP velocity field fitted by flow matching (D8) on the 2-D data;
2. distil it with sid_flow.distill -- the same loss and loop as the DiT teachers, through sid_flow.ToyBackbone;
3. measure the energy distance (D15) of every sampler to the data, with its standard error; write the table, the
   figure (toy.png) and the samples. A command's results go to OUT/<dataset and the flags that change them>/; the
   teacher and the runs are cached in OUT and reused by the same command.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn

import sid_flow as sf

# ------------------------------------------------------------------------------------------------------------------
# 2-D data: each dataset maps uniforms u (n, dims) in [0, 1) to samples (n, 2) float32, so that the same map draws
# i.i.d. training batches (u from a torch.Generator) and low-discrepancy evaluation sets (u from a scrambled Sobol
# sequence, see the metric below)
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


DATASETS = {"checkerboard": (checkerboard, 3), "8gaussians": (eight_gaussians, 3), "moons": (moons, 4),
            "spiral": (spiral, 3)}  # name -> (map from uniforms, number of uniforms per sample)


def draw(dataset, n, generator):
    """n i.i.d. samples (n, 2) of a dataset, from a torch.Generator: the teacher's training data."""
    f, dims = DATASETS[dataset]
    return f(torch.rand(n, dims, generator=generator))


def sobol(n, dims, seed):
    """n points (n, dims) of a Sobol sequence with a random (Owen) scramble: each point is uniform on [0, 1)^dims,
    and together they cover it far more evenly than independent draws."""
    return torch.quasirandom.SobolEngine(dims, scramble=True, seed=seed).draw(n)

# ------------------------------------------------------------------------------------------------------------------
# The metric: energy distance (D15) -- zero iff the two distributions are equal
#
#   ED(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|.   In 2-D, |v| = (pi/2) E_theta |<theta, v>| over directions theta,
#   so ED is (pi/2) times the mean over directions of the 1-D energy distance of the projections, and each 1-D one is
#   exact in O(N log N) from sorted samples.
#
#   With independent samples the estimate's noise is ~1e-4 at 24k samples, as large as the distances it should
#   resolve. So the demo evaluates randomised quasi-Monte Carlo: every sampler's input noise and the reference data
#   come from scrambled Sobol points (a sampler is a fixed function of its input noise), R independent scrambles
#   give R independent estimates, and their mean +- standard error is reported: ~100x less noise at equal cost.
#   Points of one Sobol set are not independent, so the within-set means use all n^2 pairs (the V-statistic, >= 0;
#   its bias is the "data" row's distance, ~5e-6 at 4096 points); the U-statistic is for independent samples.
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


def energy_distance(x, y, directions=128, independent=True):
    """Energy distance between samples x (n, 2) and y (m, 2), float64, via `directions` projections in [0, pi).
    independent: the unbiased U-statistic for i.i.d. samples (it can dip below zero); False: the V-statistic, for
    quasi-Monte Carlo sets."""
    theta = torch.arange(directions, dtype=torch.float64) * (math.pi / directions)  # (M,)
    u = torch.stack([theta.cos(), theta.sin()], 1)  # (M, 2) unit directions
    px, py = u @ x.double().T, u @ y.double().T  # (M, n), (M, m) projections
    n, m = px.shape[1], py.shape[1]
    pairs = (lambda k: k * (k - 1)) if independent else (lambda k: k * k)  # ordered pairs i != j, or all of them
    ed_1d = (2 * _sum_abs_between(px, py) / (n * m) - 2 * _sum_abs_within(px) / pairs(n)
             - 2 * _sum_abs_within(py) / pairs(m))  # (M,) the 1-D energy distances
    return (math.pi / 2) * ed_1d.mean().item()


DIRECTIONS = 32  # for the demo's table: quadrature error ~4e-4 of the distance, below its standard error


class Evaluation:
    """R independent randomised-QMC replicates: replicate r holds a reference set of `ref_factor` x n data points
    and n input-noise points (n, 2 max_steps) for the samplers, from independently scrambled Sobol sequences."""

    def __init__(self, dataset, n, replicates=4, seed=0, max_steps=4, ref_factor=4):
        f, dims = DATASETS[dataset]
        base = 10_000 + 100 * seed  # never the training stream
        self.data = [f(sobol(ref_factor * n, dims, base + r)) for r in range(replicates)]  # R x (4n, 2)
        self.twin = [f(sobol(n, dims, base + 50 + r)) for r in range(replicates)]  # another draw of the data
        self.noise = [normal(sobol(n, 2 * max_steps, base + 80 + r)) for r in range(replicates)]  # R x (n, 2K)

    def inputs(self, r, K):
        """(z, draw) of replicate r for a K-step sampler: z (n, 2), and draw(x) returns the next re-noising (n, 2)."""
        noise = self.noise[r]  # (n, 2K): z, then one re-noising draw per later step
        later = iter(noise[:, 2 * k:2 * k + 2].contiguous() for k in range(1, K))
        return noise[:, :2].contiguous(), lambda x: next(later)

    def samples(self, sampler, K):
        """sampler(z, draw) -> (n, 2), once per replicate: a list of R sample sets."""
        return [sampler(*self.inputs(r, K)) for r in range(len(self.noise))]

    def distance(self, xs):
        """(mean, standard error) over the replicates of the energy distance of xs (R sets) to the data."""
        eds = torch.tensor([energy_distance(x, y, DIRECTIONS, independent=False) for x, y in zip(xs, self.data)])
        return eds.mean().item(), (eds.std() / math.sqrt(len(eds))).item()

# ------------------------------------------------------------------------------------------------------------------
# The teacher: an MLP trained by flow matching (D8), cached in --out
# ------------------------------------------------------------------------------------------------------------------

# the teacher's recipe, in one place: random Fourier features of x_t (frequencies ~ N(0, fourier_scale^2)) let the
# MLP draw the squares' sharp edges in the time a plain MLP draws round blobs (README, "Toy results")
TEACHER = dict(width=128, depth=4, fourier=32, fourier_scale=2.0, iters=2500, batch=2048, lr=3e-3)


class FourierMLP(sf.ToyMLP):
    """sf.ToyMLP with sin and cos of x_t B added to its input, B (2, fourier) fixed at construction (a buffer, saved
    with the weights). Same interface: `features` is the last hidden layer, `head` the velocity."""

    def __init__(self, width, depth, fourier, fourier_scale):
        super().__init__(width=width, depth=depth)
        self.body[0] = nn.Linear(2 + 2 * fourier + self.config["tdim"], width)  # x_t, its features, the time's
        g = torch.Generator().manual_seed(0)
        self.register_buffer("B", fourier_scale * torch.randn(2, fourier, generator=g))  # (2, F)

    def features(self, x_t, t):
        proj = x_t @ self.B  # (B, F)
        return self.body(torch.cat([x_t, proj.sin(), proj.cos(), self.embed_t(t)], dim=1))  # (B, width)


def cached(path, recipe, make, train):
    """make() with the weights saved at `path` when they were trained by the same recipe (0 s), else train() -> net,
    saved there with its recipe. Returns (net, seconds spent training)."""
    if os.path.exists(path):
        ck = torch.load(path, weights_only=False)
        if ck["recipe"] == recipe:
            net = make()
            net.load_state_dict(ck["state"])
            return net, 0.0
    t0 = time.time()
    net = train()
    sf.atomic_save(dict(recipe=recipe, state=net.state_dict()), path)
    return net, time.time() - t0


def fit(net, batch_loss, iters, lr, desc, progress):
    """Adam with a one-cycle learning rate on batch_loss() for `iters` steps: how both teachers are trained."""
    from tqdm.auto import tqdm
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters, pct_start=0.05)
    for _ in tqdm(range(iters), desc=desc, disable=not progress, dynamic_ncols=True):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net


def train_teacher(dataset, seed, path, progress=True):
    """The 2-D teacher: an MLP fitted by flow matching (D8) on fresh draws of the data; cached at `path`."""
    make = lambda: FourierMLP(*(TEACHER[k] for k in ("width", "depth", "fourier", "fourier_scale")))  # noqa: E731

    def train():
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = make()

        def batch_loss():
            x0 = draw(dataset, TEACHER["batch"], g)  # (B, 2) the teacher's training data
            eps = torch.randn(x0.shape, generator=g)  # (B, 2)
            t = torch.rand(x0.shape[0], generator=g)  # (B,) uniform times for the teacher
            return sf.flow_matching_loss(net(sf.add_noise(x0, eps, t), t), x0, eps, t).mean()
        return fit(net, batch_loss, TEACHER["iters"], TEACHER["lr"], "teacher", progress)

    return cached(path, dict(TEACHER, dataset=dataset, seed=seed), make, train)

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


# ==================================================================================================================
# --dataset digits: a DiT teacher on real images (scikit-learn's 1,797 handwritten 8x8 digits), distilled with the
# same loop and the same SANA adapter as the big teachers, measured like the paper measures (FID -> a Frechet
# distance in a digit classifier's feature space; CLIP score -> that classifier's accuracy on the requested class)
# ==================================================================================================================

DIGITS = dict(layers=3, heads=4, head_dim=16, patch=2, teacher_iters=2500, batch=128, lr=1e-3, p_uncond=0.1,
              guidance=2.0, n_per_class=200, classifier_iters=1500, cost_iters=10)  # teacher, metric, timing
NULL_CLASS = 10  # the "empty prompt": the CFG unconditional branch


class DigitsBackbone(sf.SanaBackbone):
    """Pixels as latents (1, 8, 8) in [-1, 1]; the class as a one-token caption (one-hot over 10 digits + the null
    class). Everything else -- the velocity call, CFG, the prompt bank -- is SANA's adapter, unchanged."""

    def __init__(self, teacher, device):
        self.pipe, self.device, self.resolution, self.max_sequence_length = None, device, 8, None
        self.teacher = teacher.to(device).requires_grad_(False).eval()
        self.sample_shape = (1, 8, 8)
        self.prompts, self.bank, self.uncond, self.data = [], None, None, None

    def encode(self, prompts):
        idx = torch.tensor([int(p) if p else NULL_CLASS for p in prompts], device=self.device)
        embeds = torch.nn.functional.one_hot(idx, 16).float()[:, None]  # (B, 1, 16)
        return {"embeds": embeds, "mask": torch.ones(len(prompts), 1, device=self.device)}

    def decode(self, x):
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, 8, 8, 1)


def digits_split(seed=0):
    """(x_teacher, y_teacher, x_held, y_held): images (N, 1, 8, 8) in [-1, 1]. The classifier's split is never
    shown to the teacher."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def digits_teacher(x, y, path, progress):
    """The class-conditional flow-matching teacher (D8), with 10% null-class dropout for CFG; cached at `path`."""
    from diffusers import SanaTransformer2DModel
    recipe = {k: DIGITS[k] for k in ("layers", "heads", "head_dim", "patch", "teacher_iters", "batch", "lr", "p_uncond")}
    recipe["n"] = len(x)
    make = lambda: SanaTransformer2DModel(  # noqa: E731
        patch_size=DIGITS["patch"], in_channels=1, out_channels=1, num_layers=DIGITS["layers"],
        num_attention_heads=DIGITS["heads"], attention_head_dim=DIGITS["head_dim"],
        num_cross_attention_heads=DIGITS["heads"], cross_attention_head_dim=DIGITS["head_dim"],
        cross_attention_dim=DIGITS["heads"] * DIGITS["head_dim"], caption_channels=16, sample_size=8)

    def train():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        net = make()
        bb = DigitsBackbone(net, torch.device("cpu"))  # for its forward() and encode(); the net is trained below
        net.requires_grad_(True).train()

        def batch_loss():
            idx = torch.randint(len(x), (DIGITS["batch"],), generator=g)
            labels = torch.where(torch.rand(len(idx), generator=g) < DIGITS["p_uncond"], NULL_CLASS, y[idx])
            cond = bb.encode([str(int(c)) if c < 10 else "" for c in labels])
            x0, t = x[idx], torch.rand(len(idx), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            return sf.flow_matching_loss(bb.forward(net, sf.add_noise(x0, eps, t), t, cond, 1.0), x0, eps, t).mean()
        return fit(net, batch_loss, DIGITS["teacher_iters"], DIGITS["lr"], "digit teacher", progress).eval()

    return cached(path, recipe, make, train)


class DigitClassifier(torch.nn.Module):
    """The metric's network: an MLP on 64 pixels; `features` (128-d) are what the Frechet distance compares."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.SiLU(),
                                        torch.nn.Linear(256, 128), torch.nn.SiLU())
        self.head = torch.nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(DIGITS["classifier_iters"]):
        idx = torch.randint(len(x), (128,), generator=g)
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)  # light noise: robust to generated pixels
        loss = torch.nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


def frechet_distance(f1, f2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) between Gaussians fitted to two feature sets."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(c1)
    s1 = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T  # C1^1/2
    cross = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (c1.trace() + c2.trace() - 2 * cross).item()


def step_cost(cfg, bb, iters=10):
    """Wall time of one SiD iteration against the sum of the network passes it makes, each timed alone:
    K forwards without gradient (roll-out + the fake phase's sample), the fake update (forward + backward, CFG
    batch), the generator step (forward + backward), teacher and fake forwards with their input-backward (CFG)."""
    gen, fake, _ = sf.make_students(cfg, bb)
    opt_g, opt_f = sf.make_optimizers(cfg, gen, fake)
    rng = torch.Generator().manual_seed(0)
    B = cfg.batch_size
    cond = bb.encode([str(i % 10) for i in range(B)])
    x, t = torch.randn(B, 1, 8, 8), torch.rand(B)

    def timed(fn, n=iters):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def fwd():
        with torch.no_grad():
            bb.velocity(gen, x, t, cond, 1.0)

    def fwd_bwd(net, guidance):
        return lambda: bb.velocity(net, x, t, cond, guidance).sum().backward()

    def input_bwd(net, guidance):
        def run():
            xi = x.clone().requires_grad_(True)
            bb.velocity(net, xi, t, cond, guidance).sum().backward(inputs=[xi])
        return run

    passes = (cfg.steps * timed(fwd) + cfg.fake_updates * timed(fwd_bwd(fake, cfg.cfg_train_fake))
              + timed(fwd_bwd(gen, 1.0)) + timed(input_bwd(bb.teacher, cfg.cfg_eval_real))
              + timed(input_bwd(fake, cfg.cfg_eval_fake)))
    iteration = timed(lambda: sf.sid_iteration(cfg, bb, fake, gen, opt_f, opt_g, rng))
    return dict(iteration=iteration, passes=passes, ratio=iteration / passes)


def digits_inputs(bb):
    """What every digits sampler is scored on: the requested classes (N,) (DIGITS['n_per_class'] of each), their
    conditioning, and the initial noise (N, 1, 8, 8) all samplers share."""
    labels = torch.arange(10).repeat_interleave(DIGITS["n_per_class"])  # (N,)
    z = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(10_000))
    return labels, bb.encode([str(int(c)) for c in labels]), z


def student_samples(bb, net, cond, z, K):
    """A distilled generator's K-step samples from the shared noise z (re-noising draws from seed 1)."""
    return sf.generate(lambda xx, tt: bb.velocity(net, xx, tt, cond, 1.0), z, K, "fresh",
                       sf.gaussian(torch.Generator().manual_seed(1)))


class DigitsBench:
    """The digits benchmark's fixed parts: the teacher (trained or loaded from OUT), the held-out classifier, the
    real reference features, and measure(x, labels) -> {fd, acc}."""

    def __init__(self, cfg, data_aided=False):
        os.makedirs(cfg.out, exist_ok=True)
        self.x, self.y, x_h, y_h = digits_split()
        self.teacher_path = os.path.join(cfg.out, "teacher-digits.pt")
        teacher, self.t_teacher = digits_teacher(self.x, self.y, self.teacher_path, cfg.progress)
        self.bb = bb = DigitsBackbone(teacher, torch.device("cpu"))
        if data_aided:  # the teacher's own training images as the real data, their labels as the prompts
            bb.set_prompts([str(int(c)) for c in self.y])
            bb.data = self.x
        else:
            bb.set_prompts([str(c) for c in range(10)])
        t0 = time.time()
        self.clf = train_classifier(x_h, y_h)
        with torch.no_grad():
            self.ref = self.clf.features(self.x)  # the reference set: real digits
            self.clf_acc = (self.clf(self.x).argmax(1) == self.y).float().mean().item()
        self.t_clf = time.time() - t0

    def measure(self, x, labels):
        with torch.no_grad():
            return dict(fd=frechet_distance(self.clf.features(x), self.ref),
                        acc=(self.clf(x).argmax(1) == labels).float().mean().item())


def main_digits(args, overrides):
    t_start = time.time()
    cfg = sf.make_config("digits", **overrides)
    bench = DigitsBench(cfg, args.data_aided)
    bb, t_teacher, t_clf, clf_acc, ref = bench.bb, bench.t_teacher, bench.t_clf, bench.clf_acc, bench.ref
    labels, cond, z = digits_inputs(bb)
    measure = lambda x: bench.measure(x, labels)  # noqa: E731

    rows, samples = [], {}
    t0 = time.time()
    for w in (1.0, DIGITS["guidance"]):
        for n in (1, 2, 4, 8, 16, 32):
            x = sf.euler_sample(lambda xx, tt: bb.velocity(bb.teacher, xx, tt, cond, w), z, n)
            rows.append(dict(sampler="teacher (Euler)", guidance=w, steps=n, **measure(x)))
            samples[f"teacher, {n} steps, w={w:g}"] = x
    t_teacher_eval = time.time() - t0
    students = {"SiD, w=2": dict(), "SiD, w=2, 1 step": dict(steps=1),
                "SiD, w=1": dict(cfg_train_fake=1.0, cfg_eval_fake=1.0, cfg_eval_real=1.0)}
    t_distill = {}
    for name, extra in students.items():
        scfg = sf.make_config("digits", **{**overrides, **extra})
        scfg.out = run_folder(cfg.out, name, scfg, "digits", args.data_aided)
        t0 = time.time()
        res = sf.distill(scfg, bb)
        t_distill[name] = time.time() - t0
        for kind in ("ema", "generator"):
            x = student_samples(bb, res[kind], cond, z, scfg.steps)
            rows.append(dict(sampler=f"{name} ({kind})", guidance=scfg.cfg_eval_real, steps=scfg.steps, **measure(x)))
            samples[f"{name} ({kind})"] = x
    cost = step_cost(sf.make_config("digits", **overrides), bb, DIGITS["cost_iters"])
    seconds = dict(teacher=t_teacher, classifier=t_clf, teacher_eval=t_teacher_eval, distill=t_distill,
                   total=time.time() - t_start)

    print(f"\ndigits: Frechet distance in the classifier's features to the {len(ref)} real teacher-split digits, "
          f"and class accuracy (classifier accuracy on real digits: {clf_acc:.3f})")
    print(f"{'sampler':<32} {'guidance':>8} {'steps':>5} {'FD':>9} {'accuracy':>9}")
    for r in rows:
        print(f"{r['sampler']:<32} {r['guidance']:8.1f} {r['steps']:5d} {r['fd']:9.3f} {r['acc']:9.3f}")
    print(f"step cost: one SiD iteration {cost['iteration'] * 1e3:.0f} ms, its network passes alone "
          f"{cost['passes'] * 1e3:.0f} ms, ratio {cost['ratio']:.3f}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" if not isinstance(v, dict) else
                               ", ".join(f"{kk} {vv:.1f} s" for kk, vv in v.items()) for k, v in seconds.items()))
    metrics = dict(rows=rows, step_cost=cost, seconds=seconds, classifier_accuracy=clf_acc,
                   command="python run_toy.py " + " ".join(sys.argv[1:]))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_digits(samples, bench.x, labels, os.path.join(cfg.out, "digits.png"))
    print(f"wrote {cfg.out}/digits.png, metrics.json")
    return metrics


# ==================================================================================================================
# --dataset digits --guidance-study: ways to distil a guided teacher, side by side (derivation.md, section 7, D17).
# Every strategy distils the same teacher, meant to reproduce its guidance-2 samples, once as a four-step and once as
# a one-step generator; the guided teacher's own samplers, and a diagnostic sampler that targets the tilted q_{w,t} of
# (D17) at every t, give the reference rows. Rows run in parallel worker processes (one thread each).
# ==================================================================================================================

LSG_2 = dict(cfg_train_fake=2.0, cfg_eval_fake=2.0, cfg_eval_real=2.0)  # SiD-LSG: one scale for all three calls
EVERY_T = dict(cfg_t_min=0.0, cfg_t_max=1.0)  # no guidance interval
STRATEGIES = {  # name -> Config fields over the digits preset
    "SiD-LSG, CFG 2 on all three": dict(LSG_2, **EVERY_T),
    "CFG 2 on the teacher only": dict(cfg_train_fake=1.0, cfg_eval_fake=1.0, cfg_eval_real=2.0, **EVERY_T),
    "Zero-CFG": dict(cfg_train_fake=0.0, cfg_eval_fake=0.0, cfg_eval_real=1.0, **EVERY_T),
    "Anti-CFG, fake at -1": dict(cfg_train_fake=1.0, cfg_eval_fake=-1.0, cfg_eval_real=1.0, **EVERY_T),
    "lower scale: teacher at 1.5": dict(cfg_train_fake=1.0, cfg_eval_fake=1.0, cfg_eval_real=1.5, **EVERY_T),
    "SiD-LSG in t [0.2, 0.6]": dict(LSG_2, cfg_t_min=0.2, cfg_t_max=0.6),
}
STUDY = dict(batch_size=64)  # over the preset for every strategy: half the preset's batch keeps the study short
LANGEVIN_SNR = (0.1, 0.2)  # the diagnostic's corrector strengths (one Langevin step after each Euler step)


def langevin_corrected_sample(velocity_fn, z, steps, snr, rng):
    """The teacher's Euler steps, each followed (before t = 0) by one Langevin step at the new time under the same
    velocity read as a score (D5): x <- x + d s + sqrt(2 d) n, d = 2 (snr |n| / |s|)^2 per sample (the corrector of
    Song et al., arXiv:2011.13456). Under a guided velocity the corrections target q_{w,t} of (D17) at every t."""
    x, ts = z, torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(len(x))  # (B,)
            if i > 0:
                s = sf.velocity_to_score(x, t, velocity_fn(x, t))
                n = torch.randn(x.shape, generator=rng)
                d = 2 * (snr * n.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)) ** 2  # (B,)
                x = x + d.view(-1, 1, 1, 1) * s + (2 * d).sqrt().view(-1, 1, 1, 1) * n
            x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, t)
    return x  # (B, 1, 8, 8)


def study_tasks(overrides):
    """(row name, what to run, its arguments), slowest first so that the workers finish together."""
    w = DIGITS["guidance"]
    tasks = [(f"{name}, {K} step{'s' * (K > 1)}", "student", dict(name=name, K=K, fields={
              **overrides, **STUDY, **fields, "steps": K})) for K in (4, 1) for name, fields in STRATEGIES.items()]
    tasks += [(f"teacher, 32 Euler steps + Langevin snr {r}, w={w:g}", "langevin", dict(w=w, snr=r))
              for r in LANGEVIN_SNR]
    tasks += [(f"teacher, {n} Euler step{'s' * (n > 1)}, w={w:g}", "euler", dict(w=w, n=n, interval=(0.0, 1.0)))
              for n in (32, 4, 1)]
    tasks += [(f"teacher, 32 Euler steps, w={w:g} in t [0.2, 0.6]", "euler", dict(w=w, n=32, interval=(0.2, 0.6))),
              ("teacher, 32 Euler steps, w=1", "euler", dict(w=1.0, n=32, interval=(0.0, 1.0)))]
    return tasks


_WORKER = {}  # a study worker's own: the teacher's backbone, the conditioning and noise, OUT; built once per process


def study_worker_init(digits, out):
    """Start a worker process: one thread, the parent's DIGITS settings (a test shrinks them), the cached teacher."""
    torch.set_num_threads(1)
    DIGITS.update(digits)
    x, y, _, _ = digits_split()
    bb = DigitsBackbone(digits_teacher(x, y, os.path.join(out, "teacher-digits.pt"), False)[0], torch.device("cpu"))
    bb.set_prompts([str(c) for c in range(10)])
    _, cond, z = digits_inputs(bb)
    _WORKER.update(bb=bb, cond=cond, z=z, out=out)


def study_row(task):
    """One row of the study, in a worker process: (name, samples (N, 1, 8, 8), seconds, iterations trained)."""
    name, kind, a = task
    bb, cond, z, out = (_WORKER[k] for k in ("bb", "cond", "z", "out"))
    t0, trained = time.time(), 0
    if kind == "student":
        cfg = sf.make_config("digits", **{**a["fields"], "progress": False})
        cfg.out = run_folder(out, f"{a['name']}-{a['K']}", cfg, "digits")
        trained = cfg.iters - iterations_done(cfg.out)
        samples = student_samples(bb, sf.distill(cfg, bb)["ema"], cond, z, a["K"])
    else:
        interval = a.get("interval", (0.0, 1.0))

        def v(xx, tt):  # the teacher's guided velocity, guidance only inside the interval (D17)
            return bb.velocity(bb.teacher, xx, tt, cond, sf.guidance_scale(a["w"], tt, *interval))
        samples = (sf.euler_sample(v, z, a["n"]) if kind == "euler" else
                   langevin_corrected_sample(v, z, 32, a["snr"], torch.Generator().manual_seed(5)))
    return name, samples, time.time() - t0, trained


def main_guidance_study(args, overrides):
    import concurrent.futures
    import multiprocessing
    t_start = time.time()
    cfg = sf.make_config("digits", **overrides)
    bench = DigitsBench(cfg)  # trains (or loads) the teacher before any worker needs it
    labels = digits_inputs(bench.bb)[0]
    tasks = study_tasks({k: v for k, v in overrides.items() if v is not None})
    workers = max(1, min(len(tasks), os.cpu_count() or 1))
    print(f"guidance study: {len(tasks)} rows on {workers} worker processes")
    done = {}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=study_worker_init, initargs=(dict(DIGITS), cfg.out)) as pool:
        jobs = [pool.submit(study_row, task) for task in tasks]
        for job in concurrent.futures.as_completed(jobs):
            name, x, seconds, trained = job.result()
            done[name] = dict(samples=x, seconds=seconds, trained=trained, **bench.measure(x, labels))
            if cfg.progress:
                print(f"  {name}: FD {done[name]['fd']:.2f}, accuracy {done[name]['acc']:.3f} ({seconds:.0f} s)")
    rows = [dict(row=name, steps=_steps_of(name), **{k: done[name][k] for k in ("fd", "acc", "seconds", "trained")})
            for name, _, _ in tasks]
    ref = done[f"teacher, 32 Euler steps, w={DIGITS['guidance']:g}"]
    for r in rows:
        r["fd_ratio"] = r["fd"] / ref["fd"]
    seconds = dict(teacher=bench.t_teacher, classifier=bench.t_clf, rows=sum(r["seconds"] for r in rows),
                   wall=time.time() - t_start)
    print_study(rows, seconds, workers)
    arrays = {name: done[name]["samples"].numpy() for name, _, _ in tasks}
    np.savez_compressed(os.path.join(cfg.out, "samples.npz"), labels=labels.numpy(), real=bench.x.numpy(), **arrays)
    metrics = dict(rows=rows, seconds=seconds, workers=workers, strategies=STRATEGIES, study=STUDY,
                   command="python run_toy.py " + " ".join(sys.argv[1:]))
    with open(os.path.join(cfg.out, "guidance-study.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_study(rows, {k: v["samples"] for k, v in done.items()}, bench.x, labels,
               os.path.join(cfg.out, "guidance.png"))
    print(f"wrote {cfg.out}/guidance-study.json, samples.npz, guidance.png")
    return metrics


def _steps_of(name):
    return int(re.search(r"(\d+) (?:Euler )?steps?", name).group(1))


def print_study(rows, seconds, workers):
    print(f"\nguidance study: FD to the real digits and class accuracy; every row's samples are in samples.npz")
    print(f"{'row':<58} {'FD':>8} {'accuracy':>9} {'FD / teacher-32 w=2':>20} {'seconds':>8}")
    for r in rows:
        print(f"{r['row']:<58} {r['fd']:8.2f} {r['acc']:9.3f} {r['fd_ratio']:20.2f} {r['seconds']:8.0f}")
    print(f"time: teacher {seconds['teacher']:.0f} s (0: cached), classifier {seconds['classifier']:.0f} s, rows "
          f"{seconds['rows']:.0f} s of worker time on {workers} workers, wall {seconds['wall']:.0f} s")


def plot_study(rows, samples, real, labels, path):
    """Top: eight samples per class of the real digits and of the telling rows. Bottom: every row on the
    FD-accuracy plane, a colour per strategy, a marker per sampler kind (rows below 0.95 accuracy are listed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = DIGITS["guidance"]
    shown = [f"teacher, 32 Euler steps, w={w:g}", f"teacher, 32 Euler steps + Langevin snr {LANGEVIN_SNR[-1]}, w={w:g}",
             f"{next(iter(STRATEGIES))}, 4 steps", "SiD-LSG in t [0.2, 0.6], 4 steps",
             "SiD-LSG in t [0.2, 0.6], 1 step"]
    k = min(8, DIGITS["n_per_class"])  # samples shown per class
    fig = plt.figure(figsize=(16, 9))
    grid_spec = fig.add_gridspec(2, len(shown) + 1, height_ratios=(1, 1.1))
    for i, (name, x) in enumerate([("real digits", real[:10 * k])] + [(n, samples[n]) for n in shown]):
        if name == "real digits":
            x = x.view(k, 10, 8, 8).transpose(0, 1)
        else:
            x = torch.cat([x[labels == c][:k] for c in range(10)]).view(10, k, 8, 8)  # class by class
        grid = ((x.permute(1, 2, 0, 3).reshape(8 * k, 80) + 1) / 2).clamp(0, 1)  # k rows of samples, 10 columns
        ax = fig.add_subplot(grid_spec[0, i])
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(name.replace(", w=", "\nw=").replace(" + ", "\n+ ").replace(", 4 steps", "\n4 steps")
                     .replace(", 1 step", "\n1 step").replace(" on all three", "\non all three"), fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid_spec[1, :])
    teachers = [r["row"] for r in rows if r["row"].startswith("teacher")]
    colors = {**dict(zip(STRATEGIES, plt.get_cmap("tab10").colors)),
              **dict(zip(teachers, plt.get_cmap("Dark2").colors))}
    off = []
    for r in rows:
        who = r["row"] if r["row"] in teachers else r["row"].rsplit(", ", 1)[0]
        marker = "^" if who in teachers else ("o" if r["steps"] > 1 else "s")
        if r["acc"] < 0.95:
            off.append(f"{r['row']}: FD {r['fd']:.0f}, accuracy {r['acc']:.2f}")
            continue
        ax.scatter(r["fd"], r["acc"], marker=marker, s=50, color=colors[who], label=r["row"], edgecolors="k",
                   linewidths=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("FD to the real digits (log scale; lower is better)")
    ax.set_ylabel("class accuracy")
    ax.set_title("o: four-step student, s: one-step student, ^: the teacher's samplers"
                 + ("\nnot shown (accuracy < 0.95): " + "; ".join(off) if off else ""), fontsize=8)
    if len(off) < len(rows):
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_digits(samples, real, labels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("real", real[:80])] + [(k, v) for k, v in samples.items()
                                        if k.startswith(("teacher, 4 steps, w=2", "teacher, 32 steps, w=2"))
                                        or k.endswith("(ema)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (title, x) in zip(axes, panels):
        if title != "real":  # 8 samples of each class, one class per column
            x = torch.cat([x[labels == c][:8] for c in range(10)])
            x = x.view(10, 8, 8, 8).permute(1, 0, 2, 3).reshape(80, 8, 8)[:, None]
        grid = ((x[:80, 0] + 1) / 2).clamp(0, 1).reshape(8, 10, 8, 8).permute(0, 2, 1, 3).reshape(64, 80)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# flags of sid_flow.py that mean nothing for these small teachers: run_toy.py does not offer them
NOT_HERE = ("teacher", "device", "precision", "prompts", "resolution", "data", "mode", "lora_rank",
            "grad_checkpointing", "student_guidance", "cfg_train_fake", "cfg_eval_fake", "cfg_eval_real", "cfg_t_min",
            "cfg_t_max")  # the digits' guidance: the preset's, or each strategy's in --guidance-study
NOT_RUN_FLAGS = ("out", "progress", "log_every", "save_every", "eval_every")  # flags that leave the results alone


def parse_args(argv):
    p = sf.Parser(prog="run_toy.py", description=__doc__, epilog=(
        "sid_flow.py's flags for image teachers (--teacher, --prompts, --resolution, --mode, --lora-rank, --cfg-*, "
        "...) are not offered here."))
    p.add_argument("--dataset", default="checkerboard", choices=sorted(DATASETS) + ["digits"],
                   help="a 2-D distribution, or 'digits': the DiT benchmark on real 8x8 images [default: checkerboard]")
    p.add_argument("--compare", action="store_true",
                   help="also distil the variants (DMD, alpha 1.2, one step, uniform k, data-aided) into one table")
    p.add_argument("--guidance-study", action="store_true",
                   help="with --dataset digits: distil the guided teacher by every guidance strategy (SiD-LSG, "
                        "teacher-only CFG, Zero-CFG, Anti-CFG, a lower scale, a guidance interval) at 4 and 1 steps, "
                        "beside the teacher's samplers; one table, OUT/samples.npz, OUT/guidance.png")
    p.add_argument("--data-aided", action="store_true",
                   help="data-aided SiD (D16): the fake network also discriminates true samples from fakes")
    p.add_argument("--n-eval", type=int, default=16384,
                   help="samples per sampler for the energy distance, in 4 replicates [default: 16384]")
    sf.add_config_flags(p, skip=NOT_HERE, presets={"2-D": "toy", "--dataset digits": "digits"}, shown=dict(
        out="out/toy (--dataset digits: out/digits); the results go to OUT/<dataset and flags>/, the cached "
            "teacher and runs stay in OUT", eval_every="0: on the 2-D data, every tenth of --iters"))
    args, rest = p.parse_known_args(argv)
    if rest:  # say why a flag of sid_flow.py is not here rather than only that it is unknown
        flag = rest[0].split("=")[0]
        if flag.startswith("--") and flag[2:].replace("-", "_") in NOT_HERE:
            p.error(f"{flag} is a sid_flow.py flag for image teachers; it means nothing for run_toy.py's teachers")
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


RUN_FLAGS = ("dataset", "compare", "n_eval", "data_aided", "guidance_study")  # run_toy.py's own: not Config fields


def config_overrides(args):
    """The Config fields the command line set (None: the preset's)."""
    return {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}


def run_name(args, overrides):
    """The folder of one command's results: the dataset, then every flag given that changes them, e.g.
    'moons', 'checkerboard-compare', 'checkerboard-alpha-1.2' -- so no run overwrites another's figure."""
    parts = [args.dataset] + ["compare"] * args.compare + ["data-aided"] * args.data_aided
    parts += [f"{k.replace('_', '-')}-{v}" for k, v in sorted(overrides.items())
              if v is not None and k not in NOT_RUN_FLAGS]
    parts += [f"n-eval-{args.n_eval}"] if args.n_eval != 16384 else []
    return sf.slug("-".join(parts).replace("/", "_"))  # a '/' in a value ('1/t') would make a subfolder


def main(argv=None):
    args = parse_args(argv)
    overrides = config_overrides(args)
    if args.guidance_study:
        if args.dataset != "digits" or args.compare or args.data_aided:
            raise sf.UserError("--guidance-study runs on --dataset digits alone (no --compare, no --data-aided)")
        return main_guidance_study(args, overrides)
    if args.dataset == "digits":
        return main_digits(args, overrides)
    cfg = sf.make_config("toy", **overrides)
    R = 4  # independent replicates of the evaluation
    if args.n_eval < 64 * R:
        raise sf.UserError(f"--n-eval must be at least {64 * R}, got {args.n_eval}")
    t_start = time.time()
    folder = os.path.join(cfg.out, run_name(args, overrides))
    os.makedirs(folder, exist_ok=True)
    teacher_path = os.path.join(cfg.out, f"teacher-{args.dataset}.pt")
    teacher, t_teacher = train_teacher(args.dataset, cfg.seed, teacher_path, cfg.progress)
    if not t_teacher:
        print(f"teacher: loaded from {teacher_path} (trained by an earlier run with the same recipe)")
    real = lambda n, g: draw(args.dataset, n, g)  # noqa: E731  data-aided runs: true samples, the loop's RNG
    backbones = {False: sf.ToyBackbone(teacher), True: sf.ToyBackbone(teacher, real=real)}
    T = lambda x, t: teacher(x, t)  # noqa: E731  the teacher's velocity

    # the evaluation sets: R replicates of scrambled-Sobol data and input noise (see "The metric")
    ev = Evaluation(args.dataset, args.n_eval // R, R, cfg.seed, max_steps=max(4, cfg.steps))
    t0 = time.time()
    samples = {"data (another draw)": ev.twin}  # its distance is the estimator's floor at this n
    for n in (1, 2, 4, 8, 32, 128):
        samples[f"teacher {n} steps"] = ev.samples(lambda z, d, n=n: sf.euler_sample(T, z, n), 1)
    # the teacher's own weights used as a K-step SiD generator: where distillation starts
    samples["teacher as 4-step generator"] = ev.samples(lambda z, d: sf.generate(T, z, 4, cfg.noise, d), 4)
    t_eval = time.time() - t0

    variants = VARIANTS if args.compare else {"SiD": dict(data_aided=args.data_aided)}
    curves, t_distill = {}, {}
    for name, extra in variants.items():
        extra = dict(extra)
        aided = extra.pop("data_aided", False) or args.data_aided
        name = name + (" data-aided" if aided and "data-aided" not in name else "")
        vcfg = sf.make_config("toy", **{**overrides, **extra})
        vcfg.out = run_folder(cfg.out, name, vcfg, args.dataset, aided)
        curve_path, done = os.path.join(vcfg.out, "curve.json"), iterations_done(vcfg.out)
        curve = [p for p in json.load(open(curve_path)) if p["step"] <= done] if os.path.exists(curve_path) else []

        def first_replicate(net, K=vcfg.steps, noise=vcfg.noise):  # the curve: replicate 0 only, cheap
            z, d = ev.inputs(0, K)
            x = sf.generate(lambda x, t: net(x, t), z, K, noise, d)
            return energy_distance(x, ev.data[0], DIRECTIONS, independent=False)

        start = first_replicate(teacher)  # iteration 0: the generator is the teacher
        curves[name] = curve = curve or [dict(step=0, raw=start, ema=start)]

        def on_eval(step, gen, ema, curve=curve, first_replicate=first_replicate):
            curve.append(dict(step=step, raw=first_replicate(gen), ema=first_replicate(ema)))

        vcfg.eval_every = vcfg.eval_every or max(1, vcfg.iters // 10)
        if done >= vcfg.iters:  # nothing to train: say so instead of showing a full progress bar
            print(f"{name}: reusing the finished run in {vcfg.out} ({done} iterations; delete it to retrain)")
            vcfg.progress = False
        t0 = time.time()
        res = sf.distill(vcfg, backbones[aided], on_eval=on_eval)
        t_distill[name] = None if done >= vcfg.iters else time.time() - t0
        with open(curve_path, "w") as f:
            json.dump(curve, f)
        K = f"{vcfg.steps} step{'s' * (vcfg.steps > 1)}"
        for kind, net in (("EMA", res["ema"]), ("raw", res["generator"])):
            samples[f"{name} ({K}, {kind})"] = ev.samples(
                lambda z, d, net=net: sf.generate(lambda x, t: net(x, t), z, vcfg.steps, vcfg.noise, d), vcfg.steps)
    t0 = time.time()
    ed = {name: ev.distance(xs) for name, xs in samples.items()}
    t_eval += time.time() - t0
    t_total = time.time() - t_start

    # ---- report -------------------------------------------------------------------------------------------------
    ref4, ref128 = ed["teacher 4 steps"][0], ed["teacher 128 steps"][0]
    print(f"\nenergy distance to {args.dataset} (lower is better): mean +- standard error over {R} replicates of "
          f"{args.n_eval // R} scrambled-Sobol samples each")
    print(f"{'sampler':<36} {'distance':>10} {'+-':>8} {'/ teacher-128':>14} {'/ teacher-4':>12}")
    for name, (d, se) in ed.items():
        print(f"{name:<36} {d:10.6f} {se:8.6f} {d / ref128:14.3f} {d / ref4:12.4f}")
    trained = ", ".join(f"{k} {'reused' if v is None else f'{v:.1f} s'}" for k, v in t_distill.items())
    print(f"time: teacher {'cached' if t_teacher == 0 else f'{t_teacher:.1f} s'}, {trained}, "
          f"evaluation {t_eval:.1f} s, total {t_total:.1f} s before the figure")

    main_student = next(k for k in samples if k.startswith("SiD") and k.endswith("EMA)"))
    for file, key in (("data", None), ("teacher_4", "teacher 4 steps"), ("teacher_128", "teacher 128 steps"),
                      ("student", main_student)):
        np.save(os.path.join(folder, f"{file}.npy"), (ev.data[0][:ev.noise[0].shape[0]] if key is None
                                                      else samples[key][0]).numpy())
    metrics = dict(dataset=args.dataset, n_eval=args.n_eval, replicates=R,
                   energy_distance={k: v[0] for k, v in ed.items()},
                   standard_error={k: v[1] for k, v in ed.items()}, curves=curves,
                   seconds=dict(teacher=t_teacher, distill=t_distill, evaluation=t_eval, total=t_total),
                   config=sf.dataclasses.asdict(cfg), folder=folder,
                   command="python run_toy.py " + " ".join(sys.argv[1:] if argv is None else argv))
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot({k: v[0] for k, v in samples.items()}, ev.data[0], curves, ed, main_student,
         os.path.join(folder, "toy.png"))
    print(f"wrote {folder}/: toy.png, metrics.json, data.npy, teacher_4.npy, teacher_128.npy, student.npy")
    return metrics


def run_folder(out, name, cfg, dataset, aided=False):
    """One folder per distinct config, OUT/runs/<name>-<hash>: the same command resumes (or reuses) its run, a changed
    flag trains anew."""
    return os.path.join(out, "runs", f"{sf.slug(name)}-{_config_hash(cfg, dataset, aided)}")


def iterations_done(run_dir):
    """Iterations a run folder's checkpoint holds (0 without one), read from its meta, not its weights."""
    path = os.path.join(run_dir, "checkpoint.pt")
    return sf.read_checkpoint_meta(path)["step"] if os.path.exists(path) else 0


def _config_hash(cfg, dataset, aided):
    fields = {k: v for k, v in sf.dataclasses.asdict(cfg).items() if k not in sf.RESUMABLE_FIELDS}
    key = json.dumps(dict(fields, dataset=dataset, teacher=TEACHER, data_aided=aided), sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def plot(samples, data, curves, ed, student, path):
    """Data, the teacher at 4 and 128 Euler steps, the teacher as a 4-step generator (iteration 0), the student,
    and the distance during distillation (replicate 0) against the teacher's, with +- one standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("data", None, data), ("teacher, 4 Euler steps", "teacher 4 steps", samples["teacher 4 steps"]),
              ("teacher, 128 Euler steps", "teacher 128 steps", samples["teacher 128 steps"]),
              ("teacher as 4-step generator (iteration 0)", "teacher as 4-step generator",
               samples["teacher as 4-step generator"]),
              (f"student: {student}", student, samples[student])]
    fig, axes = plt.subplots(1, 6, figsize=(25, 4.6))
    for ax, (title, name, x) in zip(axes, panels):
        x = x[:4096].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=0.8, alpha=0.6, color="k", rasterized=True)
        if name:
            title += f"\ndistance {ed[name][0]:.2e} ± {ed[name][1]:.0e}"
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-3, 3); ax.set_ylim(-3, 3); ax.set_aspect("equal"); ax.set_xticks([]); ax.set_yticks([])
    ax = axes[5]
    for name, c in curves.items():
        steps = [p["step"] for p in c]
        line, = ax.plot(steps, [p["ema"] for p in c], marker=".", label=f"{name} (EMA)")
        ax.plot(steps, [p["raw"] for p in c], ls=":", color=line.get_color(), label=f"{name} (raw)")
    for key, color in (("teacher 4 steps", "tab:red"), ("teacher 128 steps", "tab:green")):
        d, se = ed[key]
        ax.axhline(d, color=color, ls="--", lw=1, label=f"{key}")
        ax.axhspan(d - se, d + se, color=color, alpha=0.2)
    ax.set_yscale("log")  # the V-statistic is never negative
    ax.set_xlabel("iteration"); ax.set_ylabel("energy distance to data")
    ax.set_title("during distillation (replicate 0)", fontsize=10)
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
