"""experiments/digits.py -- SiD on a DiT teacher and real images, measured as the paper measures, on a laptop CPU.

    python experiments/digits.py                    # the benchmark: out/digits/metrics.json, digits.png
    python experiments/digits.py --data-aided       # its students with the teacher's training digits as real
                                                    # data (D17)
    python experiments/digits.py --guidance-study   # six ways to distil the guided teacher, at 4 steps and 1:
                                                    # out/digits/guidance-study.json, samples.npz, guidance.png
    python experiments/digits.py --metric-study     # the run's quality number against the classifier's FD, every
                                                    # sampler above: out/digits/metric-study.json, samples.npz

The teacher: diffusers' SanaTransformer2DModel (3 blocks, width 64, patch 2) trained by flow matching (D8) on 1,200 of
scikit-learn's 1,797 handwritten 8x8 digits -- pixels as latents, the class as a one-token caption, CFG by a null
class -- then distilled with the same sid_flow.distill loop and the same SANA adapter as the real teachers
(DigitsBackbone only swaps the text encoder for a one-hot). The metric stands in for the paper's FID and CLIP score:
an MLP classifier trained on the other 597 digits, which the teacher never saw; the Frechet distance (FD) between its
features of generated and of the real digits, and the fraction of samples it classifies as the requested class.
The teacher and every student are cached in OUT and reused by the same command (a changed flag trains anew).
"""

import concurrent.futures
import contextlib
import copy
import json
import multiprocessing
import os
import re
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import SanaTransformer2DModel
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # sid_flow.py, run_toy.py
import sid_flow as sf  # noqa: E402
from run_toy import NOT_HERE, parse_flags, run_folder, trained  # noqa: E402  helpers shared with the 2-D demo

SKIP = NOT_HERE + ("eval_every",)  # sid_flow.py's flags not offered here: run_toy.py's, and --eval-every (no previews)

# ------------------------------------------------------------------------------------------------------------------
# The teacher: a class-conditional SANA DiT on 8x8 digits, behind sid_flow's SANA adapter
# ------------------------------------------------------------------------------------------------------------------

DIGITS = dict(
    layers=3,
    heads=4,
    head_dim=16,
    patch=2,
    teacher_iters=2500,
    batch=128,
    lr=1e-3,
    p_uncond=0.1,
    guidance=2.0,
    n_per_class=200,
    classifier_iters=1500,
    cost_iters=10,
)  # teacher, metric, timing
TEACHER_KEYS = ("layers", "heads", "head_dim", "patch", "teacher_iters", "batch", "lr", "p_uncond")  # its recipe
TEACHER_SPLIT = 1200  # digits the teacher is trained on; the classifier learns from the other 597
NULL_CLASS = 10  # the "empty prompt": the CFG unconditional branch


class DigitsBackbone(sf.SanaBackbone):
    """Pixels as latents (1, 8, 8) in [-1, 1]; the class as a one-token caption (one-hot over 10 digits + the null
    class). Everything else -- the velocity call, CFG, the prompt bank -- is SANA's adapter, unchanged."""

    def __init__(self, teacher, device):
        self.pipe, self.device, self.resolution = None, device, 8
        self.teacher = teacher.to(device).requires_grad_(False).eval()
        self.sample_shape = (1, 8, 8)
        self.prompts, self.prompt_cache, self.uncond, self.real = [], None, None, None

    def encode(self, prompts):
        idx = torch.tensor([int(p) if p else NULL_CLASS for p in prompts], device=self.device)
        embeds = torch.nn.functional.one_hot(idx, 16).float()[:, None]  # (B, 1, 16)
        return {"embeds": embeds, "mask": torch.ones(len(prompts), 1, device=self.device)}


def digits_split(seed=0):
    """(x_teacher, y_teacher, x_held, y_held): images (N, 1, 8, 8) in [-1, 1]. The classifier's split is never
    shown to the teacher."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:TEACHER_SPLIT], y[:TEACHER_SPLIT], x[TEACHER_SPLIT:], y[TEACHER_SPLIT:]


def teacher_recipe():
    """What the cached teacher, and so every cached student, is keyed on."""
    return dict({k: DIGITS[k] for k in TEACHER_KEYS}, n=TEACHER_SPLIT)


def digits_teacher(x, y, path):
    """The class-conditional flow-matching teacher (D8), with 10% null-class dropout for CFG; cached at `path`.
    Returns (transformer, seconds spent training: 0 when loaded)."""
    torch.manual_seed(0)  # its initial weights
    net = SanaTransformer2DModel(
        patch_size=DIGITS["patch"],
        in_channels=1,
        out_channels=1,
        num_layers=DIGITS["layers"],
        num_attention_heads=DIGITS["heads"],
        attention_head_dim=DIGITS["head_dim"],
        num_cross_attention_heads=DIGITS["heads"],
        cross_attention_head_dim=DIGITS["head_dim"],
        cross_attention_dim=DIGITS["heads"] * DIGITS["head_dim"],
        caption_channels=16,
        sample_size=8,
    )
    bb = DigitsBackbone(net, torch.device("cpu"))  # for its forward() and encode(); the net is trained below
    net.requires_grad_(True).train()
    g = torch.Generator().manual_seed(0)

    def batch_loss():
        idx = torch.randint(len(x), (DIGITS["batch"],), generator=g)
        # CFG training: each caption is dropped to the null class with probability p_uncond
        labels = torch.where(torch.rand(len(idx), generator=g) < DIGITS["p_uncond"], NULL_CLASS, y[idx])
        cond = bb.encode([str(int(c)) if c < 10 else "" for c in labels])
        x0, t = x[idx], torch.rand(len(idx), generator=g)  # (B, 1, 8, 8), (B,) uniform times
        eps = torch.randn(x0.shape, generator=g)
        return sf.flow_matching_loss(bb.forward(net, sf.add_noise(x0, eps, t), t, cond, 1.0), x0, eps, t).mean()

    return trained(net, path, teacher_recipe(), batch_loss, DIGITS["teacher_iters"], DIGITS["lr"], "digit teacher")


# ------------------------------------------------------------------------------------------------------------------
# The metric: FID -> a Frechet distance in a digit classifier's features; CLIP score -> its accuracy on the class
# ------------------------------------------------------------------------------------------------------------------


class DigitClassifier(torch.nn.Module):
    """The metric's network: an MLP on 64 pixels; `features` (128-d) are what the Frechet distance compares."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 128), torch.nn.SiLU()
        )
        self.head = torch.nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y):
    """The classifier, trained on the held-out digits (x, y) with light pixel noise: robust to generated pixels."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(DIGITS["classifier_iters"]):
        idx = torch.randint(len(x), (128,), generator=g)
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)  # (128, 1, 8, 8)
        loss = torch.nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def frechet_distance(f1, f2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) between Gaussians fitted to two feature sets (N, d)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)  # (d,)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)  # (d, d)
    w, v = torch.linalg.eigh(c1)
    s1 = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T  # C1^1/2, symmetric
    # tr (C1^1/2 C2 C1^1/2)^1/2: the symmetric PSD product's eigenvalues, square-rooted and summed
    cross = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (c1.trace() + c2.trace() - 2 * cross).item()


class DigitsBench:
    """The benchmark's fixed parts: the teacher (trained, or loaded from OUT) behind DigitsBackbone, the held-out
    classifier, the real reference features, and measure(x, labels) -> {fd, acc}."""

    def __init__(self, config, data_aided=False):
        os.makedirs(config.out, exist_ok=True)
        self.x, self.y, x_h, y_h = digits_split()
        teacher, self.t_teacher = digits_teacher(self.x, self.y, os.path.join(config.out, "teacher-digits.pt"))
        self.bb = bb = DigitsBackbone(teacher, torch.device("cpu"))
        if data_aided:  # the teacher's own training images as the real data, their labels as the prompts (row for row)
            bb.set_prompts([str(int(c)) for c in self.y])
            bb.real = self.x
        else:
            bb.set_prompts([str(c) for c in range(10)])
        t0 = time.time()
        self.clf = train_classifier(x_h, y_h)
        with torch.no_grad():
            self.ref = self.clf.features(self.x)  # the reference set: the teacher's real digits
            self.clf_acc = (self.clf(self.x).argmax(1) == self.y).float().mean().item()
        self.t_clf = time.time() - t0

    def measure(self, x, labels):
        with torch.no_grad():
            return dict(
                fd=frechet_distance(self.clf.features(x), self.ref),
                acc=(self.clf(x).argmax(1) == labels).float().mean().item(),
            )


def digits_inputs(bb):
    """What every sampler is scored on: the requested classes (N,) (DIGITS['n_per_class'] of each), their
    conditioning, and the initial noise (N, 1, 8, 8) that all samplers share."""
    labels = torch.arange(10).repeat_interleave(DIGITS["n_per_class"])  # (N,)
    z = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(10_000))
    return labels, bb.encode([str(int(c)) for c in labels]), z


def student_samples(bb, net, cond, z, K):
    """A distilled generator's K-step samples from the shared noise z, its re-noising draws from seed 1 (the noises
    (N, K, 1, 8, 8): z, then one fresh draw per later step); the student is called at the backbone's student guidance
    (none), as SiD's students are sampled."""
    g = torch.Generator().manual_seed(1)
    noises = torch.stack([z] + [bb.step_noise(z.shape, g) for _ in range(K - 1)], 1)  # (N, K, 1, 8, 8)
    return sf.generate(lambda xx, tt: bb.velocity(net, xx, tt, cond, bb.student_guidance), noises, "fresh")


def kept(res):
    """[(kind, generator)] of an sf.distill result that get a row: its EMA (none without one: --ema-decay 0), then
    the raw generator."""
    return [(kind, res[kind]) for kind in ("ema", "generator") if res[kind] is not None]


def run_key(data_aided=False):
    """What a student's run folder is keyed on beside its config (run_toy.run_folder); data-aided, its schedule."""
    schedule = dict(freeze=sf.GAN_FREEZE_IMAGES, start=sf.GAN_START_IMAGES) if data_aided else None
    return dict(dataset="digits", teacher=teacher_recipe(), data_aided=data_aided, schedule=schedule)


# Data-aided SiD's schedule counts generated images (D17): the generator frozen for the first 20,000, the adversarial
# term from 40,000 on -- 2% and 4% of the official run of about 1 M images (4,000 iterations of 256). This benchmark's
# 300 iterations of 128 (38,400 images) would never reach the term, so its data-aided students keep the official
# SHARES of their own run: a departure from the official counts, stated in experiments/README.md.
OFFICIAL_RUN_IMAGES = 4_000 * 256


@contextlib.contextmanager
def schedule_scaled_to(images):
    """Inside the block, sf's data-aided schedule scaled from the official run's images to `images`."""
    official = (sf.GAN_FREEZE_IMAGES, sf.GAN_START_IMAGES)
    sf.GAN_FREEZE_IMAGES = round(official[0] * images / OFFICIAL_RUN_IMAGES)
    sf.GAN_START_IMAGES = round(official[1] * images / OFFICIAL_RUN_IMAGES)
    try:
        yield
    finally:
        sf.GAN_FREEZE_IMAGES, sf.GAN_START_IMAGES = official


# ------------------------------------------------------------------------------------------------------------------
# The benchmark: the teacher's Euler sampler against three SiD students, and what one SiD iteration costs
# ------------------------------------------------------------------------------------------------------------------

STUDENTS = {
    "SiD, w=2": dict(),
    "SiD, w=2, 1 step": dict(steps=1),  # name -> Config fields over the command line's
    "SiD, w=1": dict(guidance_train_fake=1.0, guidance_eval_fake=1.0, guidance_eval_real=1.0),
}


def mean_seconds(fn, n):
    """Mean wall time of n calls of fn(), after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def teacher_samples(bb, cond, z):
    """The benchmark's teacher rows from the noise z (N, 1, 8, 8): (name, guidance, steps, samples (N, 1, 8, 8)),
    Euler at 1-32 steps, unguided and at CFG DIGITS['guidance'] (at every t)."""
    for w in (1.0, DIGITS["guidance"]):

        def velocity(xx, tt, w=w):  # the teacher at CFG w
            return bb.velocity(bb.teacher, xx, tt, cond, w)

        for n in (1, 2, 4, 8, 16, 32):
            yield teacher_row(n, w), w, n, sf.euler_sample(velocity, z, n)


def teacher_row(steps, w):
    return f"teacher, {steps} steps, w={w:g}"


def benchmark_students(config, overrides, bb, data_aided):
    """Each of STUDENTS distilled (or reused from OUT/runs/, which sf.Checkpoints writes and resumes): (name, its
    Config, sf.distill's result, seconds)."""
    for name, extra in STUDENTS.items():
        scfg = sf.make_config("digits", **{**overrides, **extra})
        images = scfg.iters * scfg.batch_size * scfg.grad_accum
        with schedule_scaled_to(images) if data_aided else contextlib.nullcontext():
            scfg.out = run_folder(config.out, name, scfg, **run_key(data_aided))[0]
            t0 = time.time()
            res = sf.distill(scfg, bb, runtime=sf.Checkpoints())
        yield name, scfg, res, time.time() - t0


def step_cost(config, bb, iters=10):
    """Wall time of one SiD iteration against the sum of the network passes it makes, each timed alone. Each update
    draws afresh (sid_flow.py, section 6), so per fake update: K forwards without gradient (roll-out + its sample),
    the fake network's forward + backward (CFG batch); then the generator update's K - 1 roll-out forwards, its
    step (forward + backward), teacher and fake forwards with their input-backward (CFG); all once per micro-batch.
    A ratio near 1 says the iteration spends its time in the networks, not in the method's own arithmetic."""
    sid = sf.SiD(config, bb, sf.Runtime())
    gen, fake = sid.generator, sid.fake
    B = config.batch_size
    cond = bb.encode([str(i % 10) for i in range(B)])
    x, t = torch.randn(B, 1, 8, 8), torch.rand(B)

    def timed(fn):
        return mean_seconds(fn, iters)

    def fwd():
        with torch.no_grad():
            bb.velocity(gen, x, t, cond, bb.student_guidance)

    def fwd_bwd(net, guidance):  # a weight update's pass: gradient into the network's weights
        return lambda: bb.velocity(net, x, t, cond, guidance).sum().backward()

    def input_bwd(net, guidance):  # the generator loss's pass through a frozen network: gradient into x_t only
        def run():
            xi = x.clone().requires_grad_(True)
            bb.velocity(net, xi, t, cond, guidance).sum().backward(inputs=[xi])

        return run

    passes = config.grad_accum * (
        (config.fake_updates * config.steps + config.steps - 1) * timed(fwd)
        + config.fake_updates * timed(fwd_bwd(fake, config.guidance_train_fake))
        + timed(fwd_bwd(gen, bb.student_guidance))
        + timed(input_bwd(bb.teacher, config.guidance_eval_real))
        + timed(input_bwd(fake, config.guidance_eval_fake))
    )
    iteration = timed(lambda: sid.iteration(0))
    return dict(iteration=iteration, passes=passes, ratio=iteration / passes)


def benchmark(args, overrides, argv):
    """The table (the teacher's Euler sampler at 1-32 steps, unguided and at CFG DIGITS['guidance']; the STUDENTS,
    EMA and raw), the step-cost ratio, OUT/metrics.json and OUT/digits.png."""
    t_start = time.time()
    config = sf.make_config("digits", **overrides)
    bench = DigitsBench(config, args.data_aided)
    bb = bench.bb
    labels, cond, z = digits_inputs(bb)
    rows, samples = [], {}
    t0 = time.time()
    for name, w, n, x in teacher_samples(bb, cond, z):
        rows.append(dict(sampler="teacher (Euler)", guidance=w, steps=n, **bench.measure(x, labels)))
        samples[name] = x
    t_teacher_eval, t_distill = time.time() - t0, {}
    for name, scfg, res, seconds in benchmark_students(config, overrides, bb, args.data_aided):
        t_distill[name] = seconds
        for kind, net in kept(res):
            x = student_samples(bb, net, cond, z, scfg.steps)
            rows.append(
                dict(
                    sampler=f"{name} ({kind})",
                    guidance=scfg.guidance_eval_real,
                    steps=scfg.steps,
                    **bench.measure(x, labels),
                )
            )
            samples[f"{name} ({kind})"] = x
    cost = step_cost(config, bb, DIGITS["cost_iters"])
    seconds = dict(
        teacher=bench.t_teacher,
        classifier=bench.t_clf,
        teacher_eval=t_teacher_eval,
        distill=t_distill,
        total=time.time() - t_start,
    )

    print(
        f"\ndigits: Frechet distance in the classifier's features to the {len(bench.ref)} real teacher-split "
        f"digits, and class accuracy (classifier accuracy on real digits: {bench.clf_acc:.3f})"
    )
    print(f"{'sampler':<32} {'guidance':>8} {'steps':>5} {'FD':>9} {'accuracy':>9}")
    for r in rows:
        print(f"{r['sampler']:<32} {r['guidance']:8.1f} {r['steps']:5d} {r['fd']:9.3f} {r['acc']:9.3f}")
    print(
        f"step cost: one SiD iteration {cost['iteration'] * 1e3:.0f} ms, its network passes alone "
        f"{cost['passes'] * 1e3:.0f} ms, ratio {cost['ratio']:.3f}"
    )
    print(
        "time: "
        + ", ".join(
            f"{k} {v:.1f} s" if not isinstance(v, dict) else ", ".join(f"{kk} {vv:.1f} s" for kk, vv in v.items())
            for k, v in seconds.items()
        )
    )
    metrics = dict(
        rows=rows, step_cost=cost, seconds=seconds, classifier_accuracy=bench.clf_acc, command=command(argv)
    )
    with open(os.path.join(config.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_digits(samples, bench.x, labels, os.path.join(config.out, "digits.png"))
    print(f"wrote {config.out}/digits.png, metrics.json")
    return metrics


def plot_digits(samples, real, labels, path):
    """Real digits, then the guided teacher at 4 and 32 steps and every student's EMA: 8 samples of each class."""
    panels = [("real", real[:80])] + [
        (k, v)
        for k, v in samples.items()
        if k.startswith(("teacher, 4 steps, w=2", "teacher, 32 steps, w=2")) or k.endswith("(ema)")
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (title, x) in zip(axes, panels, strict=True):
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


# ------------------------------------------------------------------------------------------------------------------
# --guidance-study: ways to distil a guided teacher, side by side (derivation.md, section 7, D18).
# Every strategy distils the same teacher, meant to reproduce its guidance-2 samples, once as a four-step and once as
# a one-step generator; the guided teacher's own samplers, and a diagnostic sampler that targets the tilted q_{w,t} of
# (D18) at every t, give the reference rows. Rows run in parallel worker processes (one thread each).
# ------------------------------------------------------------------------------------------------------------------

LSG_2 = dict(
    guidance_train_fake=2.0, guidance_eval_fake=2.0, guidance_eval_real=2.0
)  # SiD-LSG: one scale for all three calls
EVERY_T = dict(guidance_t_min=0.0, guidance_t_max=1.0)  # no guidance interval
STRATEGIES = {  # name -> Config fields over the digits preset; the three scales are (fake's own update, fake inside
    # the generator loss, teacher inside the generator loss)
    "SiD-LSG, CFG 2 on all three": dict(LSG_2, **EVERY_T),
    "CFG 2 on the teacher only": dict(
        guidance_train_fake=1.0, guidance_eval_fake=1.0, guidance_eval_real=2.0, **EVERY_T
    ),
    "Zero-CFG": dict(guidance_train_fake=0.0, guidance_eval_fake=0.0, guidance_eval_real=1.0, **EVERY_T),
    "Anti-CFG, fake at -1": dict(guidance_train_fake=1.0, guidance_eval_fake=-1.0, guidance_eval_real=1.0, **EVERY_T),
    "lower scale: teacher at 1.5": dict(
        guidance_train_fake=1.0, guidance_eval_fake=1.0, guidance_eval_real=1.5, **EVERY_T
    ),
    "SiD-LSG in t [0.2, 0.6]": dict(LSG_2, guidance_t_min=0.2, guidance_t_max=0.6),
}
STUDY = dict(batch_size=64)  # over the preset for every strategy: half the preset's batch keeps the study short
LANGEVIN_SNR = (0.1, 0.2)  # the diagnostic's corrector strengths (one Langevin step after each Euler step)


def langevin_corrected_sample(velocity_fn, z, steps, snr, rng):
    """The teacher's Euler steps, each followed (before t = 0) by one Langevin step at the new time under the same
    velocity read as a score (D5): x <- x + d s + sqrt(2 d) n, d = 2 (snr |n| / |s|)^2 per sample (the corrector of
    Song et al., arXiv:2011.13456). Under a guided velocity the corrections target q_{w,t} of (D18) at every t."""
    x, ts = z, torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(len(x))  # (B,)
            if i > 0:
                s = sf.velocity_to_score(x, t, velocity_fn(x, t))  # (B, 1, 8, 8)
                n = torch.randn(x.shape, generator=rng)
                d = 2 * (snr * n.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)) ** 2  # (B,) the step size
                x = x + d.view(-1, 1, 1, 1) * s + (2 * d).sqrt().view(-1, 1, 1, 1) * n
            x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, t)
    return x  # (B, 1, 8, 8)


def study_tasks(overrides):
    """(row name, what to run, its arguments), slowest first so that the workers finish together."""
    w = DIGITS["guidance"]
    tasks = [
        (
            f"{name}, {K} step{'s' * (K > 1)}",
            "student",
            dict(name=name, K=K, fields={**overrides, **STUDY, **fields, "steps": K}),
        )
        for K in (4, 1)
        for name, fields in STRATEGIES.items()
    ]
    tasks += [
        (f"teacher, 32 Euler steps + Langevin snr {r}, w={w:g}", "langevin", dict(w=w, snr=r)) for r in LANGEVIN_SNR
    ]
    tasks += [
        (f"teacher, {n} Euler step{'s' * (n > 1)}, w={w:g}", "euler", dict(w=w, n=n, interval=(0.0, 1.0)))
        for n in (32, 4, 1)
    ]
    tasks += [
        (f"teacher, 32 Euler steps, w={w:g} in t [0.2, 0.6]", "euler", dict(w=w, n=32, interval=(0.2, 0.6))),
        ("teacher, 32 Euler steps, w=1", "euler", dict(w=1.0, n=32, interval=(0.0, 1.0))),
    ]
    return tasks


_WORKER = {}  # a study worker's own: the teacher's backbone, the conditioning and noise, OUT; built once per process


def study_worker_init(digits, out):
    """Start a worker process: one thread, the parent's DIGITS settings (a test shrinks them), the cached teacher.
    Its stderr goes nowhere: the workers' progress bars would interleave, and the parent reports every row."""
    torch.set_num_threads(1)
    sys.stderr = open(os.devnull, "w")
    DIGITS.update(digits)
    x, y, _, _ = digits_split()
    bb = DigitsBackbone(digits_teacher(x, y, os.path.join(out, "teacher-digits.pt"))[0], torch.device("cpu"))
    bb.set_prompts([str(c) for c in range(10)])
    _, cond, z = digits_inputs(bb)
    _WORKER.update(bb=bb, cond=cond, z=z, out=out)


def study_row(task):
    """One row of the study, in a worker process: (name, samples (N, 1, 8, 8), seconds, iterations trained)."""
    name, kind, a = task
    bb, cond, z, out = (_WORKER[k] for k in ("bb", "cond", "z", "out"))
    t0, iters_trained = time.time(), 0
    if kind == "student":
        config = sf.make_config("digits", **a["fields"])
        config.out, done = run_folder(out, f"{a['name']}-{a['K']}", config, **run_key())
        iters_trained = config.iters - done
        res = sf.distill(config, bb, runtime=sf.Checkpoints())  # (its run folder reused by the same command)
        student = res["generator"] if res["ema"] is None else res["ema"]  # the EMA (none with --ema-decay 0)
        samples = student_samples(bb, student, cond, z, a["K"])
    else:
        interval = a.get("interval", (0.0, 1.0))

        def v(xx, tt):  # the teacher's guided velocity, guidance only inside the interval (D18)
            return bb.velocity(bb.teacher, xx, tt, cond, sf.guidance_scale(a["w"], tt, *interval))

        samples = (
            sf.euler_sample(v, z, a["n"])
            if kind == "euler"
            else langevin_corrected_sample(v, z, 32, a["snr"], torch.Generator().manual_seed(5))
        )
    return name, samples, time.time() - t0, iters_trained


def guidance_study(args, overrides, argv):
    """Every row of study_tasks on worker processes; the table, OUT/guidance-study.json, OUT/samples.npz (every row's
    samples under its name, the requested labels, the real digits) and OUT/guidance.png."""
    t_start = time.time()
    config = sf.make_config("digits", **overrides)
    bench = DigitsBench(config)  # trains (or loads) the teacher before any worker needs it
    labels = digits_inputs(bench.bb)[0]
    tasks = study_tasks({k: v for k, v in overrides.items() if v is not None})
    workers = max(1, min(len(tasks), os.cpu_count() or 1))
    print(f"guidance study: {len(tasks)} rows on {workers} worker processes")
    done = {}
    spawn = multiprocessing.get_context("spawn")  # fresh processes: no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=spawn, initializer=study_worker_init, initargs=(dict(DIGITS), config.out)
    ) as pool:
        for job in concurrent.futures.as_completed([pool.submit(study_row, task) for task in tasks]):
            name, x, seconds, iters_trained = job.result()
            done[name] = dict(samples=x, seconds=seconds, trained=iters_trained, **bench.measure(x, labels))
            print(f"  {name}: FD {done[name]['fd']:.2f}, accuracy {done[name]['acc']:.3f} ({seconds:.0f} s)")
    rows = [
        dict(row=name, steps=_steps_of(name), **{k: done[name][k] for k in ("fd", "acc", "seconds", "trained")})
        for name, _, _ in tasks
    ]
    ref = done[f"teacher, 32 Euler steps, w={DIGITS['guidance']:g}"]
    for r in rows:
        r["fd_ratio"] = r["fd"] / ref["fd"]
    seconds = dict(
        teacher=bench.t_teacher,
        classifier=bench.t_clf,
        rows=sum(r["seconds"] for r in rows),
        wall=time.time() - t_start,
    )
    print_study(rows, seconds, workers)
    arrays = {name: done[name]["samples"].numpy() for name, _, _ in tasks}
    np.savez_compressed(os.path.join(config.out, "samples.npz"), labels=labels.numpy(), real=bench.x.numpy(), **arrays)
    metrics = dict(
        rows=rows, seconds=seconds, workers=workers, strategies=STRATEGIES, study=STUDY, command=command(argv)
    )
    with open(os.path.join(config.out, "guidance-study.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_study(
        rows, {k: v["samples"] for k, v in done.items()}, bench.x, labels, os.path.join(config.out, "guidance.png")
    )
    print(f"wrote {config.out}/guidance-study.json, samples.npz, guidance.png")
    return metrics


def _steps_of(name):
    return int(re.search(r"(\d+) (?:Euler )?steps?", name).group(1))


def print_study(rows, seconds, workers):
    print("\nguidance study: FD to the real digits and class accuracy; every row's samples are in samples.npz")
    print(f"{'row':<58} {'FD':>8} {'accuracy':>9} {'FD / teacher-32 w=2':>20} {'seconds':>8}")
    for r in rows:
        print(f"{r['row']:<58} {r['fd']:8.2f} {r['acc']:9.3f} {r['fd_ratio']:20.2f} {r['seconds']:8.0f}")
    print(
        f"time: teacher {seconds['teacher']:.0f} s (0: cached), classifier {seconds['classifier']:.0f} s, rows "
        f"{seconds['rows']:.0f} s of worker time on {workers} workers, wall {seconds['wall']:.0f} s"
    )


def plot_study(rows, samples, real, labels, path):
    """Top: eight samples per class of the real digits and of the telling rows. Bottom: every row on the
    FD-accuracy plane, a colour per strategy, a marker per sampler kind (rows below 0.95 accuracy are listed)."""
    w = DIGITS["guidance"]
    shown = [
        f"teacher, 32 Euler steps, w={w:g}",
        f"teacher, 32 Euler steps + Langevin snr {LANGEVIN_SNR[-1]}, w={w:g}",
        f"{next(iter(STRATEGIES))}, 4 steps",
        "SiD-LSG in t [0.2, 0.6], 4 steps",
        "SiD-LSG in t [0.2, 0.6], 1 step",
    ]
    k = min(8, DIGITS["n_per_class"])  # samples shown per class
    fig = plt.figure(figsize=(16, 9))
    grid_spec = fig.add_gridspec(2, len(shown) + 1, height_ratios=(1, 1.1))
    for i, (name, x) in enumerate([("real digits", real[: 10 * k])] + [(n, samples[n]) for n in shown]):
        if name == "real digits":
            x = x.view(k, 10, 8, 8).transpose(0, 1)
        else:
            x = torch.cat([x[labels == c][:k] for c in range(10)]).view(10, k, 8, 8)  # class by class
        grid = ((x.permute(1, 2, 0, 3).reshape(8 * k, 80) + 1) / 2).clamp(0, 1)  # k rows of samples, 10 columns
        ax = fig.add_subplot(grid_spec[0, i])
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(
            name.replace(", w=", "\nw=")
            .replace(" + ", "\n+ ")
            .replace(", 4 steps", "\n4 steps")
            .replace(", 1 step", "\n1 step")
            .replace(" on all three", "\non all three"),
            fontsize=9,
        )
        ax.axis("off")
    ax = fig.add_subplot(grid_spec[1, :])
    teachers = [r["row"] for r in rows if r["row"].startswith("teacher")]
    colors = {
        **dict(zip(STRATEGIES, plt.get_cmap("tab10").colors, strict=False)),  # (more colours than rows)
        **dict(zip(teachers, plt.get_cmap("Dark2").colors, strict=False)),
    }
    off = []
    for r in rows:
        who = r["row"] if r["row"] in teachers else r["row"].rsplit(", ", 1)[0]
        marker = "^" if who in teachers else ("o" if r["steps"] > 1 else "s")
        if r["acc"] < 0.95:
            off.append(f"{r['row']}: FD {r['fd']:.0f}, accuracy {r['acc']:.2f}")
            continue
        ax.scatter(
            r["fd"], r["acc"], marker=marker, s=50, color=colors[who], label=r["row"], edgecolors="k", linewidths=0.4
        )
    ax.set_xscale("log")
    ax.set_xlabel("FD to the real digits (log scale; lower is better)")
    ax.set_ylabel("class accuracy")
    ax.set_title(
        "o: four-step student, s: one-step student, ^: the teacher's samplers"
        + ("\nnot shown (accuracy < 0.95): " + "; ".join(off) if off else ""),
        fontsize=8,
    )
    if len(off) < len(rows):
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# --metric-study: does the run's quality number (sid_flow.py, section 14) rank samplers as the classifier does?
# A data-free run has no real images: its number compares the student with a reference set the teacher draws, so what
# it stands for is the distance to that reference. Every sampler of the benchmark is scored against ONE reference, the
# one sf.Quality draws for the digits preset: by the number exactly as a run computes it (sf.QUALITY_SIZE samples, the
# run's prompts and seeds), and by the classifier's FD to the same reference sampler with DIGITS['n_per_class']
# samples per class on each side (the benchmark's noise, which the teacher rows share with the reference). A run's
# number is one draw of a noisy estimate: the study repeats it on DRAWS evaluation draws (sf.Quality's seed: its
# noises -- the reference set's and the students' re-noising -- and the features'; the run's is seed 0), each with
# its own reference.
# ------------------------------------------------------------------------------------------------------------------

OTHER_SEEDS = 7  # the floor: the reference sampler itself on other noise than the reference's
DRAWS = 8  # evaluation draws, at seeds 0, 4, 8, ... (sf.Quality takes seed and seed + 1)


def run_quality(quality, config, net):
    """quality(net) exactly as a run with config config evaluates it (its K, re-noising and student guidance) against
    quality's reference set, and the samples it scored: (number, samples (QUALITY_SIZE, 1, 8, 8)). The noises are the
    ones sf.Quality draws for config's K at quality's seed: the same initial noise as the reference set's."""
    q, bb = copy.copy(quality), quality.backbone
    q.config = config
    q.noises = bb.noises(sf.QUALITY_SIZE, config.steps, torch.Generator(bb.device).manual_seed(quality.seed))
    return q(net), q.samples


def spearman(a, b):
    """Spearman's rank correlation of two equally long lists: Pearson's correlation of their ranks, tied values
    sharing their average rank."""

    def ranks(v):
        v = torch.tensor(v, dtype=torch.float64)
        below, tied = (v[:, None] > v[None]).sum(1).double(), (v[:, None] == v[None]).sum(1).double()
        return below + (tied + 1) / 2  # (n,) 1-based ranks, ties averaged

    ra, rb = (ranks(v) for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def teacher_rows(config, bb, cond, z):
    """Every teacher row from the noise z (N, 1, 8, 8): the benchmark's (unguided, and at CFG 2 at every t), then
    guided as in the losses (the reference's sampler at 32 steps): {name: samples (N, 1, 8, 8)}."""
    with sf.autocast(config, bb.device), torch.no_grad():
        rows = {name: x for name, _, _, x in teacher_samples(bb, cond, z)}
        for n in (1, 2, 4, 8, 16, 32):
            rows[interval_row(config, n)] = sf.euler_sample(
                lambda xx, tt: bb.velocity(bb.teacher, xx, tt, cond, interval(config, tt)), z, n
            )
    return rows


def fd_samples(config, bb, students):
    """Each row's samples for the classifier's FD, from the benchmark's noise: the teacher rows, then the students'
    EMA and raw generators, {name: (N, 1, 8, 8)}."""
    _, cond, z = digits_inputs(bb)
    rows = teacher_rows(config, bb, cond, z)
    for name, scfg, res in students:
        for kind, net in kept(res):
            rows[f"{name} ({kind})"] = student_samples(bb, net, cond, z, scfg.steps)
    return rows


def run_numbers(config, bb, students, quality):
    """Each row scored by `quality` exactly as a run would, on its prompts and noises (quality.cond, quality.noises;
    the teacher rows from their initial noise quality.noises[:, 0]): {name: (the number, the samples it scored
    (QUALITY_SIZE, 1, 8, 8))}, in fd_samples' order."""
    z = quality.noises[:, 0]  # (QUALITY_SIZE, 1, 8, 8)
    out = {name: (quality.score(x), x) for name, x in teacher_rows(config, bb, quality.cond, z).items()}
    for name, scfg, res in students:
        for kind, net in kept(res):
            out[f"{name} ({kind})"] = run_quality(quality, scfg, net)
    return out


def interval(config, t):
    """The CFG scale of the teacher in the losses at times t: the run's, inside its guidance interval (D18)."""
    return sf.guidance_scale(config.guidance_eval_real, t, config.guidance_t_min, config.guidance_t_max)


def interval_row(config, steps):
    interval = f"[{config.guidance_t_min:g}, {config.guidance_t_max:g}]"
    return f"teacher, {steps} steps, w={config.guidance_eval_real:g} in {interval}"


def study_floor(config, bench, quality, ref_features):
    """The reference sampler itself on other noise: the number and the FD of a student that were the teacher."""
    bb = bench.bb
    _, cond, z = digits_inputs(bb)
    g = torch.Generator(bb.device).manual_seed(OTHER_SEEDS)

    def other(c, x):  # the reference's sampler, from fresh noise shaped like x
        def velocity(xx, tt):
            return bb.velocity(bb.teacher, xx, tt, c, interval(config, tt))

        return sf.euler_sample(velocity, bb.noise(x.shape, g), sf.REFERENCE_STEPS)

    with sf.autocast(config, bb.device), torch.no_grad():
        return dict(
            metric=quality.score(other(quality.cond, quality.noises[:, 0])),
            fd_to_reference=frechet_distance(bench.clf.features(other(cond, z)), ref_features),
        )


def quality_cost(config, bb, quality, repeats=3):
    """Seconds, at the digits preset's settings, of one quality(ema) evaluation (the generator's without an EMA) and
    of one SiD iteration (each the mean of `repeats` after a warm-up), on fresh students: the cost does not depend on
    their weights."""
    sid = sf.SiD(config, bb, sf.Runtime())
    student = sid.generator if sid.ema is None else sid.ema  # the student a run evaluates
    return dict(
        evaluation=mean_seconds(lambda: quality(student), repeats),
        iteration=mean_seconds(lambda: sid.iteration(0), repeats),
    )


def metric_study(args, overrides, argv):
    """Every sampler of the benchmark scored by the run's quality number and by the classifier's FD to the same
    reference; their Spearman correlation, on the run's draw and on DRAWS evaluation draws; what the number costs a
    run. The table, OUT/metric-study.json, OUT/samples.npz (each row's FD samples under its name, the run's under
    'quality: <name>', the requested classes of both, the real digits)."""
    t_start = time.time()
    config = sf.make_config("digits", **overrides)
    bench = DigitsBench(config, args.data_aided)
    students, t_distill = [], {}
    for name, scfg, res, seconds in benchmark_students(config, overrides, bench.bb, args.data_aided):
        students.append((name, scfg, res))
        t_distill[name] = seconds
    t0 = time.time()
    quality = sf.Quality(bench.bb, config)  # the reference set, drawn as a run of the digits preset draws it
    t_reference = time.time() - t0
    reference = interval_row(config, sf.REFERENCE_STEPS)
    fd_x = fd_samples(config, bench.bb, students)
    assert reference in fd_x, f"{reference}: the reference sampler must be one of the teacher rows"
    draws = [
        run_numbers(config, bench.bb, students, q)
        for q in [quality] + [sf.Quality(bench.bb, config, seed=4 * d) for d in range(1, DRAWS)]
    ]  # draws[0]: the run's own
    labels = digits_inputs(bench.bb)[0]
    with torch.no_grad():
        ref_f, ref_qf = bench.clf.features(fd_x[reference]), bench.clf.features(draws[0][reference][1])
        rows = [
            dict(
                row=name,
                metric=number,
                metric_draws=[d[name][0] for d in draws],
                fd_to_reference=frechet_distance(bench.clf.features(fd_x[name]), ref_f),
                fd_run_samples=frechet_distance(bench.clf.features(q_x), ref_qf),
                acc=(bench.clf(fd_x[name]).argmax(1) == labels).float().mean().item(),
            )
            for name, (number, q_x) in draws[0].items()
        ]
    fd = [r["fd_to_reference"] for r in rows]
    others = [r for r in rows if r["row"] != reference]  # the reference row is the reference: it agrees trivially
    per_draw = [spearman([r["metric_draws"][d] for r in rows], fd) for d in range(DRAWS)]
    result = dict(
        reference=reference,
        rows=rows,
        spearman=per_draw[0],
        spearman_draws=per_draw,
        spearman_without_reference=spearman([r["metric"] for r in others], [r["fd_to_reference"] for r in others]),
        spearman_fd_run_samples=spearman([r["fd_run_samples"] for r in rows], fd),
        floor=study_floor(config, bench, quality, ref_f),
        samples=dict(
            fd=len(labels), metric=sf.QUALITY_SIZE, quality_t=sf.QUALITY_T, quality_dims=sf.QUALITY_DIMS, draws=DRAWS
        ),
    )
    result.update(
        cost=study_cost(config, bench.bb, quality, t_reference),
        command=command(argv),
        seconds=dict(teacher=bench.t_teacher, classifier=bench.t_clf, distill=t_distill, wall=time.time() - t_start),
    )
    print_metric_study(result, config)
    q_labels = [int(bench.bb.prompts[i % len(bench.bb.prompts)]) for i in range(sf.QUALITY_SIZE)]
    np.savez_compressed(
        os.path.join(config.out, "samples.npz"),
        labels=labels.numpy(),
        real=bench.x.numpy(),
        quality_labels=np.array(q_labels),
        **{k: v.numpy() for k, v in fd_x.items()},
        **{f"quality: {k}": v[1].numpy() for k, v in draws[0].items()},
    )
    with open(os.path.join(config.out, "metric-study.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {config.out}/metric-study.json, samples.npz")
    return result


def study_cost(config, bb, quality, t_reference):
    """quality_cost's seconds, and the number's share of a run's time with these seconds: one evaluation per the DiT
    presets' eval_every; a run of their length (the reference set once, an evaluation every eval_every and at the
    end); a digits run (config.iters iterations, one evaluation at the end, the same reference set)."""
    cost, dit = quality_cost(config, bb, quality), sf.PRESETS["flux-dev"]  # (eval_every, iters: every DiT preset's)
    cost.update(
        reference_set=t_reference,
        threads=torch.get_num_threads(),
        eval_every=dit["eval_every"],
        preset_iters=dit["iters"],
    )

    def share(iters, every):
        evals = t_reference + -(-iters // every) * cost["evaluation"]
        return evals / (iters * cost["iteration"] + evals)

    cost.update(
        share_at_eval_every=cost["evaluation"] / (dit["eval_every"] * cost["iteration"] + cost["evaluation"]),
        share_preset_run=share(dit["iters"], dit["eval_every"]),
        share_digits_run=share(config.iters, config.iters),
    )
    return cost


def print_metric_study(m, config):
    n, c, rho = m["samples"], m["cost"], torch.tensor(m["spearman_draws"])
    print(
        f"\nmetric study: every sampler against one reference, {m['reference']} (sf.Quality of the digits preset)."
        f"\nquality: the run's number on its {n['metric']} samples (t = {n['quality_t']:g}, {n['quality_dims']} "
        f"dimensions), on the run's draw and the mean (sd) over {n['draws']} evaluation draws; FD: the classifier's "
        f"Frechet distance to the reference sampler, {n['fd']} samples on each side; FD, run: the same on the run's "
        f"{n['metric']} samples and the reference set"
    )
    print(f"{'row':<34} {'quality':>9} {'over draws':>18} {'FD':>9} {'FD, run':>9} {'accuracy':>9}")
    for r in m["rows"]:
        q = torch.tensor(r["metric_draws"])
        print(
            f"{r['row']:<34} {r['metric']:9.4f} {f'{q.mean():.4f} ({q.std():.4f})':>18} {r['fd_to_reference']:9.3f} "
            f"{r['fd_run_samples']:9.2f} {r['acc']:9.3f}"
        )
    print(
        f"the reference sampler on other noise (the floor): quality {m['floor']['metric']:.4f}, FD "
        f"{m['floor']['fd_to_reference']:.3f}"
    )
    print(
        f"Spearman, quality vs FD, over all {len(m['rows'])} rows: {m['spearman']:.3f} on the run's draw "
        f"({m['spearman_without_reference']:.3f} without the reference row); over {n['draws']} evaluation draws "
        f"{rho.mean():.3f} +- {rho.std():.3f} (sd), lowest {rho.min():.3f}, highest {rho.max():.3f} "
        f"[{', '.join(f'{v:.3f}' for v in rho.tolist())}]; FD, run vs FD: {m['spearman_fd_run_samples']:.3f}"
    )
    print(
        f"cost ({c['threads']} threads): the reference set {c['reference_set']:.2f} s once, one quality(ema) "
        f"{c['evaluation']:.3f} s, one SiD iteration {c['iteration']:.3f} s: {100 * c['share_at_eval_every']:.2f}% "
        f"of a run evaluating every {c['eval_every']} iterations, {100 * c['share_preset_run']:.2f}% of a run of "
        f"{c['preset_iters']} (reference set included), {100 * c['share_digits_run']:.2f}% of a digits run "
        f"({config.iters} iterations, one evaluation)"
    )
    print(f"time: {', '.join(f'{k} {v:.1f} s' for k, v in m['seconds'].items() if not isinstance(v, dict))}")


# ------------------------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------------------------


def command(argv):
    return "python experiments/digits.py " + " ".join(sys.argv[1:] if argv is None else argv)


def parse_args(argv):
    p = sf.Parser(
        prog="experiments/digits.py",
        description=__doc__,
        epilog=(
            "Not offered: sid_flow.py's flags for image teachers (--teacher, --prompts, --resolution, --device,\n"
            "--mode, ...: the teacher is this one, on the CPU), its guidance flags (--guidance-*: the benchmark's\n"
            "guided students use the digits preset's, each strategy of --guidance-study its own) and --eval-every\n"
            "(no previews here)."
        ),
    )
    p.add_argument(
        "--guidance-study",
        action="store_true",
        help="distil the guided teacher by every guidance strategy (SiD-LSG, teacher-only CFG, Zero-CFG, "
        "Anti-CFG, a lower scale, a guidance interval) at 4 and 1 steps, beside the teacher's "
        "samplers; one table, OUT/guidance-study.json, OUT/samples.npz, OUT/guidance.png",
    )
    p.add_argument(
        "--metric-study",
        action="store_true",
        help="score every sampler of the benchmark (the teacher rows, the students) by the run's quality "
        "number against one reference set and by the classifier's FD to the same reference: one "
        "table, their Spearman correlation, the number's cost; OUT/metric-study.json, "
        "OUT/samples.npz",
    )
    p.add_argument(
        "--data-aided",
        action="store_true",
        help="the benchmark's students with data-aided SiD (D17): the teacher's training digits as the "
        "real data, their labels as the prompts",
    )
    sf.add_config_flags(p, skip=SKIP + ("out",), presets={"digits": "digits"})
    p.add_argument(
        "--out",
        help="the cached teacher (teacher-digits.pt), the students' runs (runs/) and the results "
        "(metrics.json, digits.png; with --guidance-study guidance-study.json, samples.npz, "
        "guidance.png; with --metric-study metric-study.json, samples.npz) "
        f"[default: {sf.PRESETS['digits']['out']}]",
    )
    return parse_flags(p, argv, NOT_HERE)


def main(argv=None):
    args, overrides = parse_args(argv)
    if args.guidance_study and args.data_aided:
        raise sf.UserError("--guidance-study distils without real data: drop --data-aided")
    if args.guidance_study and args.metric_study:
        raise sf.UserError("--guidance-study and --metric-study are two commands: pass one")
    study = guidance_study if args.guidance_study else metric_study if args.metric_study else benchmark
    return study(args, overrides, argv)


if __name__ == "__main__":
    try:
        main()
    except sf.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
