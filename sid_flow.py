"""sid_flow.py -- Score identity Distillation (SiD) of flow-matching models, in one file.

Read it top to bottom, beside derivation.md (equation labels (D1)...(D17) are cited in the comments). It has two parts.

  PART I, THE METHOD -- everything the 2-D toy needs; a reader who stops at its end has the whole algorithm:
    CONVENTIONS -> 1 path algebra (Bayes' rule) -> 2 times, weights and guidance -> 3 losses -> 4 the few-step
    generator -> 5 the teacher interface (the toy MLP its first instance) -> 6 one SiD iteration (fake_update,
    generator_update) -> 7 the loop (distill)
  PART II, THE MACHINERY THAT SCALES IT -- a first reading may skip it; Part I reaches it only through the interface:
    8 diffusers teachers (SANA, SD3, FLUX) -> 9 LoRA views -> 10 real images (data-aided) -> 11 runtime (device,
    precision, ranks, FSDP2) and checkpoints -> 12 config and presets -> 13 loading, export, memory plan, benchmark,
    command line

Commands, by hardware:
    laptop (CPU, ~2 min):  python run_toy.py                       # 2-D checkerboard: out/toy/checkerboard/
    one GPU:               python sid_flow.py --teacher sana-0.6b-512        # presets: see PRESETS (section 12)
                           python sid_flow.py --teacher flux-dev --prompts my_prompts.txt --iters 5000
                           python sid_flow.py --teacher ./my_pipeline_folder --resolution 512
    a node of GPUs:        torchrun --nproc_per_node 8 sid_flow.py --teacher sd3.5-large --mode full --grad-checkpointing
    before downloading:    python sid_flow.py --teacher flux-dev --dry-run   # the memory plan; --bench 3 times the loop
    sample the student:    python sid_flow.py sample --student out/flux-dev/student --prompt "a fox" --seed 0 --out fox.png
    export a checkpoint:   python sid_flow.py export --out out/flux-dev
    data-aided (D16):      python sid_flow.py --teacher sana-0.6b-512 --data my_images/   # x.png + x.txt captions
    guidance at every t:   python sid_flow.py --teacher sana-0.6b-512 --cfg-t-min 0 --cfg-t-max 1   # the paper's
    tests (CPU, minutes):  python -m pytest -q test_sid_flow.py
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------------------------
#                                        PART I -- THE METHOD
# ------------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------------
# CONVENTIONS (stated once; test_sid_flow.py::test_conventions checks them)
#
#   time       t in [0, 1];  t = 0 is DATA, t = 1 is pure NOISE   (diffusers / SANA / SD3 / FLUX direction;
#              facebookresearch/flow_matching and torchcfm use the opposite one -- a silent flip is the classic bug)
#   path       x_t = a_t x0 + s_t eps,  eps ~ N(0, I)                                        (D1)
#              flow matching (default): a_t = 1 - t,  s_t = t
#   velocity   v = dx_t/dt = a'_t x0 + s'_t eps;  flow matching: v = eps - x0               (D2)
#   shapes     x: (B, *D) -- (B, 2) for the toy, (B, C, H, W) for DiT latents;  t: (B,);  per-sample losses: (B,)
#   CFG        v = v_uncond + w (v_cond - v_uncond), the empty prompt as uncond; w = 1 means "conditional only"
# ------------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------------
# 1. Path algebra: every parameterisation is an affine function of E[x0 | x_t]                      (D1)-(D7)
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GaussianPath:
    """x_t = a(t) x0 + s(t) eps. `name` picks the schedule: 'flow' (a = 1-t, s = t) or 'vp' (a = cos(pi t/2),
    s = sin(pi t/2), the cosine variance-preserving diffusion)."""
    name: str

    def coefficients(self, t):
        """(a, s, da/dt, ds/dt) at time t."""
        if self.name == "flow":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        if self.name == "vp":
            h = 0.5 * math.pi
            return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
        raise ValueError(f"unknown path {self.name!r}")


FLOW = GaussianPath("flow")
VP = GaussianPath("vp")


def _per_sample(t, x):
    """View t (B,) as (B, 1, ..., 1) so it broadcasts against x (B, *D)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0, eps, t, path=FLOW):
    """x_t = a_t x0 + s_t eps.                                                                              (D1)"""
    a, s, _, _ = path.coefficients(_per_sample(t, x0))
    return a * x0 + s * eps  # (B, *D)


def velocity_target(x0, eps, t, path=FLOW):
    """The conditional velocity d x_t / dt = a' x0 + s' eps; for flow matching eps - x0.                    (D2)"""
    _, _, da, ds = path.coefficients(_per_sample(t, x0))
    return da * x0 + ds * eps  # (B, *D)


def velocity_to_x0(x_t, t, v, path=FLOW):
    """E[x0 | x_t] from a velocity prediction: solve [a s; a' s'] [x0; eps] = [x_t; v] for x0.
    Flow matching: x0 = x_t - t v.                                                                          (D4)"""
    a, s, da, ds = path.coefficients(_per_sample(t, x_t))
    return (ds * x_t - s * v) / (a * ds - s * da)  # (B, *D); the determinant is 1 for flow matching


def velocity_to_eps(x_t, t, v, path=FLOW):
    """E[eps | x_t] from a velocity prediction. Flow matching: eps = x_t + (1 - t) v.                      (D4)"""
    a, s, da, ds = path.coefficients(_per_sample(t, x_t))
    return (a * v - da * x_t) / (a * ds - s * da)  # (B, *D)


def velocity_to_score(x_t, t, v, path=FLOW):
    """grad_x log p_t(x_t) = -E[eps | x_t] / s_t (Tweedie). Flow matching: -(x_t + (1 - t) v) / t.         (D5)"""
    _, s, _, _ = path.coefficients(_per_sample(t, x_t))
    return -velocity_to_eps(x_t, t, v, path) / s  # (B, *D)


def x0_to_velocity(x_t, t, x0, path=FLOW):
    """The inverse of velocity_to_x0: eps = (x_t - a x0) / s, then v = a' x0 + s' eps.                      (D4)"""
    a, s, da, ds = path.coefficients(_per_sample(t, x_t))
    return da * x0 + ds * (x_t - a * x0) / s  # (B, *D)


def score_to_x0(x_t, t, score, path=FLOW):
    """Tweedie's formula: E[x0 | x_t] = (x_t + s_t^2 grad log p_t(x_t)) / a_t.                              (D3)"""
    a, s, _, _ = path.coefficients(_per_sample(t, x_t))
    return (x_t + s ** 2 * score) / a  # (B, *D)


def flow_to_vp(x_t, t):
    """The signal-to-noise map: a flow-matching state (x_t, t) is a VP-diffusion state (x_tau, tau) with the
    same SNR a/s = (1 - t)/t, rescaled so a^2 + s^2 = 1. Returns (x_tau (B, *D), tau (B,)).                 (D7)"""
    norm = torch.sqrt((1 - t) ** 2 + t ** 2)  # (B,)
    tau = (2 / math.pi) * torch.atan2(t, 1 - t)  # (B,) since tan(pi tau / 2) = s/a = t/(1-t)
    return x_t / _per_sample(norm, x_t), tau


# ------------------------------------------------------------------------------------------------------------------
# 2. Times, weights and guidance used during distillation                                  (D12), (D17)
# ------------------------------------------------------------------------------------------------------------------

def sample_t(n, dist, rng, device, t_min=1e-3, t_max=1 - 1e-3):
    """Times for both updates. 'logit-normal' (official): t = sigmoid(N(ln 2, 1.6^2)), median 2/3 -- skewed to high
    noise; 'uniform': U(t_min, t_max). Clamped away from 0 and 1, where the conversions divide by t or 1 - t."""
    if dist == "logit-normal":
        u = torch.randn(n, generator=rng, device=device) * 1.6 + math.log(2.0)
        t = torch.sigmoid(u)
    elif dist == "uniform":
        t = torch.rand(n, generator=rng, device=device)
    else:
        raise ValueError(f"unknown t distribution {dist!r}")
    return t.clamp(t_min, t_max)  # (B,)


# w(t) of the generator loss; all seven weightings of the official code. 'inv-l1' is original SiD's per-sample
# 1 / mean|x_g - x0_teacher|, computed without gradient.                                             (D12)
WEIGHTINGS = ("1-t", "(1-t)^2", "inv-l1", "(1-t)/t", "((1-t)/t)^2", "1/t", "1/t^2")


def sid_weight(name, t, x_g, x0_teacher):
    """Per-sample weight w (B,). No gradient ever flows through a weight."""
    t = t.detach()
    if name == "1-t":
        return 1 - t
    if name == "(1-t)^2":
        return (1 - t) ** 2
    if name == "inv-l1":
        # stop-gradient: the weight normalises the step size, it is not part of the objective being descended
        return 1.0 / (x_g - x0_teacher).detach().abs().flatten(1).mean(1).clamp_min(1e-8)
    if name == "(1-t)/t":
        return (1 - t) / t
    if name == "((1-t)/t)^2":
        return ((1 - t) / t) ** 2
    if name == "1/t":
        return 1 / t
    if name == "1/t^2":
        return 1 / t ** 2
    raise ValueError(f"unknown weighting {name!r}; choose from {', '.join(WEIGHTINGS)}")


# Classifier-free guidance inside the losses (D17). A call with scale w evaluates v_u + w (v_c - v_u) (the empty
# prompt's velocity v_u, the prompt's v_c); w = 1 is v_c alone, w = 0 v_u alone (Zero-CFG's fake network), w < 0
# pushes away from the prompt (Anti-CFG). The guidance interval limits every scale of the run to noise levels
# t in [cfg_t_min, cfg_t_max]: outside it each network is called with w = 1, its plain conditional velocity.

def has_interval(t_min, t_max):
    """Does [t_min, t_max] leave part of [0, 1] unguided? Then the scales of a call differ from sample to sample."""
    return not (t_min <= 0.0 and t_max >= 1.0)


def guidance_scale(w, t, t_min=0.0, t_max=1.0):
    """The CFG scale of one network call at times t (B,): `w` inside the guidance interval, 1 outside (D17). A float
    when it is one scale for the batch (no interval, or w = 1), else a per-sample (B,) tensor."""
    if not has_interval(t_min, t_max) or w == 1:
        return float(w)
    inside = (t >= t_min) & (t <= t_max)
    return torch.where(inside, torch.full_like(t, float(w)), torch.ones_like(t)).detach()  # (B,)


# ------------------------------------------------------------------------------------------------------------------
# 3. Losses (pure functions of tensors; every one returns a per-sample (B,) tensor)
# ------------------------------------------------------------------------------------------------------------------

def _sum_pixels(x):
    return x.flatten(1).sum(1)  # (B, *D) -> (B,)


def flow_matching_loss(v_pred, x0, eps, t, path=FLOW):
    """|v_pred - (a' x0 + s' eps)|^2 summed over pixels: trains the teacher on data and the fake network on
    generator samples (then x0 = x_g, detached by the caller). Its minimiser is E[v | x_t].                 (D8)"""
    return _sum_pixels((v_pred - velocity_target(x0, eps, t, path)) ** 2)  # (B,)


def sid_generator_loss(x_g, x0_teacher, x0_fake, alpha, weight):
    """The SiD generator loss, per sample (B,):                                                            (D11)

        w(t) < x0_teacher - x0_fake , (x0_teacher - x_g) - alpha (x0_teacher - x0_fake) >

    = w [ (1 - alpha) |x0_teacher - x0_fake|^2 + < x0_teacher - x0_fake , x0_fake - x_g > ].

    A surrogate: its value can be negative, only its gradient means something. The caller keeps every path
    differentiable -- x_g directly, and x_t = (1-t) x_g + t eps into BOTH networks' inputs -- and steps only the
    generator's weights. `weight` (B,) must carry no gradient."""
    gap = x0_teacher - x0_fake  # (B, *D)  teacher-minus-fake posterior means: the score difference in x0 units
    return weight * _sum_pixels(gap * ((x0_teacher - x_g) - alpha * gap))  # (B,)


def dmd_generator_loss(x_g, x0_teacher, x0_fake, weight):
    """DMD for contrast: the gradient w (x0_fake - x0_teacher) is applied to x_g alone, no gradient through
    the networks' inputs. Written 0.5 |x_g - sg(x_g - grad)|^2 so d loss / d x_g = grad.                    (D14)"""
    grad = _per_sample(weight, x_g) * (x0_fake - x0_teacher).detach()  # (B, *D) stop-gradient: a fixed direction
    return 0.5 * _sum_pixels((x_g - (x_g - grad).detach()) ** 2)  # (B,)


def discriminator_loss(logits_real, logits_fake):
    """Data-aided SiD: the fake network's pooled features (B, C) are C logits per sample. BCE(real -> 1) +
    BCE(fake -> 0), logits clamped to [-10, 10], mean over C: (B,). Joins the fake network's loss.          (D16)"""
    real = F.binary_cross_entropy_with_logits(logits_real.clamp(-10, 10), torch.ones_like(logits_real),
                                              reduction="none")
    fake = F.binary_cross_entropy_with_logits(logits_fake.clamp(-10, 10), torch.zeros_like(logits_fake),
                                              reduction="none")
    return (real + fake).mean(1)  # (B,)


def gan_generator_loss(logits_fake, weight):
    """The generator's adversarial term: w(t) BCE(D(x_t of x_g) -> real), (B,). Its gradient reaches x_g through
    the fake network's input, as SiD's does.                                                                (D16)"""
    bce = F.binary_cross_entropy_with_logits(logits_fake.clamp(-10, 10), torch.ones_like(logits_fake),
                                             reduction="none")
    return weight * bce.mean(1)  # (B,)


# ------------------------------------------------------------------------------------------------------------------
# 4. The few-step generator                                                                        (D13)
# ------------------------------------------------------------------------------------------------------------------

def generator_times(K):
    """t_k = 1 - k/K for k = 0..K-1: (1, .75, .5, .25) for K = 4, (1,) for K = 1."""
    return [1.0 - k / K for k in range(K)]


def gaussian(rng=None):
    """draw(x) -> fresh N(0, I) noise shaped like x, from `rng` (a torch.Generator; None: torch's global RNG)."""
    return lambda x: torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)


def renoise(x0, x_t, t, t_next, z, mode, draw):
    """The next generator input x_{t_next} = (1 - t_next) x0 + t_next n, with n:
    'fresh' new N(0, I) noise from draw(x0) (default; FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)),
    'fixed' the initial noise z, or 'ddim' the noise implied by the current state, (x_t - (1 - t) x0) / t
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=False), i.e. a plain Euler step)."""
    if mode == "fresh":
        n = draw(x0)
    elif mode == "fixed":
        n = z
    elif mode == "ddim":
        n = (x_t - _per_sample(1 - t, x0) * x0) / _per_sample(t, x0)
    else:
        raise ValueError(f"unknown renoise mode {mode!r}")
    return add_noise(x0, n, t_next)  # (B, *D)


def generator_rollout(velocity_fn, z, K, k, noise, draw):
    """Run the first k-1 of the generator's K steps WITHOUT gradient and return the input of step k:
    (x_t (B, *D), t (B,)). `velocity_fn(x_t, t) -> v`. Backward simulation: earlier outputs are detached, so
    only step k will carry gradient into the generator."""
    times = generator_times(K)
    x_t = z
    t = torch.full((z.shape[0],), times[0], device=z.device, dtype=z.dtype)
    with torch.no_grad():  # stop-gradient: steps 1..k-1 are simulation, not training signal
        for j in range(k - 1):
            x0 = velocity_to_x0(x_t, t, velocity_fn(x_t, t))
            t_next = torch.full_like(t, times[j + 1])
            x_t = renoise(x0, x_t, t, t_next, z, noise, draw)
            t = t_next
    return x_t, t


def generator_step(velocity_fn, x_t, t):
    """One generator step, x0 = x_t - t G(x_t, t) (D4): the sample x_g of the step being trained."""
    return velocity_to_x0(x_t, t, velocity_fn(x_t, t))  # (B, *D)


def generate(velocity_fn, z, K, noise="fresh", draw=None):
    """K-step sample of the generator, no gradient: (B, *D). `draw` defaults to torch's global RNG."""
    x_t, t = generator_rollout(velocity_fn, z, K, K, noise, draw or gaussian())
    with torch.no_grad():
        return generator_step(velocity_fn, x_t, t)


def euler_sample(velocity_fn, z, steps):
    """The teacher's own sampler: Euler on dx/dt = v from t = 1 to t = 0 on a uniform grid, no gradient."""
    x = z
    ts = torch.linspace(1.0, 0.0, steps + 1, device=z.device, dtype=z.dtype)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(z.shape[0])  # (B,)
            x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, t)
    return x  # (B, *D)


# ------------------------------------------------------------------------------------------------------------------
# 5. The teacher interface: every family quirk lives behind it                                   (D8)
#
# The loop sees a Backbone and three plain nn.Modules (teacher, fake, generator). It calls
#     backbone.velocity(net, x_t, t, cond, guidance) -> v      (B, *D) -- CFG, timestep scale, packing inside
#     backbone.sample_batch(n, rng, rows) -> (cond, x0_real)   conditioning (None for the toy); real data or None
#     backbone.students(cfg, runtime) -> (generator, fake, ema)   all three starting as the teacher (D13)
#     backbone.noise(shape, rng), backbone.step_noise(shape, rng)   N(0, I) draws, laid out as the stock pipeline's
#     backbone.sample_shape                                    D, the shape of one sample
# and never branches on the model family. The toy MLP is the first instance; the diffusers families (SANA, SD3,
# FLUX), their LoRA mode and FSDP2 sharding are Part II.
# ------------------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input from the user: main() prints the message on one line and exits with status 2."""


class TimeEmbedding(nn.Module):
    """Fourier features of t at frequencies pi, 2 pi, ..., (dim/2) pi: (B,) -> (B, dim). (DiTs use 1000 t with
    geometric frequencies; on the toy these low, evenly spaced ones trained a sharper teacher in the same time.)"""

    def __init__(self, dim=32):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, dim // 2 + 1, dtype=torch.float32))

    def forward(self, t):
        arg = t[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([arg.sin(), arg.cos()], dim=1)  # (B, dim)


class ToyMLP(nn.Module):
    """The 2-D velocity network v(x_t, t): an MLP on [x_t, time features]. `features` is the last hidden layer
    (what the data-aided discriminator pools); `head` maps it to the velocity."""

    def __init__(self, dim=2, width=256, depth=3, tdim=32):
        super().__init__()
        self.config = dict(dim=dim, width=width, depth=depth, tdim=tdim)  # saved with the weights
        self.embed_t = TimeEmbedding(tdim)
        layers, d_in = [], dim + tdim
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            d_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, dim)

    def features(self, x_t, t):
        return self.body(torch.cat([x_t, self.embed_t(t)], dim=1))  # (B, width)

    def forward(self, x_t, t):
        return self.head(self.features(x_t, t))  # (B, dim)


@contextlib.contextmanager
def capture_features(net):
    """Record the input of the network's output projection (`head` of the toy MLP, `proj_out` of every diffusers
    DiT: the last hidden states, after the final norm) during the calls inside the block -- without editing the
    network's class. Yields a list that receives one tensor per forward call."""
    seen = []
    head = net.head if hasattr(net, "head") else net.proj_out
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def pooled_logits(hidden, B):
    """Discriminator logits (B, C) from captured hidden states: the last B rows (the conditional branch when CFG
    doubled the batch), mean-pooled over tokens when there are tokens ((B, N, C) -> (B, C))."""
    h = hidden[-B:]
    return (h.mean(1) if h.dim() == 3 else h).float()


class Backbone:
    """What every teacher shares behind the interface: the trainable copies and the noise draws. A subclass sets
    teacher, device and sample_shape, and supplies velocity() and sample_batch()."""
    step_noise_from_generator = True  # does the stock pipeline draw its per-step noise from `generator`? (sampling)

    def trainable_copy(self, dtype=torch.float32):
        net = copy.deepcopy(self.teacher)
        if next(net.parameters()).dtype != dtype:  # (a cast that changes nothing makes diffusers warn)
            net = net.to(dtype)
        return net.requires_grad_(True).train()

    def students(self, cfg, runtime):
        """(generator, fake, ema): three full copies of the teacher on one process, trainable weights in float32
        (bf16 with --precision bf16). The diffusers families add LoRA mode and FSDP2 sharding (Part II)."""
        if cfg.mode != "full" or runtime.world > 1:
            raise UserError("the toy MLP trains in full mode on one process (LoRA and FSDP2 need a diffusers teacher)")
        dtype = trainable_dtype(cfg)
        generator, fake = self.trainable_copy(dtype), self.trainable_copy(dtype)
        return generator, fake, copy.deepcopy(generator).requires_grad_(False).eval()

    def noise(self, shape, rng):
        """N(0, I) in the sample layout (B, *D), drawn from `rng` as the stock pipeline draws its initial noise."""
        return torch.randn(shape, generator=rng, device=self.device)

    def step_noise(self, shape, rng):
        """The re-noising draw between generator steps, in the layout the stock scheduler draws it (B, *D)."""
        return self.noise(shape, rng)


class ToyBackbone(Backbone):
    """The 2-D teacher behind the Backbone interface: unconditional, no CFG, no latents. `real(n, rng)`, when given,
    draws true data for data-aided SiD."""

    def __init__(self, teacher, real=None):
        self.teacher = teacher.requires_grad_(False).eval()  # frozen for the whole run
        self.device = teacher.head.weight.device
        self.sample_shape = (teacher.config["dim"],)
        self.real = real

    def velocity(self, net, x_t, t, cond, guidance):
        return net(x_t, t)  # (B, 2)

    def sample_batch(self, n, rng, rows=slice(None)):
        """(cond, x0_real) for `rows` of a batch of n: no conditioning; real samples only in data-aided runs."""
        return None, (self.real(n, rng)[rows] if self.real else None)


# ------------------------------------------------------------------------------------------------------------------
# 6. One SiD iteration: fake update(s), then a generator update, on the same generator sample        (D9)-(D14)
# ------------------------------------------------------------------------------------------------------------------

def gan_schedule(cfg, images_seen):
    """Data-aided schedule, in generator images seen (so it holds at any batch size): the generator is frozen for the
    first cfg.gan_freeze_images; from cfg.gan_start_images its objective is (1 - gan_weight) SiD + gan_weight GAN.
    Returns (update_generator, gan_weight now)."""
    return images_seen >= cfg.gan_freeze_images, (cfg.gan_weight if images_seen >= cfg.gan_start_images else 0.0)


def sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng, images_seen=0, runtime=None):
    """One iteration of Algorithm 1 (derivation.md): cfg.fake_updates fake updates, then one generator update, on
    the same generator sample. Returns a dict of diagnostics; a phase whose loss is not finite skips its optimizer
    step and is named under 'nonfinite' (the loop decides when to stop)."""
    runtime = runtime or Runtime()
    B, K = cfg.batch_size, cfg.steps
    device = next(generator.parameters()).device
    # every random draw is made for the WHOLE global batch from the same rng on every rank, and each rank keeps its
    # own rows: ranks see different samples, and one process with the same global batch sees the same numbers
    n, rows = B * runtime.world, slice(runtime.rank * B, (runtime.rank + 1) * B)
    shape = (n, *backbone.sample_shape)
    # the same k for both updates: a uniform draw from {1..K} (the paper's mixture) or always K (D13). Drawn from
    # (seed, images seen): every rank must run the same number of (collective) forwards
    k_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + images_seen)
    k = K if cfg.train_step == "last" else int(torch.randint(1, K + 1, (1,), generator=k_rng).item())
    z = backbone.noise(shape, rng)[rows]  # (B, *D) initial noise
    cond, x0_real = backbone.sample_batch(n, rng, rows)  # prompts (or None) and real samples (or None)
    update_generator, gan_weight = gan_schedule(cfg, images_seen) if x0_real is not None else (True, 0.0)

    def G(x, t):  # the student: no two-branch CFG (cfg.student_guidance is 1, or FLUX's embedded guidance)
        return backbone.velocity(generator, x, t, cond, cfg.student_guidance)

    # backward simulation: steps 1..k-1 without gradient; x_in is the input of the trained step k
    with autocast(cfg, device):
        x_in, t_in = generator_rollout(G, z, K, k, cfg.noise, lambda x: backbone.step_noise(shape, rng)[rows])
    with torch.no_grad(), autocast(cfg, device):
        # stop-gradient: the fake network fits the generator's distribution, it must not move the generator
        x_g = generator_step(G, x_in, t_in).float()  # (B, *D); extra fake updates reuse it with fresh t and eps
    out = {"k": k, "nonfinite": []}
    for _ in range(cfg.fake_updates):
        t, eps = sample_t(n, cfg.t_dist, rng, device)[rows], backbone.noise(shape, rng)[rows]  # (B,), (B, *D)
        ok, diagnostics = fake_update(cfg, backbone, fake, opt_fake, x_g, t, eps, cond, x0_real, runtime)
        out.update(diagnostics)
        out["nonfinite"] += [] if ok else ["fake"]
    if update_generator:
        t, eps = sample_t(n, cfg.t_dist, rng, device)[rows], backbone.noise(shape, rng)[rows]  # (B,), (B, *D)
        ok, diagnostics = generator_update(cfg, backbone, generator, fake, opt_gen, x_in, t_in, t, eps, cond,
                                           gan_weight, runtime)
        out.update(diagnostics)
        out["nonfinite"] += [] if ok else ["generator"]
    return out


def fake_update(cfg, backbone, fake, opt_fake, x_g, t, eps, cond, x0_real, runtime):
    """Plain flow matching of the fake network on the generator's (detached) samples x_g (D9). With real samples
    (data-aided SiD, D16) the fake network is also the discriminator: the real samples are noised with the same
    eps and t as the fakes. Returns (stepped?, diagnostics)."""
    B, out = x_g.shape[0], {}
    with autocast(cfg, x_g.device), capture_features(fake) as hidden:
        w_fake = guidance_scale(cfg.cfg_train_fake, t, cfg.cfg_t_min, cfg.cfg_t_max)  # (D17)
        v_fake = backbone.velocity(fake, add_noise(x_g, eps, t), t, cond, w_fake)  # (B, *D)
        loss = flow_matching_loss(v_fake.float(), x_g, eps, t).mean()
        if x0_real is not None:
            # the real samples are seen as the fakes' features were made: with the prompt, or on the empty prompt
            # alone under Zero-CFG's one-branch call (a batch-wide scale 0)
            w_d = 0.0 if not torch.is_tensor(w_fake) and w_fake == 0.0 else 1.0
            backbone.velocity(fake, add_noise(x0_real, eps, t), t, cond, w_d)  # its features: hidden[-1]
            loss_d = discriminator_loss(pooled_logits(hidden[-1], B), pooled_logits(hidden[0], B)).mean()
            loss = loss + loss_d
            out["loss_d"] = loss_d.item()
    # a plain backward: the fake network's weights are the only trainable tensors in this graph (x_g came from
    # torch.no_grad, the teacher is frozen)
    ok = runtime.update(loss, fake, opt_fake)
    out["loss_fake"] = loss.item()
    return ok, out


def generator_update(cfg, backbone, generator, fake, opt_gen, x_in, t_in, t, eps, cond, gan_weight, runtime):
    """The generator update (D11) through its step k (input x_in at time t_in); + the adversarial term if
    data-aided (D16). DMD (D14) uses the same calls with the networks as fixed critics.
    Returns (stepped?, diagnostics)."""
    B, out = x_in.shape[0], {}
    with autocast(cfg, x_in.device):
        x_g = generator_step(lambda x, s: backbone.velocity(generator, x, s, cond, cfg.student_guidance),
                             x_in, t_in).float()  # (B, *D) the ONLY step that carries gradient into G
        x_t = add_noise(x_g, eps, t)  # (B, *D) differentiable in x_g: SiD's gradient also flows through here
        critic = torch.no_grad() if cfg.loss == "dmd" else contextlib.nullcontext()  # DMD: no input gradient (D14)
        w_real, w_fake = (guidance_scale(w, t, cfg.cfg_t_min, cfg.cfg_t_max)  # (D17)
                          for w in (cfg.cfg_eval_real, cfg.cfg_eval_fake))
        with critic, capture_features(fake) as hidden:
            x0_teacher = velocity_to_x0(x_t, t, backbone.velocity(backbone.teacher, x_t, t, cond, w_real).float())
            x0_fake = velocity_to_x0(x_t, t, backbone.velocity(fake, x_t, t, cond, w_fake).float())  # (B, *D)
    w = sid_weight(cfg.weighting, t, x_g, x0_teacher)  # (B,) no gradient
    if cfg.loss == "sid":
        loss = sid_generator_loss(x_g, x0_teacher, x0_fake, cfg.alpha, w).mean()
    else:
        loss = dmd_generator_loss(x_g, x0_teacher, x0_fake, w).mean()
    if gan_weight > 0:  # the fake network's features of the generator's x_t, from the call just made
        loss_gan = gan_generator_loss(pooled_logits(hidden[-1], B), w).mean()
        loss = (1 - gan_weight) * loss + gan_weight * loss_gan
        out["loss_gan"] = loss_gan.item()

    def backward():
        # Gradient routing, in two stages. (1) d loss / d x_g: through x_g itself and through x_t into BOTH networks'
        # inputs; autograd.grad accumulates into no weight, so neither the fake network nor the teacher receives a
        # gradient from this loss. (2) that gradient pushed back through the generator alone. Both are plain
        # backward passes of the graph as built, which is what FSDP2 needs: its graph holds the unsharded weight
        # copies, whose hooks reduce-scatter into the shards (backward(inputs=<sharded weights>) would reach none).
        (grad_x_g,) = torch.autograd.grad(loss, x_g)  # (B, *D)
        x_g.backward(grad_x_g)
    ok = runtime.update(loss, generator, opt_gen, backward)
    with torch.no_grad():
        # the diagnostic that means something: how far the fake network's posterior mean is from the teacher's
        out["score_gap"] = _sum_pixels((x0_teacher - x0_fake).float() ** 2).mean().item()
    out["loss_gen"] = loss.item()
    return ok, out


# ------------------------------------------------------------------------------------------------------------------
# 7. The loop: EMA, learning rate, students and optimizers, distill()
# ------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, net, decay, step):
    """EMA with warm-up: the effective decay min(decay, (1 + step) / (10 + step)) lets the average follow the fast
    early moves away from the teacher and average only once training settles."""
    decay = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def lr_scale(cfg, step):
    """Learning-rate multiplier at `step`: 1 ('constant', official) or a cosine from 1 to 0 over cfg.iters."""
    return 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / cfg.iters))


def make_students(cfg, backbone, runtime=None):
    """(generator, fake, ema), all starting as the teacher (D13), as the backbone makes them."""
    return backbone.students(cfg, runtime or Runtime())


def trainable_dtype(cfg):
    """The generator's and fake network's weights: float32 masters, or bf16 with --precision bf16 (pure bf16)."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def make_optimizers(cfg, generator, fake):
    """Adam(beta1 = 0, beta2 = 0.999) for the generator and the fake network (official: no momentum)."""
    # foreach=False: the default multi-tensor step allocates temporaries the size of every gradient at once (on a
    # GPU, tens of GB for a full DiT copy: the peak of a checkpointed run); one tensor at a time costs ~nothing
    adam = dict(betas=(0.0, 0.999), eps=cfg.adam_eps, foreach=False)
    return (torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_gen, **adam),
            torch.optim.Adam([p for p in fake.parameters() if p.requires_grad], lr=cfg.lr_fake, **adam))


def distill(cfg, backbone, on_eval=None, runtime=None):
    """Distil `backbone.teacher` into a K-step generator. Resumes from cfg.out's checkpoint when there is one.
    `on_eval(step, generator, ema)` is called (on every rank) every cfg.eval_every iterations and at the end.
    Returns dict(generator=, ema=, fake=, step=, skipped=)."""
    runtime = runtime or Runtime()
    torch.manual_seed(cfg.seed)  # every rank the same: identical initial weights (FSDP2 broadcasts nothing)
    generator, fake, ema = make_students(cfg, backbone, runtime)
    runtime.same_on_all_ranks([generator, fake, ema], "initial weights")
    if cfg.grad_checkpointing:  # recompute activations in backward: memory for time, in all three networks
        for net in (generator, fake, backbone.teacher):
            net.enable_gradient_checkpointing()
    opt_gen, opt_fake = make_optimizers(cfg, generator, fake)
    # the loop's only source of randomness, the same on every rank (each keeps its rows of the global batch);
    # the global RNGs are never drawn from, so this state is all a checkpoint needs to resume exactly
    rng = torch.Generator(runtime.device or next(generator.parameters()).device).manual_seed(cfg.seed)
    run = Checkpoint(cfg, runtime, dict(generator=(generator, opt_gen), fake=(fake, opt_fake), ema=(ema, None)))
    step, skipped = run.load(rng)
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iters, initial=step, disable=not (cfg.progress and run.writer), dynamic_ncols=True,
               desc=cfg.loss.upper() if cfg.loss == "dmd" else "SiD")
    in_a_row, t0 = 0, time.time()
    while step < cfg.iters:
        for opt, lr in ((opt_gen, cfg.lr_gen), (opt_fake, cfg.lr_fake)):
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale(cfg, step)
        m = sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng, step * cfg.batch_size * runtime.world,
                          runtime)
        step += 1
        skipped, in_a_row = (skipped + 1, in_a_row + 1) if m["nonfinite"] else (skipped, 0)
        if in_a_row >= cfg.max_nonfinite:
            raise FloatingPointError(
                f"non-finite {' and '.join(m['nonfinite'])} loss at iteration {step} ({in_a_row} in a row, "
                f"{skipped} skipped in all); the last good checkpoint is kept")
        ema_update(ema, generator, cfg.ema_decay, step)
        if step % cfg.log_every == 0 or step == cfg.iters:
            run.log(bar, m, step, skipped, time.time() - t0)
        if on_eval and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
            on_eval(step, generator, ema)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
            run.save(rng, step, skipped)
        bar.update(1)
    bar.close()
    run.save(rng, step, skipped)
    if not run.sharded:
        runtime.same_on_all_ranks([generator, fake, ema], "final weights")
    return dict(generator=generator, ema=ema, fake=fake, step=step, skipped=skipped, optimizers=(opt_gen, opt_fake))


# ------------------------------------------------------------------------------------------------------------------
#                        PART II -- THE MACHINERY THAT SCALES IT (a first reading may stop here)
# ------------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------------
# 8. Diffusers teachers: SANA, SD3 / SD3.5, FLUX behind the Backbone interface
# ------------------------------------------------------------------------------------------------------------------

# The three diffusers families. Everything they do differently is in the five small methods a subclass overrides;
# DiTBackbone holds what they share: the prompt cache, classifier-free guidance, latent shapes, decoding, export.

DEFAULT_PROMPTS = [  # used when no --prompts file is given; previews use the first PREVIEW_PROMPTS of the set
    "a red fox sitting in fresh snow, golden hour", "a bowl of ramen with a soft-boiled egg, studio photo",
    "an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse in a storm",
    "a cozy library with tall wooden shelves and warm lamps", "a macro photo of a dew drop on a green leaf",
    "a futuristic city skyline at night, neon reflections", "a portrait of an old fisherman, dramatic lighting",
    "a cat wearing a tiny wizard hat, digital art", "a mountain lake at sunrise with mist over the water",
    "a plate of colorful macarons on a marble table", "a vintage red bicycle leaning against a blue door",
    "an isometric illustration of a tiny island village", "a hummingbird feeding from a purple flower",
    "a sports car on a desert highway, motion blur", "a bookshelf made of clouds, surreal concept art",
]
PREVIEW_PROMPTS, PREVIEW_SEED = 4, 1234
PROMPT_CACHE_BYTES = 8 << 30  # the rule: encode every prompt once and free the text encoders if the cache fits


def read_prompts(path):
    """One prompt per line; blank lines dropped, duplicates kept once (first occurrence order)."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    if not prompts:
        raise UserError(f"--prompts {path}: the file has no prompts (one per line)")
    return prompts


def cfg_branches(w, embedded=False, per_sample=False):
    """Batches of network work one call at CFG scale w costs in DiTBackbone.velocity: 1 for a guidance embedding,
    for w = 1 (the prompt alone) and for a batch-wide w = 0 (the empty prompt alone); else 2."""
    return 1 if embedded or w == 1 or (w == 0 and not per_sample) else 2


def _cat(conds):
    """Concatenate conditioning dicts along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class DiTBackbone(Backbone):
    """A diffusers text-to-image pipeline behind the Backbone interface (teacher = pipe.transformer).

    Conditioning `cond` is a dict of batch-first tensors (prompt embeddings and the like). Classifier-free guidance
    follows one convention, v = v_uncond + w (v_cond - v_uncond) with the empty prompt as uncond, evaluated in one
    batched call; w = 1 is the conditional branch alone. Families whose network takes the guidance scale as an input
    (FLUX.1-dev is guidance-distilled) set `guidance_embedded` and get w through that input instead, one branch."""

    guidance_embedded = False
    packing = 1                       # FLUX packs 2x2 latent patches into tokens before the transformer
    pipeline_kwargs = {}              # what the stock pipeline must be told to condition as we do

    def __init__(self, pipe, resolution, device, teacher_dtype, max_sequence_length=None):
        self.pipe, self.device, self.resolution = pipe, device, resolution
        self.max_sequence_length = max_sequence_length
        # one placement policy for every component the run uses: all of them on the run's device, in the teacher's
        # dtype. The text encoders too -- diffusers' encode_prompt sends token ids to `device`, and a T5-XXL left
        # on the CPU of a GPU machine would take hours; set_prompts() frees them once the prompt bank is cached.
        self.teacher = pipe.transformer.to(device, teacher_dtype).requires_grad_(False).eval()
        for name in ("vae", *self.text_encoders()):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device, teacher_dtype).requires_grad_(False).eval()
        self.sample_shape = self.latent_shape(resolution)  # (C, h, w)
        self.prompts, self.bank, self.uncond, self.data = [], None, None, None

    # --- what a family overrides ----------------------------------------------------------------------------------
    def encode(self, prompts):
        """list of str -> cond dict, batch len(prompts)."""
        raise NotImplementedError

    def forward(self, net, x_t, t, cond, guidance):
        """One call of `net` in our conventions: x_t (B, C, h, w), t (B,) in [0, 1] -> v (B, C, h, w)."""
        raise NotImplementedError

    def text_encoders(self):
        """The names of the pipeline's text encoders still loaded (freed ones are None)."""
        return [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(self.pipe, name, None) is not None]

    # --- shared ---------------------------------------------------------------------------------------------------
    def latent_shape(self, resolution):
        f = self.pipe.vae_scale_factor
        check_resolution(resolution, f, self.teacher.config.patch_size * self.packing)
        c = self.teacher.config.in_channels // self.packing ** 2
        return (c, resolution // f, resolution // f)

    def set_prompts(self, prompts):
        """Encode the prompt set once, on the device. If the cache fits PROMPT_CACHE_BYTES it is kept on the CPU,
        chunk by chunk, and the text encoders are freed; otherwise prompts are encoded per batch on the device and
        the encoders stay there."""
        self.prompts = list(prompts)
        with torch.no_grad():
            self.uncond = self.encode([""])  # the CFG unconditional branch, on the device
            first = self.encode(self.prompts[:1])
            per_prompt = sum(v.numel() * v.element_size() for v in first.values())
            if per_prompt * len(self.prompts) <= PROMPT_CACHE_BYTES:
                chunks = [{k: v.cpu() for k, v in self.encode(self.prompts[i:i + 16]).items()}  # to the CPU first
                          for i in range(0, len(self.prompts), 16)]
                self.bank = _cat(chunks)
                for name in self.text_encoders():
                    setattr(self.pipe, name, None)  # freed: every embedding the run will need is cached
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def cond_for(self, idx):
        """Conditioning for prompt indices idx (list of int), on the device."""
        if self.bank is not None:
            return {k: v[idx].to(self.device) for k, v in self.bank.items()}
        with torch.no_grad():
            return self.encode([self.prompts[i] for i in idx])

    def sample_batch(self, n, rng, rows=slice(None)):
        """(cond, x0_real) for `rows` of a batch of n random prompts (only those rows are encoded or moved); with a
        data set (backbone.data), the prompts are its captions and x0_real its cached latents, row for row."""
        idx = torch.randint(len(self.prompts), (n,), generator=rng, device=rng.device)[rows].tolist()
        real = self.data[idx].to(self.device) if self.data is not None else None
        return self.cond_for(idx), real

    def velocity(self, net, x_t, t, cond, guidance):
        """v_u + w (v_c - v_u) (D17); `guidance` w is a float or a per-sample (B,) tensor (a guidance interval).
        A float 1 is the conditional call alone, a float 0 the unconditional call alone (one branch each: see
        cfg_branches)."""
        B, per_sample = x_t.shape[0], torch.is_tensor(guidance)
        if self.guidance_embedded or (not per_sample and guidance == 1.0):
            return self.forward(net, x_t, t, cond, guidance)
        uncond = {k: v.expand(B, *v.shape[1:]) for k, v in self.uncond.items()}
        if not per_sample and guidance == 0.0:  # Zero-CFG: the network sees the empty prompt only
            return self.forward(net, x_t, t, uncond, guidance)
        v_uncond, v_cond = self.forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), _cat([uncond, cond]),
                                        guidance).chunk(2)  # (B, C, h, w) each
        w = guidance.view(B, *[1] * (x_t.dim() - 1)) if per_sample else guidance  # (B, 1, 1, 1) or a float
        return v_uncond + w * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x):
        """Latents (B, C, h, w) -> images (B, H, W, 3) float in [0, 1], as the stock pipeline decodes them."""
        vae = self.pipe.vae
        latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="np")

    def _dtype(self, net):
        """The dtype to feed `net`: its weights' (a LoRA view: its base's, not the float32 adapters')."""
        return net.base.dtype if isinstance(net, AdapterView) else next(net.parameters()).dtype

    def students(self, cfg, runtime):
        """Three LoRA adapters on the teacher itself ('lora' mode); or three full copies, which under torchrun are
        built already sharded after the teacher (sharded_copy): no GPU ever holds an unsharded trainable copy."""
        if cfg.mode == "lora":
            return lora_students(self, cfg.lora_rank)
        if runtime.world == 1:
            return super().students(cfg, runtime)
        shard(self.teacher)
        dtype, mp = trainable_dtype(cfg), student_precision(cfg)
        return (sharded_copy(self.teacher, dtype, mp, True), sharded_copy(self.teacher, dtype, mp, True),
                sharded_copy(self.teacher, dtype, mp, False))


class SanaBackbone(DiTBackbone):
    """SANA: Gemma-2 text embeddings with an attention mask; the transformer takes t * 1000 * timestep_scale.
    We encode without SANA's long complex_human_instruction and without resolution binning."""
    pipeline_kwargs = {"complex_human_instruction": None, "use_resolution_binning": False}

    def encode(self, prompts):
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device, clean_caption=False,
            max_sequence_length=self.max_sequence_length or 300, complex_human_instruction=None)
        return {"embeds": embeds, "mask": mask}  # (B, L, C), (B, L)

    def forward(self, net, x_t, t, cond, guidance):
        dt = self._dtype(net)
        v = net(x_t.to(dt), encoder_hidden_states=cond["embeds"].to(dt), encoder_attention_mask=cond["mask"],
                timestep=t * 1000 * net.config.timestep_scale, return_dict=False)[0]
        return v[:, :x_t.shape[1]]  # a learned-sigma head outputs 2C channels: the first C are the velocity


class SD3Backbone(DiTBackbone):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5 embeddings and pooled projections; the transformer takes t * 1000.
    The stock pipeline draws its per-step noise from torch's global RNG, not from `generator`."""
    step_noise_from_generator = False

    def encode(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length or 256)
        return {"embeds": embeds, "pooled": pooled}  # (B, L, C), (B, P)

    def forward(self, net, x_t, t, cond, guidance):
        dt = self._dtype(net)
        return net(hidden_states=x_t.to(dt), timestep=t * 1000, encoder_hidden_states=cond["embeds"].to(dt),
                   pooled_projections=cond["pooled"].to(dt), return_dict=False)[0]


class FluxBackbone(DiTBackbone):
    """FLUX.1: T5 embeddings, pooled CLIP, 2-D position ids; latents are packed 2x2 into tokens; t in [0, 1].
    FLUX.1-dev is guidance-distilled: the guidance scale is an input embedding, never a second branch. Every CFG
    scale of the config is fed to that embedding (0 is embedded guidance 0, not the empty prompt: no Zero-CFG here;
    outside a guidance interval the embedding gets 1); the generator gets cfg.student_guidance (pass the same value as
    guidance_scale to the stock FluxPipeline). Per-step noise: torch's global RNG, drawn in the packed layout."""
    guidance_embedded = True
    packing = 2
    step_noise_from_generator = False

    def encode(self, prompts):
        embeds, pooled, txt_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=self.device, max_sequence_length=self.max_sequence_length or 512)
        self.txt_ids = txt_ids  # (L, 3), the same for every prompt
        return {"embeds": embeds, "pooled": pooled}  # (B, L, C), (B, P)

    @staticmethod
    def pack(x):
        B, C, h, w = x.shape
        x = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
        return x.reshape(B, (h // 2) * (w // 2), C * 4)  # (B, tokens, 4C)

    @staticmethod
    def unpack(x, h, w):
        B, _, D = x.shape
        x = x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
        return x.reshape(B, D // 4, h, w)  # (B, C, h, w)

    def forward(self, net, x_t, t, cond, guidance):
        dt, (_, h, w) = self._dtype(net), self.sample_shape
        ids = torch.zeros(h // 2, w // 2, 3, device=x_t.device)
        ids[..., 1] += torch.arange(h // 2, device=x_t.device)[:, None]  # row index
        ids[..., 2] += torch.arange(w // 2, device=x_t.device)[None, :]  # column index
        g = (torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])  # (B,)
             if net.config.guidance_embeds else None)
        v = net(hidden_states=self.pack(x_t).to(dt), timestep=t, guidance=g, pooled_projections=cond["pooled"].to(dt),
                encoder_hidden_states=cond["embeds"].to(dt), txt_ids=self.txt_ids, img_ids=ids.reshape(-1, 3),
                return_dict=False)[0]
        return self.unpack(v, h, w)

    def step_noise(self, shape, rng):
        B, C, h, w = shape  # FlowMatchEulerDiscreteScheduler draws in the packed layout the pipeline steps in
        n = torch.randn((B, (h // 2) * (w // 2), C * 4), generator=rng, device=self.device)  # (B, tokens, 4C)
        return self.unpack(n, h, w)


FAMILIES = {"SanaPipeline": SanaBackbone, "StableDiffusion3Pipeline": SD3Backbone, "FluxPipeline": FluxBackbone}


# ------------------------------------------------------------------------------------------------------------------
# 9. LoRA mode: one frozen base transformer, adapters "generator", "fake" and "ema"; the teacher is the base
# ------------------------------------------------------------------------------------------------------------------
#
# Two peft pitfalls, handled here once: (1) peft's set_adapter() makes ONLY the active adapter trainable, so after every
# switch the requires_grad flags are put back (generator and fake train, ema does not), otherwise a backward pass after
# a switch would silently skip the other adapter; (2) gradient checkpointing recomputes a block during backward, when
# another adapter may be active, so the checkpoint function records the adapter of the forward pass and replays it --
# on that block's own LoRA layers only (a switch of the whole base would visit every module of it once per block).

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of every diffusers DiT family
LORA_TRAINABLE = ("generator", "fake")


def _tuner_layers(module):
    """[(peft LoRA layer, [(lora parameter, trains?)])] inside `module`, found once and cached on it."""
    cached = module.__dict__.get("_sid_tuner_layers")
    if cached is None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        cached = [(m, [(p, n.split(".")[1] in LORA_TRAINABLE) for n, p in m.named_parameters()
                       if n.startswith("lora_")]) for m in module.modules() if isinstance(m, BaseTunerLayer)]
        module.__dict__["_sid_tuner_layers"] = cached
    return cached


def _adapter_state(module):
    """The adapter a forward pass of `module` runs with now: its name, or None when adapters are disabled."""
    layers = _tuner_layers(module)
    if not layers:
        return None
    layer = layers[0][0]
    return None if layer.disable_adapters else layer.active_adapters[0]


def _set_adapter_state(module, name, force=False):
    if _adapter_state(module) == name and not force:
        return
    for layer, lora_params in _tuner_layers(module):
        layer.enable_adapters(name is not None)
        if name is not None:
            layer.set_adapter(name)
        for p, trains in lora_params:  # pitfall (1): restore what trains, whatever set_adapter did
            p.requires_grad_(trains)


@contextlib.contextmanager
def use_adapter(module, name):
    previous = _adapter_state(module)
    _set_adapter_state(module, name)
    try:
        yield
    finally:
        _set_adapter_state(module, previous)


def adapter_checkpoint(base):
    """A gradient-checkpointing function for diffusers that replays the forward pass's adapter in the block it
    recomputes (pitfall 2). `base` is the model it serves (diffusers' hook signature; the block is what matters)."""
    import torch.utils.checkpoint

    def checkpoint(block, *args):
        state = _adapter_state(block)

        def run(*a):
            with use_adapter(block, state):
                return block(*a)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    return checkpoint


class AdapterView(nn.Module):
    """The shared base seen through one adapter (`adapter=None`: the teacher, adapters off). The base is not a
    submodule: parameters() and state_dict() are the adapter's tensors only (the base's frozen ones for the teacher),
    so optimizers, EMA and checkpoints handle a few MB, not the whole DiT."""

    def __init__(self, base, adapter):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.adapter = adapter

    config = property(lambda self: self.base.config)
    proj_out = property(lambda self: self.base.proj_out)

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        for n, p in self.base.named_parameters():
            if (self.adapter is None and "lora_" not in n) or (self.adapter and f".{self.adapter}." in n):
                yield n, p

    def parameters(self, recurse=True):
        return (p for _, p in self.named_parameters())

    def _key(self, name):  # adapter-agnostic names, so generator and ema states are interchangeable
        return name.replace(f".{self.adapter}.", ".") if self.adapter else name

    def state_dict(self, *args, **kwargs):
        return {self._key(n): p.detach() for n, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(state[self._key(n)])

    def enable_gradient_checkpointing(self):
        self.base.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_checkpoint(self.base))

    def forward(self, *args, **kwargs):
        with use_adapter(self.base, self.adapter):
            return self.base(*args, **kwargs)

    def merged_state_dict(self):
        """The base's state dict with this adapter's LoRA fused into its weights: W + delta, added in float32 (a
        bf16 sum would drop every bit of delta below 2^-9 |W|), then stored in W's dtype."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        state = {n.replace(".base_layer", ""): p.detach()
                 for n, p in self.base.state_dict().items() if "lora_" not in n}
        for name, module in self.base.named_modules():
            if isinstance(module, BaseTunerLayer) and self.adapter in module.lora_A:
                w = module.get_base_layer().weight.detach()
                delta = module.get_delta_weight(self.adapter).detach()
                state[f"{name}.weight"] = (w.float() + delta.float()).to(w.dtype)
        return state


def lora_students(backbone, rank):
    """Adapters on the teacher itself: returns (generator, fake, ema) views and makes backbone.teacher the base
    with adapters off. LoRA B starts at zero, so all three start as the teacher; ema starts equal to generator."""
    from peft import LoraConfig
    import warnings
    base = backbone.teacher
    for name in ("generator", "fake", "ema"):
        with warnings.catch_warnings():  # peft warns that a model gets several adapters: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            base.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                        init_lora_weights=True), adapter_name=name)
    views = [AdapterView(base, name) for name in ("generator", "fake", "ema")]
    for view in views:  # trainable adapter weights in float32 even on a bf16 base (bf16 compute comes from autocast)
        for p in view.parameters():
            p.data = p.data.float()
    views[2].load_state_dict(views[0].state_dict())
    _set_adapter_state(base, None, force=True)
    backbone.teacher = AdapterView(base, None)
    return views


# ------------------------------------------------------------------------------------------------------------------
# 10. Real images for data-aided SiD (D16): read, resize + center-crop, encode once with the teacher's VAE
# ------------------------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_captions(path):
    """[(image path, caption)] and the number of entries without a usable caption. `path`: a folder of images with
    same-name .txt captions, or a .jsonl of {"image": path relative to the file, "text": caption}."""
    pairs, no_caption = [], 0
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            txt = os.path.join(path, stem + ".txt")
            caption = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else ""
            if caption:
                pairs.append((os.path.join(path, name), caption))
            else:
                no_caption += 1
    elif os.path.isfile(path) and path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    image, caption = str(rec["image"]), str(rec["text"]).strip()
                except (ValueError, KeyError, TypeError):
                    caption = "" if line.strip() else None
                if caption:
                    pairs.append((os.path.join(os.path.dirname(path), image), caption))
                elif caption is not None:
                    no_caption += 1
    else:
        raise UserError(f"--data {path}: not a folder of images with .txt captions, nor a .jsonl file")
    return pairs, no_caption


def load_image(path, resolution):
    """An RGB image resized (shorter side) and center-cropped to a square: (1, 3, R, R) in [-1, 1]."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return (x.permute(2, 0, 1)[None].float() / 127.5 - 1.0)  # (1, 3, R, R)


def encode_data(backbone, path, cache_path):
    """Latents (N, C, h, w) on the CPU and captions of a data set, encoded once and cached at `cache_path`
    (reused while path and resolution match). Unreadable images and missing captions are skipped and counted."""
    key = dict(path=os.path.abspath(path), resolution=backbone.resolution, teacher=backbone.source)
    if os.path.isfile(cache_path):
        cache = torch.load(cache_path, weights_only=False)
        if cache["key"] == key:
            return cache["latents"], cache["captions"], cache["skipped"]
    pairs, no_caption = read_image_captions(path)
    latents, captions, unreadable = [], [], 0
    vae = backbone.pipe.vae
    for image_path, caption in pairs:
        try:
            x = load_image(image_path, backbone.resolution)
        except Exception:  # corrupt, truncated, missing, not an image: skip it, count it, go on
            unreadable += 1
            continue
        with torch.no_grad():
            enc = vae.encode(x.to(backbone.device, vae.dtype))
            # KL VAEs (SD3, FLUX) give a distribution: take its mode; SANA's DC-AE gives the latent directly
            z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent
            z = (z.float() - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
        latents.append(z.cpu())
        captions.append(caption)
    skipped = dict(unreadable=unreadable, no_caption=no_caption)
    if not latents:
        raise UserError(f"--data {path}: no usable image-caption pairs ({unreadable} unreadable, "
                        f"{no_caption} without caption)")
    latents = torch.cat(latents)  # (N, C, h, w)
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
    atomic_save(dict(key=key, latents=latents, captions=captions, skipped=skipped), cache_path)
    return latents, captions, skipped


# ------------------------------------------------------------------------------------------------------------------
# 11. Runtime: device, precision, ranks, FSDP2 -- and checkpoints. The losses and samplers never see any of it
# ------------------------------------------------------------------------------------------------------------------

# cuDNN's fused attention, torch's first choice for scaled_dot_product_attention on Hopper GPUs, returned NaN in the
# backward pass through FLUX's joint attention on an H200 (torch 2.11) where the flash, memory-efficient and math
# kernels agreed and stayed finite: it is switched off, and flash attention serves instead.
torch.backends.cuda.enable_cudnn_sdp(False)


def autocast(cfg, device):
    """bf16 autocast for --precision bf16-autocast and bf16, on the CPU exactly as on CUDA (so the CPU tests run the
    GPU's code path); a no-op in fp32."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Runtime:
    """Where the ranks live, so the math never sees them. One process: rank 0 of 1. Under torchrun: full mode shards
    every network with FSDP2 (gradients are reduce-scattered inside backward, averaged over ranks); LoRA mode keeps a
    replica of the adapters per rank and averages their gradients with an all-reduce -- data parallel as DDP does
    it, done by hand because DDP's wrapper expects every forward to be followed by a backward into its own weights,
    and SiD's generator phase runs the fake network forward without training it."""

    def __init__(self, rank=0, world=1, device=None, average_grads=False):
        self.rank, self.world, self.device, self.average_grads = rank, world, device, average_grads

    def all_finite(self, loss):
        """Skip decisions must agree on every rank (a backward is a collective under FSDP)."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def update(self, loss, net, opt, backward=None):
        """One optimizer step of `net` on `loss`: `backward()` (default loss.backward()) must put gradient into
        net's trainable weights only. Returns False (and steps nothing) when the loss is not finite on some rank."""
        opt.zero_grad(set_to_none=True)
        if not self.all_finite(loss):
            return False
        (backward or loss.backward)()
        if self.average_grads and self.world > 1:
            import torch.distributed as dist
            for p in net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)  # the mean over ranks: the gradient of the global batch's mean loss
        opt.step()
        return True

    def same_on_all_ranks(self, nets, what):
        """Fail loudly unless every rank holds the same weights (sum and sum of squares of the local tensors)."""
        if self.world == 1:
            return
        import torch.distributed as dist
        local = torch.stack([sum((p.detach().float().to_local() if hasattr(p, "to_local") else p.detach().float())
                                 .double().pow(k).sum() for n in nets for p in n.parameters()) for k in (1, 2)])
        local = local.to(self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        sharded = any(hasattr(p, "to_local") for n in nets for p in n.parameters())
        if not sharded and not all(torch.allclose(g, gathered[0], rtol=1e-9) for g in gathered):
            raise RuntimeError(f"{what}: the ranks hold different weights")


def setup_runtime(cfg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Runtime(device=resolve_device(cfg.device))
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, device, average_grads=cfg.mode == "lora")


def student_precision(cfg):
    """FSDP2's mixed-precision policy for the trainable copies: with bf16 autocast over float32 masters, all-gather
    the weights in bf16 (half the traffic and unsharded memory) and reduce-scatter gradients in float32."""
    if cfg.precision != "bf16-autocast":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(net, mp_policy=None, device_type=None):
    """FSDP2: each transformer block its own unit, then the root, on a mesh of the network's device type (FSDP2's
    default mesh is the accelerator's, which a CPU run on a GPU machine must not use)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type or next(net.parameters()).device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, **(dict(mp_policy=mp_policy) if mp_policy else {}))
    for child in net.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, **kw)
    fully_shard(net, **kw)
    return net


def sharded_copy(teacher, dtype, mp_policy, trainable):
    """A copy of the sharded teacher, built shard by shard: the module is made on the meta device (no memory),
    sharded like the teacher, allocated, and each rank fills its own shards from the teacher's, cast to `dtype`."""
    with torch.device("meta"):
        net = type(teacher).from_config(teacher.config).to(dtype)
    device = next(teacher.parameters()).device
    net.requires_grad_(trainable).train(trainable)
    shard(net, mp_policy, device.type)  # the module is still on the meta device: the mesh is the teacher's
    net.to_empty(device=device)
    with torch.no_grad():
        for (n, p), (m, q) in zip(net.named_parameters(), teacher.named_parameters(), strict=True):
            assert n == m, (n, m)
            p.to_local().copy_(q.to_local())  # the same FSDP2 layout: local shard to local shard
        for b, c in zip(net.buffers(), teacher.buffers(), strict=True):
            b.copy_(c)  # buffers are not sharded
    return net


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a corrupt `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# config fields that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_FIELDS = ("iters", "out", "log_every", "save_every", "eval_every", "device", "progress")


class Checkpoint:
    """The run folder cfg.out: checkpoint, resume and log. One checkpoint is a file (checkpoint.pt, replicated state,
    written by rank 0) or, under FSDP2, a torch.distributed.checkpoint folder (checkpoint/, every rank writes its
    shards; meta.pt holds the rest). Either is written beside and renamed into place: a crash never leaves a torn
    checkpoint. `nets`: {name: (network, optimizer or None)}."""

    def __init__(self, cfg, runtime, nets):
        self.cfg, self.runtime, self.nets = cfg, runtime, nets
        self.sharded = runtime.world > 1 and cfg.mode == "full"
        self.writer = runtime.rank == 0  # rank 0 alone writes files and logs
        self.path = self.log_path = None
        if cfg.out:
            os.makedirs(cfg.out, exist_ok=True)
            self.path = checkpoint_path(cfg.out, self.sharded)
            self.log_path = os.path.join(cfg.out, "log.jsonl")

    def load(self, rng):
        """Restore the networks, optimizers and rng from cfg.out if a checkpoint is there: (step, skipped)."""
        if not (self.path and os.path.exists(self.path)):
            return 0, 0
        if self.sharded:
            meta = read_checkpoint_meta(self.path)
        else:  # one read: the file holds the meta and the state
            meta = torch.load(self.path, map_location="cpu", weights_only=False)
        diff = {k: (v, getattr(self.cfg, k)) for k, v in meta["config"].items()
                if k not in RESUMABLE_FIELDS and getattr(self.cfg, k, v) != v}
        if diff:
            raise UserError(f"{self.path} was written with a different config "
                            f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                            "use another --out or the same settings")
        if meta["step"] > self.cfg.iters:
            raise UserError(f"{self.path} is at iteration {meta['step']}, beyond --iters {self.cfg.iters}; "
                            "use another --out")
        if self.sharded:  # fill the sharded state in place from the checkpoint folder
            import torch.distributed.checkpoint as dcp
            state = self._state()
            # partial: Adam keeps no state for a parameter that never had a gradient (an unused embedder, say)
            dcp.load(state, checkpoint_id=self.path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
            self._set_state(state)
        else:
            self._set_state({name: {"model": meta[name], "optim": meta.get(f"opt_{name}")} for name in self.nets})
        rng.set_state(meta["rng"])
        if self.writer:
            print(f"resumed from {self.path} at iteration {meta['step']}")
        if self.writer and os.path.exists(self.log_path):  # drop log lines written after the checkpoint: redone
            with open(self.log_path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= meta["step"]]
            with open(self.log_path, "w") as f:
                f.writelines(kept)
        return meta["step"], meta["skipped"]

    def save(self, rng, step, skipped):
        if not self.path:
            return
        meta = dict(rng=rng.get_state(), step=step, skipped=skipped, config=dataclasses.asdict(self.cfg))
        if not self.sharded:
            if self.writer:
                state = {name: net.state_dict() for name, (net, _) in self.nets.items()}
                state.update({f"opt_{name}": opt.state_dict() for name, (_, opt) in self.nets.items() if opt})
                atomic_save(dict(meta, **state), self.path)
            return
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        tmp = f"{self.path}.tmp"
        if self.writer:
            remove_path(tmp)
        dist.barrier()
        dcp.save(self._state(), checkpoint_id=tmp)  # every rank writes its shards
        if self.writer:
            torch.save(meta, os.path.join(tmp, "meta.pt"))
            replace_path(tmp, self.path)
        dist.barrier()

    def log(self, bar, m, step, skipped, seconds):
        if not self.writer:
            return
        bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss_fake", "score_gap", "loss_gen", "loss_d") if k in m})
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(dict(step=step, time=round(seconds, 3), skipped=skipped,
                                        **{k: v for k, v in m.items() if k != "nonfinite"})) + "\n")

    def _state(self):
        """DCP's sharded state dicts of every network (and optimizer), to save or to load into in place."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {name: dict(model=get_model_state_dict(net), **({"optim": get_optimizer_state_dict(net, opt)}
                                                                if opt else {}))
                for name, (net, opt) in self.nets.items()}

    def _set_state(self, state):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        for name, (net, opt) in self.nets.items():
            if self.sharded:
                set_model_state_dict(net, state[name]["model"])
                if opt:
                    set_optimizer_state_dict(net, opt, state[name]["optim"])
            else:
                net.load_state_dict(state[name]["model"])
                if opt:
                    opt.load_state_dict(state[name]["optim"])


def checkpoint_path(out, sharded):
    return os.path.join(out, "checkpoint" if sharded else "checkpoint.pt")


META_KEYS = ("rng", "step", "skipped", "config")  # what a checkpoint holds beside the weights and optimizer state


def read_checkpoint_meta(path):
    """Step, config and rng of a checkpoint (file or folder), without reading its weights."""
    if os.path.isdir(path):
        return torch.load(os.path.join(path, "meta.pt"), weights_only=False)
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # a memory map: no weight is read
    return {k: ck[k] for k in META_KEYS}


def load_checkpoint_weights(out, which, net):
    """Load network `which` ('ema' or 'generator') of the run in `out` into `net` in place (net's dtype and device).
    Only that network's tensors are read: from a sharded folder through DCP with a state dict of that one network,
    from a file through a memory map. Returns the checkpoint's meta (step, config)."""
    folder, path = checkpoint_path(out, True), checkpoint_path(out, False)
    if os.path.isdir(folder):
        import torch.distributed.checkpoint as dcp
        state = {which: {"model": net.state_dict()}}  # in place: DCP reads into these tensors, casting to their dtype
        dcp.load(state, checkpoint_id=folder, no_dist=True)  # this process alone, even inside a process group
        net.load_state_dict(state[which]["model"])
        return read_checkpoint_meta(folder)
    if not os.path.isfile(path):
        raise UserError(f"--out {out}: no checkpoint there")
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    net.load_state_dict(ck[which])
    return {k: ck[k] for k in META_KEYS}


def remove_path(path):
    import shutil
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def replace_path(tmp, path):
    """Move a finished file or folder `tmp` onto `path`: the old one is renamed away first and removed last, so
    `path` always names a complete version."""
    old = f"{path}.old"
    remove_path(old)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


# ------------------------------------------------------------------------------------------------------------------
# 12. Config: one typed place for every default; presets by name override a few fields; the CLI is generated
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # --- the teacher ---
    teacher: str = "toy"            # a preset name (see PRESETS), a local diffusers folder or a hub id
    # --- SiD (derivation.md) ---
    loss: str = "sid"               # 'sid' (D11) or 'dmd' (D14)
    alpha: float = 1.0              # weight of the fake-score term in the generator loss (D11); original SiD: 1.2
    weighting: str = "1-t"          # w(t), one of WEIGHTINGS (D12)
    t_dist: str = "logit-normal"    # times for both updates: 'logit-normal' (official) or 'uniform'
    steps: int = 4                  # K, the generator's number of steps; t_k = 1 - k/K (D13)
    noise: str = "fresh"            # re-noising between generator steps: 'fresh', 'fixed' or 'ddim'
    train_step: str = "uniform"     # which step is trained: 'uniform' k in {1..K} (the paper) or 'last' (k = K)
    fake_updates: int = 1           # fake-network updates per generator update
    cfg_train_fake: float = 1.0     # CFG scale of the fake network in its own update (SiD-LSG)
    cfg_eval_fake: float = 1.0      # CFG scale of the fake network inside the generator loss
    cfg_eval_real: float = 1.0      # CFG scale of the teacher inside the generator loss
    cfg_t_min: float = 0.0          # guidance interval (D17), its low end: the three CFG scales apply only at noise
                                    # levels t in [cfg_t_min, cfg_t_max]; elsewhere every network is called unguided
    cfg_t_max: float = 1.0          # guidance interval (D17), its high end (1: guidance up to pure noise)
    # --- optimisation ---
    iters: int = 1000               # generator updates in the run
    batch_size: int = 256           # generated samples per update, per process
    lr_gen: float = 5e-6            # Adam learning rate of the generator
    lr_fake: float = 5e-6           # Adam learning rate of the fake network
    adam_eps: float = 1e-8          # Adam epsilon (betas are (0, 0.999), as the official code)
    lr_schedule: str = "constant"   # 'constant' (official) or 'cosine' (to zero at the last iteration)
    ema_decay: float = 0.999        # decay of the generator's EMA, the exported student
    max_nonfinite: int = 3          # stop after this many iterations in a row with a non-finite loss
    seed: int = 0                   # seed of every random draw of the run
    student_guidance: float = 1.0   # guidance the generator is called with: 1 (no CFG); FLUX: its embedded guidance
    # --- data-aided SiD (D16): on when the backbone has real data (run_toy.py --data-aided, sid_flow.py --data) ---
    gan_freeze_images: int = 20_000  # generator frozen (fake network / discriminator only) for these many images
    gan_start_images: int = 40_000   # from here the generator objective is (1 - gan_weight) SiD + gan_weight GAN
    gan_weight: float = 0.5         # share of the GAN term in the generator objective, data-aided runs
    # --- data and I/O ---
    resolution: int = 0             # image side in pixels; 0: the teacher's native size
    prompts: str = ""               # a text file, one prompt per line; empty: the built-in DEFAULT_PROMPTS
    data: str = ""                  # real images for data-aided SiD: a folder (x.png + x.txt) or a .jsonl
    out: str = "out/sid"            # run folder: checkpoint, log, previews, the exported student
    log_every: int = 10             # iterations between lines of OUT/log.jsonl
    save_every: int = 500           # iterations between checkpoints; 0: only at the end
    eval_every: int = 0             # iterations between previews (the toy: distance curve); 0: never
    device: str = "auto"            # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'
    precision: str = "fp32"         # 'fp32'; 'bf16-autocast' (CUDA: bf16 teacher and compute, fp32 trainable weights);
                                    # 'bf16' (pure bf16, also the trainable weights: use --adam-eps 1e-4)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    mode: str = "full"              # 'full': three copies of the DiT; 'lora': one frozen DiT, LoRA adapters (peft)
    lora_rank: int = 64             # rank of the LoRA adapters (--mode lora)
    progress: bool = True           # show a progress bar


CHOICES = dict(loss=("sid", "dmd"), lr_schedule=("constant", "cosine"), mode=("full", "lora"),
               weighting=WEIGHTINGS, t_dist=("logit-normal", "uniform"), noise=("fresh", "fixed", "ddim"),
               train_step=("uniform", "last"), precision=("fp32", "bf16-autocast", "bf16"))

# Presets change only what differs from the Config defaults. The toy preset uses 'last'-step training and a larger
# learning rate: see README "Toy results" and derivation.md (D13) for why the uniform mixture is not the toy default.
# The DiT presets: the official SiD-DiT release's settings (Adam(0, 0.999), lr 5e-6, SANA's CFG 4.5 for
# all three scales, bf16 autocast); batch_size is per process (the paper's global batch is 256). SD3's CFG reuses
# SANA's value and FLUX's guidance embedding its usual 3.5 -- starting points, not tuned by this project. One change
# from the paper, chosen by run_toy.py's guidance study on digits (README, "Guided distillation"): guidance only for
# t in [0.2, 0.6] (D17); --cfg-t-min 0 --cfg-t-max 1 restores the paper's guidance at every t.
_GUIDANCE_INTERVAL = dict(cfg_t_min=0.2, cfg_t_max=0.6)
_DIT = dict(precision="bf16-autocast", batch_size=4, iters=20_000, save_every=500, eval_every=500, log_every=10,
            **_GUIDANCE_INTERVAL)
_CFG45 = dict(cfg_train_fake=4.5, cfg_eval_fake=4.5, cfg_eval_real=4.5)
_FLUX = dict(cfg_train_fake=3.5, cfg_eval_fake=3.5, cfg_eval_real=3.5, student_guidance=3.5)
# Each preset's defaults fit one 80 GB GPU by the memory plan (README, "Memory"): the larger teachers train LoRA
# adapters with gradient checkpointing there; on several GPUs pass --mode full (FSDP2) as the paper trains.
_ONE_GPU = dict(mode="lora", grad_checkpointing=True)
HUB_IDS = {
    "sana-0.6b-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    "sana-1.6b-1024": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
}
PRESETS = {
    "toy": dict(teacher="toy", train_step="last", iters=400, batch_size=2048, lr_gen=8e-4, lr_fake=2.4e-3,
                fake_updates=2, weighting="inv-l1", ema_decay=0.99, out="out/toy", log_every=20, save_every=0,
                gan_weight=0.01),  # the SiD term sums 2 dims here, not 10^4+: the GAN term must weigh far less
    # run_toy.py --dataset digits: a 3-block SANA DiT on 8x8 digits, the class as a one-token caption. Guided
    # distillation at the teacher's CFG 2 on all three scales, only for t in [0.2, 0.6] (D17): with guidance at every
    # t the students lose the teacher's diversity (README, "Guided distillation")
    "digits": dict(teacher="digits", train_step="last", iters=300, batch_size=128, lr_gen=1e-4, lr_fake=3e-4,
                   weighting="inv-l1", ema_decay=0.99, cfg_train_fake=2.0, cfg_eval_fake=2.0, cfg_eval_real=2.0,
                   out="out/digits", log_every=20, save_every=0, gan_weight=0.01, **_GUIDANCE_INTERVAL),
    "sana-0.6b-512": dict(_DIT, **_CFG45, resolution=512, batch_size=8),
    "sana-1.6b-1024": dict(_DIT, **_CFG45, resolution=1024, grad_checkpointing=True),
    "sd3-medium": dict(_DIT, **_CFG45, **_ONE_GPU, resolution=1024),
    "sd3.5-medium": dict(_DIT, **_CFG45, **_ONE_GPU, resolution=1024),
    "sd3.5-large": dict(_DIT, **_CFG45, **_ONE_GPU, resolution=1024),
    "flux-dev": dict(_DIT, **_FLUX, **_ONE_GPU, resolution=1024),
}


def check_config(cfg):
    """Fail loudly, with one line, on values the algorithm cannot use."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of: {', '.join(allowed)}")
    for name in ("steps", "iters", "batch_size", "fake_updates", "max_nonfinite", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr_gen", "lr_fake", "adam_eps"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0.0 <= cfg.cfg_t_min < cfg.cfg_t_max <= 1.0:
        raise UserError(f"the guidance interval needs 0 <= --cfg-t-min < --cfg-t-max <= 1, got "
                        f"[{cfg.cfg_t_min}, {cfg.cfg_t_max}]")
    if not math.isfinite(cfg.alpha):
        raise UserError(f"--alpha must be finite, got {cfg.alpha}")
    return cfg


def make_config(preset=None, **overrides):
    """Config defaults <- preset <- explicit overrides (None values are ignored), then checked."""
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    values = dict(PRESETS.get(preset, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return check_config(Config(**values))


def _field_comments():
    """{field: the comment beside it in Config, continuation lines joined}: the meaning every flag's help shows."""
    import inspect
    import re
    comments, last = {}, None
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r"\s{4}(\w+): \w+ = [^#]*#\s*(.*)", line)
        more = re.match(r"\s{5,}#\s*(.*)", line)  # a comment line indented past the fields: the one above goes on
        if field:
            last = field.group(1)
            comments[last] = field.group(2)
        elif more and last:
            comments[last] += " " + more.group(1)
        else:
            last = None
    return comments


def add_config_flags(parser, skip=(), presets=None, shown=None):
    """One --flag per Config field (dashes for underscores), default None so that the preset fills the gaps. Its help
    is the comment beside the field and the default each preset gives it: `presets` {label: preset name or None (the
    Config defaults)}; `shown` {field: text} replaces the default shown for a field that is filled elsewhere."""
    presets = presets or {"": None}
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        values = {label: PRESETS.get(name, {}).get(f.name, f.default) for label, name in presets.items()}
        common = max(values.values(), key=list(values.values()).count)  # the value most presets share
        rest = "; ".join(f"{label}: {v}" for label, v in values.items() if v != common)
        default = (shown or {}).get(f.name, f"{'none' if common == '' else common}" + (f" ({rest})" if rest else ""))
        help = f"{comments[f.name]} [default: {default}]".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=None, choices=CHOICES.get(f.name), help=help)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2; the description and epilog are printed as
    written (they hold commands)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this machine has no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows")


# ------------------------------------------------------------------------------------------------------------------
# 13. Teachers from disk or hub, the memory plan, the benchmark, export, previews, and the command line
# ------------------------------------------------------------------------------------------------------------------

def preset_configs(name):
    """The project's own copy of a preset's configs (model_index.json, transformer/config.json): what --dry-run and
    --bench need, offline and without a hub token (FLUX.1-dev, SD3 and SD3.5 are gated)."""
    return os.path.join(HERE, "assets", "hf", "hub", f"models--{HUB_IDS[name].replace('/', '--')}", "snapshots",
                        "0" * 40)


def resolve_teacher(name, configs_only=False):
    """A preset name -> its hub id (its configs in assets/ when `configs_only`); an existing folder -> itself (it
    must hold model_index.json); 'owner/repo' -> a hub id. Returns (source, pipeline class name), read from
    model_index.json -- never guessed from the name."""
    src = preset_configs(name) if configs_only and name in HUB_IDS else HUB_IDS.get(name, name)
    if os.path.exists(src):
        index = os.path.join(src, "model_index.json")
        if not os.path.isfile(index):
            raise UserError(f"--teacher {name}: {src} is not a diffusers pipeline folder (no model_index.json)")
    elif src.count("/") == 1 and not src.startswith((".", "/", "~")):
        index = _hub_file(name, src, "model_index.json")
    else:
        raise UserError(f"--teacher {name}: not a preset ({', '.join(HUB_IDS)}), "
                        "an existing folder, or a hub id owner/repo")
    with open(index) as f:
        family = json.load(f).get("_class_name", "?")
    if family not in FAMILIES:
        raise UserError(f"--teacher {name}: pipeline class {family} is not supported "
                        f"(supported: {', '.join(FAMILIES)})")
    return src, family


def _hub_file(name, repo, filename):
    """hf_hub_download of one file, from the cache when it is there; otherwise it fails at once, in one line that says
    why (offline, unreachable, gated, missing), instead of the hub client's minute of retries."""
    import socket
    import urllib.parse
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not cached: ask the hub below
        pass
    where = f"--teacher {name}: cannot read {repo}/{filename}"
    local = "or give --teacher a local pipeline folder"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where}: HF_HUB_OFFLINE is set and the file is not in the hub cache "
                        f"({constants.HF_HUB_CACHE}); download the model where the hub is reachable, {local}")
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"{where}: the hub ({url.hostname}) is unreachable ({e}); offline, set HF_HUB_OFFLINE=1 "
                        f"with the model in the hub cache, {local}")
    try:
        return hf_hub_download(repo, filename)
    except GatedRepoError:
        raise UserError(f"{where}: the model is gated: accept its licence at https://huggingface.co/{repo}, then log "
                        "in with `hf auth login` (older clients: `huggingface-cli login`) or set HF_TOKEN")
    except RepositoryNotFoundError:
        raise UserError(f"{where}: no such model on the hub (or a private one: log in with `hf auth login`)")
    except Exception as e:
        raise UserError(f"{where} ({type(e).__name__}: {' '.join(str(e).split())})")


def teacher_dtype(cfg):
    """The frozen teacher's (and every pipeline component's) dtype: bf16 unless the run is fp32, on any device."""
    return torch.float32 if cfg.precision == "fp32" else torch.bfloat16


def load_backbone(cfg, device, src=None, family=None):
    """The teacher pipeline as a Backbone, at cfg.resolution (0: the transformer's native size)."""
    import diffusers
    import huggingface_hub
    import transformers
    for lib in (diffusers, transformers, huggingface_hub):  # their notes and bars are noise here; failures raise
        lib.utils.logging.set_verbosity(lib.utils.logging.CRITICAL)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    if src is None:
        src, family = resolve_teacher(cfg.teacher)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(src, dtype=teacher_dtype(cfg))
    except (OSError, ValueError) as e:  # missing weights (a configs-only cache or folder), a broken pipeline
        raise UserError(f"cannot load the pipeline {src}: {' '.join(str(e).split())} (a cache or folder holding only "
                        "configs, such as assets/hf, serves --dry-run alone)")
    pipe.set_progress_bar_config(disable=True)
    resolution = cfg.resolution or (getattr(pipe.transformer.config, "sample_size", None) or 128) * pipe.vae_scale_factor
    backbone = FAMILIES[family](pipe, resolution, device, teacher_dtype(cfg))
    backbone.source, backbone.family = src, family
    return backbone


# --- the memory plan (--dry-run): from the configs alone, before any weights load --------------------------------

def _read_json(src, name):
    if os.path.isdir(src):
        with open(os.path.join(src, name)) as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download
    with open(hf_hub_download(src, name)) as f:
        return json.load(f)


def meta_transformer(src):
    """The teacher's transformer built on the meta device from its config.json: shapes, no memory, no weights."""
    import diffusers
    index = _read_json(src, "model_index.json")
    config = _read_json(src, "transformer/config.json")
    with torch.device("meta"):
        return getattr(diffusers, index["transformer"][1]).from_config(config)


# What the memory plan and the benchmark need to know of each family beyond its transformer config: the text tokens
# its encoders produce (SANA: Gemma-2 at 300; SD3: 77 CLIP + 256 T5; FLUX: 512 T5), the VAE's spatial factor (DC-AE
# 32, KL 8), and the text encoders' size (Gemma-2-2B; CLIP-L + CLIP-G + T5-XXL; CLIP-L + T5-XXL), which are alive
# on the GPU while the prompt bank is encoded, before the students are built.
TEXT_TOKENS = {"SanaPipeline": 300, "StableDiffusion3Pipeline": 77 + 256, "FluxPipeline": 512}
VAE_FACTOR = {"SanaPipeline": 32, "StableDiffusion3Pipeline": 8, "FluxPipeline": 8}
TEXT_ENCODER_PARAMS = {"SanaPipeline": 2.61e9, "StableDiffusion3Pipeline": 0.12e9 + 0.69e9 + 4.76e9,
                       "FluxPipeline": 0.12e9 + 4.76e9}
# Activations a transformer block saves for backward, in elements per token and per channel of its width (flash
# attention: no tokens^2 term), for a network whose weights train and for one whose weights are frozen (autograd
# then keeps only what the input gradient needs: the teacher, and the LoRA base). With gradient checkpointing a
# block keeps CHECKPOINTED_INPUTS instead (its inputs). Measured with saved-tensor hooks (SavedActivations) on small
# configurations of each family; test_memory_plan_matches_measured_bytes holds the plan to the measurement.
SAVED_PER_BLOCK = {"SanaPipeline": (41.0, 35.0), "StableDiffusion3Pipeline": (18.0, 10.0), "FluxPipeline": (24.0, 12.0)}
CHECKPOINTED_INPUTS = {"SanaPipeline": (2.8, 1.1), "StableDiffusion3Pipeline": (2.0, 1.35), "FluxPipeline": (2.15, 1.6)}
# What a text token costs inside a block, relative to an image token: SD3 and FLUX run text tokens through the whole
# (joint) block; SANA's enter only its cross-attention, as keys and values.
TEXT_IN_BLOCKS = {"SanaPipeline": 0.1, "StableDiffusion3Pipeline": 1.0, "FluxPipeline": 1.0}


def vae_factor(src, family):
    """The VAE's spatial factor, from the pipeline's vae/config.json when there is one (2^(number of blocks - 1), as
    diffusers computes it), else the family's."""
    try:
        c = _read_json(src, "vae/config.json") if os.path.isdir(src) else {}
    except FileNotFoundError:
        c = {}
    blocks = c.get("encoder_block_out_channels") or c.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else VAE_FACTOR[family]


def family_of(net):
    return {"Sana": "SanaPipeline", "SD3": "StableDiffusion3Pipeline", "Flux": "FluxPipeline"}[
        next(k for k in ("Sana", "SD3", "Flux") if type(net).__name__.startswith(k))]


def memory_plan(cfg, net, world_size=1, factor=None):
    """Bytes per GPU of weights, gradients, optimizer state and activations for cfg (mode, precision, batch,
    resolution, gradient checkpointing) on `world_size` GPUs. `net`: the transformer (meta device is enough);
    `factor`: the VAE's spatial factor (default: the family's).

    full: a frozen teacher + trainable generator and fake (master weights fp32, or bf16 with --precision bf16) + EMA,
          sharded over the GPUs by FSDP2 (divide by world_size).
    lora: one frozen base per GPU (replicated) + three float32 adapters (generator, fake, ema), two of them trained.
    Adam keeps two moments per trainable parameter. Activations peak in the generator update, where three graphs are
    alive: the generator's (batch B) and the teacher's and fake network's (2B with two-branch CFG), each keeping
    SAVED_PER_BLOCK per block -- or, with gradient checkpointing, the blocks' inputs plus one block recomputed at a
    time. bf16 autocast over float32 masters (one process) also keeps the bf16 copies of the two trainable networks'
    weights for backward; FSDP2 all-gathers bf16 weights instead. Start-up holds the teacher and the text encoders
    ('startup'): the memory a run needs is the larger of 'total' and 'startup'."""
    family, c = family_of(net), net.config
    P = sum(p.numel() for p in net.parameters())
    base_bytes = 4 if cfg.precision == "fp32" else 2
    train_bytes = 2 if cfg.precision == "bf16" else 4
    if cfg.mode == "lora":
        lora = sum(cfg.lora_rank * (m.in_features + m.out_features) for name, m in net.named_modules()
                   if isinstance(m, nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS))
        trainable, shard, weights, grad_bytes, copies = 2 * lora, 1, P * base_bytes + 3 * lora * 4, 4, 0
    else:
        trainable, shard, grad_bytes = 2 * P, world_size, train_bytes
        weights = P * base_bytes + 3 * P * train_bytes  # teacher + generator + fake + ema
        copies = 2 * P * 2 if cfg.precision == "bf16-autocast" and world_size == 1 else 0
    width = c.get("num_attention_heads", 1) * c.get("attention_head_dim", 1)
    layers = c.get("num_layers", 1) + c.get("num_single_layers", 0)
    patch = c.get("patch_size", 1) * (2 if family == "FluxPipeline" else 1)  # FLUX packs 2x2 latents into a token
    image_tokens = (cfg.resolution // (factor or VAE_FACTOR[family]) // patch) ** 2
    tokens = image_tokens + TEXT_TOKENS[family] * TEXT_IN_BLOCKS[family]
    interval = has_interval(cfg.cfg_t_min, cfg.cfg_t_max)  # (D17): per-sample scales
    cfg_batch = [cfg_branches(w, family == "FluxPipeline", interval) for w in (cfg.cfg_eval_real, cfg.cfg_eval_fake)]
    full = cfg.mode == "full"
    batches = (cfg.batch_size, cfg.batch_size * cfg_batch[0], cfg.batch_size * cfg_batch[1])  # generator, teacher, fake
    trains = (full, False, full)  # whose weights take gradients in the generator update
    unit = tokens * width * base_bytes  # one element per token-channel, in bytes
    per_block = [b * SAVED_PER_BLOCK[family][0 if t else 1] * unit for b, t in zip(batches, trains)]
    if cfg.grad_checkpointing:  # the blocks' inputs (text tokens in full: they are inputs), one block recomputed
        unit_in = (image_tokens + TEXT_TOKENS[family]) * width * base_bytes
        stored = sum(b * layers * CHECKPOINTED_INPUTS[family][0 if t else 1] * unit_in for b, t in zip(batches, trains))
        recompute = max(per_block)
    else:
        stored, recompute = layers * sum(per_block), 0
    plan = dict(parameters=P, trainable=trainable, weights=weights / shard, gradients=trainable * grad_bytes / shard,
                optimizer=2 * trainable * grad_bytes / shard, activations=stored + recompute + copies,
                recompute=recompute)
    plan["total"] = plan["weights"] + plan["gradients"] + plan["optimizer"] + plan["activations"]
    plan["startup"] = P * base_bytes + TEXT_ENCODER_PARAMS[family] * base_bytes
    return plan


def cmd_dry_run(cfg, world_size):
    src, family = resolve_teacher(cfg.teacher, configs_only=True)
    net = meta_transformer(src)
    plan = memory_plan(cfg, net, world_size, vae_factor(src, family))
    gib = 1 << 30
    print(f"memory plan per GPU: {cfg.teacher} ({type(net).__name__}, {plan['parameters'] / 1e9:.2f} B parameters), "
          f"mode {cfg.mode}, precision {cfg.precision}, {world_size} GPU(s), batch {cfg.batch_size}/GPU at "
          f"{cfg.resolution} px{', gradient checkpointing' if cfg.grad_checkpointing else ''}")
    print(f"  trainable parameters  {plan['trainable'] / 1e6:12.1f} M")
    for key in ("weights", "gradients", "optimizer", "activations", "total", "startup"):
        print(f"  {key:<20}  {plan[key] / gib:12.1f} GiB" + ("   (teacher + text encoders, before training)"
                                                             if key == "startup" else ""))
    return plan


# --- the benchmark (--bench N): the real loop on a full-size random-weight teacher, timed and measured ------------

def random_transformer(src, dtype, device):
    """The teacher's transformer at full size with random weights, made directly on `device` (no download, no CPU
    copy): built on the meta device, allocated, then filled -- matrices N(0, 1/fan_in), vectors 1 (norm scales) or
    0 (biases), buffers N(0, 0.02^2)."""
    net = meta_transformer(src).to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        for b in net.buffers():
            b.normal_(0.0, 0.02)
    return net.requires_grad_(False).eval()


def bench_backbone(cfg, src, family, device):
    """A family Backbone over a random-weight teacher whose prompts encode to random tensors of the shapes (and
    dtype) the family's text encoders produce. No text encoder, no VAE: the loop only needs conditioning tensors."""
    teacher = random_transformer(src, teacher_dtype(cfg), device)
    c, n_text = teacher.config, TEXT_TOKENS[family]

    class RandomText(FAMILIES[family]):
        def encode(self, prompts):
            g = torch.Generator(device).manual_seed(len(prompts))
            randn = lambda *shape: torch.randn(shape, generator=g, device=device).to(teacher.dtype)  # noqa: E731
            B = len(prompts)
            if family == "SanaPipeline":
                return {"embeds": randn(B, n_text, c.caption_channels), "mask": torch.ones(B, n_text, device=device)}
            if family == "FluxPipeline":
                self.txt_ids = torch.zeros(n_text, 3, device=device)
            return {"embeds": randn(B, n_text, c.joint_attention_dim), "pooled": randn(B, c.pooled_projection_dim)}

    factor = vae_factor(src, family)
    pipe = type("Components", (), dict(transformer=teacher, vae=None, vae_scale_factor=factor))()
    resolution = cfg.resolution or (getattr(c, "sample_size", None) or 128) * factor
    backbone = RandomText(pipe, resolution, device, teacher_dtype(cfg))
    backbone.source, backbone.family = src, family
    return backbone


class SavedActivations:
    """Peak bytes of the tensors autograd saves for backward, seen through saved-tensor hooks: each storage counted
    once while any saved reference to it lives; the networks' own weights excluded (they are counted as weights)."""

    def __init__(self, nets):
        self.weights = {p.untyped_storage().data_ptr() for net in nets for p in net.parameters()}
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.weights or tensor.device.type == "meta":
            return (tensor, None)
        self.refs[key] = self.refs.get(key, 0) + 1
        if self.refs[key] == 1:
            self.sizes[key] = tensor.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        return (tensor, _Release(self, key))

    def release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda packed: packed[0])


class _Release:
    """Tells the meter when autograd drops a saved tensor (the packed tuple holding this object is freed)."""

    def __init__(self, meter, key):
        self.meter, self.key = meter, key

    def __del__(self):
        self.meter.release(self.key)


def tensor_bytes(tensors):
    """Bytes of distinct storages (local shards under FSDP2; a LoRA base shared by three views counted once)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, by datasheet (SXM parts)


def cmd_bench(cfg, iters, warmup=1):
    """--bench N: warm-up + N real SiD iterations through distill() on a full-size random-weight teacher; writes
    OUT/bench.json and prints a table: step time, images/s, measured and planned memory, FLOPs and MFU."""
    src, family = resolve_teacher(cfg.teacher, configs_only=True)
    runtime = setup_runtime(cfg)
    # every iteration trains the last step (k = K, the most expensive: K - 1 roll-out forwards), so that the timed
    # iterations and the one whose FLOPs are counted do the same work
    run = dataclasses.replace(cfg, iters=warmup + iters, out="", eval_every=1, save_every=0, progress=False,
                              train_step="last")
    backbone = bench_backbone(run, src, family, runtime.device)
    run = dataclasses.replace(run, resolution=backbone.resolution)
    backbone.set_prompts(DEFAULT_PROMPTS)
    cuda = runtime.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(runtime.device)) if cuda else (lambda: None)
    stamps = []

    def on_eval(step, generator, ema):
        sync()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    res = distill(run, backbone, on_eval=on_eval, runtime=runtime)
    step_s = sorted(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))[iters // 2]  # the median
    nets = [backbone.teacher, res["generator"], res["fake"], res["ema"]]
    measured = dict(weights=tensor_bytes(p for n in nets for p in n.parameters()),
                    gradients=tensor_bytes(p.grad for n in nets for p in n.parameters() if p.grad is not None),
                    optimizer=tensor_bytes(v for opt in res["optimizers"] for st in opt.state.values()
                                           for k, v in st.items() if k != "step"))
    static = measured["weights"] + measured["gradients"] + measured["optimizer"]
    if cuda:  # the allocator's peak over the timed run (before anything below adds its own)
        measured["total"] = torch.cuda.max_memory_allocated(runtime.device)
        measured["activations"] = measured["total"] - static
    else:  # one more iteration, untimed, with the saved tensors counted
        meter = SavedActivations(nets)
        with meter.hooks():
            sid_iteration(run, backbone, res["fake"], res["generator"], *res["optimizers"][::-1],
                          torch.Generator(runtime.device).manual_seed(1), 0, runtime)
        measured["activations"], measured["total"] = meter.peak, static + meter.peak
    plan = memory_plan(run, meta_transformer(src), runtime.world, vae_factor(src, family))
    name = torch.cuda.get_device_name(runtime.device) if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)
    out = dict(teacher=cfg.teacher, family=family, mode=run.mode, precision=run.precision,
               grad_checkpointing=run.grad_checkpointing,
               device=name, world_size=runtime.world, batch_size=run.batch_size, resolution=run.resolution,
               step_s=step_s, images_per_s=run.batch_size * runtime.world / step_s, measured=measured,
               planned={k: plan[k] for k in measured}, flops_per_step=iteration_flops(run, backbone, res["generator"]))
    if peak:
        out["mfu"] = out["flops_per_step"] / step_s / peak
    if runtime.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "bench.json"), "w") as f:
            json.dump(out, f, indent=1)
        print_bench(out)
    return out


def iteration_flops(cfg, backbone, net):
    """Model FLOPs of one SiD iteration with k = K, from one counted forward of `net` on one sample: K forwards
    without gradient (K - 1 roll-out steps, then the sample for the fake update); per fake update a forward and a
    backward (2 forwards' worth: weights and input); the generator step's forward and backward; the teacher's and the
    fake network's forwards with a backward to their input only (1 forward's worth) -- each doubled where two-branch
    CFG doubles the batch. Recomputation under gradient checkpointing is not counted: MFU counts the model's work."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, *backbone.sample_shape, device=backbone.device)
    t = torch.full((1,), 0.5, device=backbone.device)
    with torch.no_grad(), autocast(cfg, backbone.device), FlopCounterMode(display=False) as counter:
        backbone.forward(net, x, t, backbone.cond_for([0]), cfg.student_guidance)
    interval = has_interval(cfg.cfg_t_min, cfg.cfg_t_max)  # (D17): per-sample scales
    branches = lambda w: cfg_branches(w, getattr(backbone, "guidance_embedded", False), interval)  # noqa: E731
    passes = (cfg.steps + 3 * cfg.fake_updates * branches(cfg.cfg_train_fake) + 3
              + 2 * branches(cfg.cfg_eval_real) + 2 * branches(cfg.cfg_eval_fake))
    return counter.get_total_flops() * passes * cfg.batch_size


def print_bench(r):
    gib = 1 << 30
    print(f"bench: {r['teacher']} {r['mode']} {r['precision']}{' ckpt' if r['grad_checkpointing'] else ''} on "
          f"{r['world_size']} x {r['device']}, batch {r['batch_size']} at {r['resolution']} px: "
          f"{r['step_s']:.3f} s/step, {r['images_per_s']:.2f} images/s, {r['flops_per_step'] / 1e12:.1f} TFLOP/step"
          + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    print(f"  {'GiB':<12}" + "".join(f"{k:>13}" for k in r["measured"]))
    for row in ("measured", "planned"):
        print(f"  {row:<12}" + "".join(f"{r[row][k] / gib:13.3f}" for k in r["measured"]))


STUDENT_META = "sid_flow.json"  # written beside the exported pipeline: how to sample it


def plain_copy(net, state, dtype, device="cpu"):
    """A new module of net's class and config holding `state` (a state dict), in `dtype` on `device`. Built on the
    meta device first: no random initialisation, no memory beyond the copy returned."""
    with torch.device("meta"):
        plain = type(net).from_config(net.config)
    plain = plain.to(dtype).to_empty(device=device)
    plain.load_state_dict(state)  # copies, casting to dtype
    return plain.eval()


def export_student(backbone, net, cfg, folder):
    """Write a complete diffusers pipeline folder: the teacher's components, `net` as the transformer (in the
    teacher's dtype; LoRA fused into the weights), and a FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    without shift, which takes exactly the 'fresh' re-noising step (D13) when called with sigmas =
    generator_times(K). Written beside, then renamed into place."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True)
    base_dtype = teacher_dtype(cfg)
    if isinstance(net, AdapterView):
        transformer = plain_copy(net.base, net.merged_state_dict(), base_dtype)
    elif next(net.parameters()).device.type == "cpu" and next(net.parameters()).dtype == base_dtype:
        transformer = net  # already a plain CPU copy in the right dtype
    else:
        transformer = plain_copy(net, net.state_dict(), base_dtype)
    pipe = DiffusionPipeline.from_pretrained(backbone.source, transformer=transformer, scheduler=scheduler,
                                             dtype=base_dtype)
    tmp = f"{folder}.tmp{os.getpid()}"
    remove_path(tmp)
    pipe.save_pretrained(tmp)
    if isinstance(net, AdapterView):  # the adapter alone too, loadable with load_lora_adapter()
        net.base.save_lora_adapter(os.path.join(tmp, "lora"), adapter_name=net.adapter)
    meta = dict(family=backbone.family, teacher=backbone.source, resolution=backbone.resolution, steps=cfg.steps,
                sigmas=generator_times(cfg.steps), guidance_scale=cfg.student_guidance, precision=cfg.precision,
                pipeline_kwargs=backbone.pipeline_kwargs, global_rng_step_noise=not backbone.step_noise_from_generator)
    with open(os.path.join(tmp, STUDENT_META), "w") as f:
        json.dump(meta, f, indent=1)
    replace_path(tmp, folder)
    return folder


def student_images(backbone, net, prompts, seed, steps, guidance, cfg):
    """The student's images for `prompts`, drawn as the stock pipeline draws them for one seed: initial latents from
    torch.Generator(device).manual_seed(seed); per-step noise from that generator (SANA), or (SD3, FLUX: their
    pipelines draw it from torch's global RNG after the user's torch.manual_seed(seed)) from a second generator
    seeded the same way -- the same numbers, and the global RNG is left alone. Under the run's autocast.
    Returns (B, H, W, 3)."""
    g = torch.Generator(backbone.device).manual_seed(seed)
    g_steps = g if backbone.step_noise_from_generator else torch.Generator(backbone.device).manual_seed(seed)
    cond = _cat([backbone.encode([p]) for p in prompts]) if backbone.bank is None else backbone.cond_for(
        [backbone.prompts.index(p) for p in prompts])
    z = backbone.noise((len(prompts), *backbone.sample_shape), g)
    with autocast(cfg, backbone.device):
        x = generate(lambda x, t: backbone.velocity(net, x, t, cond, guidance), z, steps, "fresh",
                     lambda x: backbone.step_noise(x.shape, g_steps))
    return backbone.decode(x.float())


def save_grid(images, path):
    """(B, H, W, 3) floats in [0, 1] -> one PNG row."""
    from PIL import Image
    row = (torch.as_tensor(images).clamp(0, 1) * 255).round().to(torch.uint8)  # (B, H, W, 3)
    Image.fromarray(torch.cat(list(row), dim=1).numpy()).save(path)


def cmd_distill(cfg):
    if cfg.teacher == "toy":
        raise UserError("the 2-D toy teacher is trained by run_toy.py: run `python run_toy.py`")
    if cfg.data and cfg.prompts:
        raise UserError("--data and --prompts: with a data set its captions are the prompts; give one of them")
    if cfg.data and not os.path.exists(cfg.data):
        raise UserError(f"--data {cfg.data}: no such file or folder")
    prompts = read_prompts(cfg.prompts) if cfg.prompts else DEFAULT_PROMPTS  # bad input fails before any loading
    src, family = resolve_teacher(cfg.teacher)
    shapes, factor = meta_transformer(src), vae_factor(src, family)  # from the configs: no weights yet
    if cfg.resolution:  # bad values that the configs can judge fail here, before any weights load
        check_resolution(cfg.resolution, factor, shapes.config.patch_size * FAMILIES[family].packing)
    runtime = setup_runtime(cfg)
    check_fits(cfg, shapes, factor, runtime)
    backbone = load_backbone(cfg, runtime.device, src, family)
    if cfg.data:  # data-aided SiD: captions become the prompt set, latents the real samples (row for row)
        latents, prompts, skipped = encode_data(backbone, cfg.data, os.path.join(cfg.out, "data_cache.pt"))
        if runtime.rank == 0:
            print(f"data: {len(prompts)} image-caption pairs; skipped {skipped['unreadable']} unreadable images and "
                  f"{skipped['no_caption']} without caption")
        backbone.data = latents
    backbone.set_prompts(prompts)
    os.makedirs(cfg.out, exist_ok=True)
    preview = backbone.prompts[:PREVIEW_PROMPTS]

    def on_eval(step, generator, ema):  # every rank draws (a sharded forward is collective), rank 0 writes
        images = student_images(backbone, ema, preview, PREVIEW_SEED, cfg.steps, cfg.student_guidance, cfg)
        if runtime.rank == 0:
            save_grid(images, os.path.join(cfg.out, f"preview_{step:07d}.png"))

    res = distill(cfg, backbone, on_eval=on_eval, runtime=runtime)
    which = "ema" if cfg.ema_decay > 0 else "generator"
    if runtime.rank == 0:
        net = res[which]
        if runtime.world > 1 and cfg.mode == "full":  # rank 0 reads the exported network alone from the checkpoint
            net = shapes.to(teacher_dtype(cfg)).to_empty(device="cpu")
            load_checkpoint_weights(cfg.out, which, net)
        folder = export_student(backbone, net, cfg, os.path.join(cfg.out, "student"))
        print(f"student pipeline: {folder} (skipped non-finite iterations: {res['skipped']}; "
              f"{runtime.world} process(es))")
    if runtime.world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def check_resolution(resolution, factor, patch):
    """The image side must be a whole number of latent patches (judged from the configs, before any weights load)."""
    if resolution <= 0 or resolution % (factor * patch):
        raise UserError(f"--resolution {resolution}: must be a positive multiple of {factor * patch} for this teacher "
                        f"(VAE factor {factor} x patch {patch})")


def check_fits(cfg, net, factor, runtime):
    """On CUDA, before any weights load: stop in one line if the memory plan exceeds the device's free memory, and
    name the first lighter setting that fits. `net`: the transformer on the meta device; `factor`: the VAE's."""
    if runtime.device.type != "cuda":
        return
    if not cfg.resolution:  # the teacher's native size, as load_backbone will choose it
        cfg = dataclasses.replace(cfg, resolution=(net.config.get("sample_size") or 128) * factor)
    need = lambda c: max(*(memory_plan(c, net, runtime.world, factor)[k] for k in ("total", "startup")))  # noqa
    free = torch.cuda.mem_get_info(runtime.device)[0]
    if need(cfg) <= free:
        return
    lighter = [dict(grad_checkpointing=True), dict(mode="lora"), dict(mode="lora", grad_checkpointing=True),
               dict(mode="lora", grad_checkpointing=True, batch_size=1)]
    fits = next((d for d in lighter if need(dataclasses.replace(cfg, **d)) <= free), None)
    hint = (" ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in fits.items())
            if fits else "more GPUs (torchrun) in full mode")
    raise UserError(f"the memory plan needs {need(cfg) / 2**30:.1f} GiB per GPU ({cfg.mode} mode, batch "
                    f"{cfg.batch_size} at {cfg.resolution} px), {free / 2**30:.1f} GiB are free: try {hint} "
                    "(--dry-run prints the plan)")


def cmd_export(out, weights, device_name):
    """Export OUT/student from the run's checkpoint (any checkpoint, not only a finished run's), reading only the
    exported network's weights. Full mode loads them into the teacher's own transformer: one copy in memory."""
    path = checkpoint_path(out, True) if os.path.isdir(checkpoint_path(out, True)) else checkpoint_path(out, False)
    if not os.path.exists(path):
        raise UserError(f"--out {out}: no checkpoint there (export reads the run folder of sid_flow.py)")
    meta = read_checkpoint_meta(path)
    if meta["config"]["teacher"] in ("toy", "digits"):
        raise UserError(f"--out {out}: a run_toy.py run (teacher {meta['config']['teacher']}); export writes "
                        "diffusers pipelines of image teachers, and this student's weights are already in its "
                        "checkpoint.pt")
    cfg = Config(**{**meta["config"], "device": device_name})
    backbone = load_backbone(cfg, resolve_device(cfg.device))
    if cfg.mode == "lora":
        generator, _, ema = lora_students(backbone, cfg.lora_rank)
        net = ema if weights == "ema" else generator
    else:
        net = backbone.teacher  # export needs no teacher: its module takes the student's weights
    load_checkpoint_weights(out, weights, net)
    print(f"student pipeline ({weights}, iteration {meta['step']}):",
          export_student(backbone, net, cfg, os.path.join(out, "student")))


def cmd_sample(student, prompt, seed, resolution, out_png, device_name):
    meta_path = os.path.join(student, STUDENT_META)
    if not os.path.isfile(meta_path):
        raise UserError(f"--student {student}: not a sid_flow student folder (no {STUDENT_META})")
    if not prompt.strip():
        raise UserError("--prompt is empty")
    if not out_png.lower().endswith(".png"):
        raise UserError(f"--out {out_png}: give a .png file name")
    with open(meta_path) as f:
        meta = json.load(f)
    device = resolve_device(device_name)
    cfg = Config(teacher=student, resolution=resolution or meta["resolution"], device=device_name,
                 precision=meta.get("precision", "fp32"))  # the dtype the student was trained and saved in
    backbone = load_backbone(cfg, device, student, meta["family"])
    with torch.no_grad():
        images = student_images(backbone, backbone.teacher, [prompt], seed, meta["steps"], meta["guidance_scale"],
                                cfg)
    save_grid(images, out_png)
    print(f"wrote {out_png}")


EPILOG = f"""presets (--teacher NAME): {', '.join(HUB_IDS)}.
A local diffusers pipeline folder or a hub id owner/repo works too (defaults shown as "a folder or hub id").
The 2-D toy and the digits benchmark: python run_toy.py --help

other commands:
  python sid_flow.py sample --student OUT/student --prompt "a fox" --seed 0 --out fox.png   # draw from a student
  python sid_flow.py export --out OUT [--weights ema|generator]                          # OUT/checkpoint -> OUT/student
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("sample", "export") else "distill"
    p = Parser(prog=f"sid_flow.py {command}" if command != "distill" else "sid_flow.py",
               description=__doc__.split("\n")[0])
    if command == "sample":
        p.description = "Draw one image from an exported student with sid_flow's own sampler."
        p.add_argument("--student", required=True, help="an exported OUT/student folder")
        p.add_argument("--prompt", required=True, help="the text prompt")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial and re-noising draws [default: 0]")
        p.add_argument("--resolution", type=int, default=0,
                       help="image side in pixels [default: 0, the resolution the student was trained at]")
        p.add_argument("--out", required=True, help="the .png to write")
        p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N' "
                                                         "[default: auto]")
        a = p.parse_args(argv)
        return cmd_sample(a.student, a.prompt, a.seed, a.resolution, a.out, a.device)
    if command == "export":
        p.description = "Write OUT/student, a stock diffusers pipeline, from a run's OUT/checkpoint (finished or not)."
        p.add_argument("--out", required=True, help="the run folder of sid_flow.py holding its checkpoint")
        p.add_argument("--weights", default="ema", choices=("ema", "generator"),
                       help="which weights become the student [default: ema]")
        p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N' "
                                                         "[default: auto]")
        a = p.parse_args(argv)
        return cmd_export(a.out, a.weights, a.device)
    p.usage = "python sid_flow.py --teacher NAME [options]   |   sid_flow.py sample ...   |   sid_flow.py export ..."
    p.epilog = EPILOG
    labels = {name: name for name in HUB_IDS} | {"a folder or hub id": None}  # the presets sid_flow.py distils
    add_config_flags(p, skip=(), presets=labels, shown=dict(
        teacher="required", out="out/NAME, NAME the teacher's"))
    p.add_argument("--dry-run", action="store_true", help="print the memory plan per GPU from the teacher's configs "
                                                          "(no weights are downloaded) and exit")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="GPUs for the --dry-run plan [default: $WORLD_SIZE, else 1]")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="time N SiD iterations on a random-weight teacher of full size (no download), "
                        "writes OUT/bench.json")
    a = vars(p.parse_args(argv))
    dry_run, world_size, bench = a.pop("dry_run"), a.pop("world_size"), a.pop("bench")
    if a["teacher"] is None:
        raise UserError(f"--teacher is required: a preset ({', '.join(HUB_IDS)}), a pipeline folder or a hub id")
    if a["teacher"] in PRESETS and a["teacher"] not in HUB_IDS:
        hint = " --dataset digits" if a["teacher"] == "digits" else ""
        raise UserError(f"--teacher {a['teacher']}: that teacher is trained by run_toy.py: "
                        f"run `python run_toy.py{hint}`")
    preset = a["teacher"] if a["teacher"] in PRESETS else None
    a["out"] = a["out"] or f"out/{slug(a['teacher'])}"
    cfg = make_config(preset, **a)
    if dry_run:
        if not cfg.resolution:
            resolve_teacher(cfg.teacher)  # a misspelt name or an unreachable hub id says so first
            raise UserError(f"--dry-run needs --resolution for {cfg.teacher}, which is not a preset")
        return cmd_dry_run(cfg, world_size)
    if bench:
        return cmd_bench(cfg, bench)
    return cmd_distill(cfg)


def slug(name):
    """A folder name from a teacher name, path or hub id (its last part; '.', '..' and './x/' resolved first), or from
    a run's description: letters, digits, '.', '-' and '_' only, never '' or a dot name."""
    base = os.path.basename(os.path.abspath(name)) if os.path.exists(name) else name.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in base).strip(".") or "run"


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
