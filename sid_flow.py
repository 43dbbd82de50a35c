"""sid_flow.py -- Score identity Distillation (SiD) of flow-matching models, in one file.

Read it top to bottom, beside derivation.md (equation labels (D1)...(D15) are cited in the comments):

    CONVENTIONS -> 1 path algebra (Bayes' rule) -> 2 times and weights -> 3 losses -> 4 few-step generator
    -> 5 backbones (the toy MLP; diffusers DiTs) -> 6 one SiD iteration -> 7 the loop (EMA, checkpoints, logs)
    -> 8 config, presets, CLI -> main

Commands, by hardware:
    laptop (CPU, ~1 min):   python run_toy.py                      # 2-D checkerboard, figure + table in out/toy
    tests (CPU, minutes):   python -m pytest -q test_sid_flow.py
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# 2. Times and weights used during distillation                                                    (D12)
# ------------------------------------------------------------------------------------------------------------------

def sample_t(n, dist, generator, device, t_min=1e-3, t_max=1 - 1e-3):
    """Times for both updates. 'logit-normal' (official): t = sigmoid(N(ln 2, 1.6^2)), median 2/3 -- skewed to high
    noise; 'uniform': U(t_min, t_max). Clamped away from 0 and 1, where the conversions divide by t or 1 - t."""
    if dist == "logit-normal":
        u = torch.randn(n, generator=generator, device=device) * 1.6 + math.log(2.0)
        t = torch.sigmoid(u)
    elif dist == "uniform":
        t = torch.rand(n, generator=generator, device=device)
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


# ------------------------------------------------------------------------------------------------------------------
# 4. The few-step generator                                                                        (D13)
# ------------------------------------------------------------------------------------------------------------------

def generator_times(K):
    """t_k = 1 - k/K for k = 0..K-1: (1, .75, .5, .25) for K = 4, (1,) for K = 1."""
    return [1.0 - k / K for k in range(K)]


def renoise(x0, x_t, t, t_next, z, mode, generator):
    """The next generator input x_{t_next} = (1 - t_next) x0 + t_next n, with n:
    'fresh' new N(0, I) noise (default; FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) does this step),
    'fixed' the initial noise z, or 'ddim' the noise implied by the current state, (x_t - (1 - t) x0) / t
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=False), i.e. a plain Euler step)."""
    if mode == "fresh":
        n = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif mode == "fixed":
        n = z
    elif mode == "ddim":
        n = (x_t - _per_sample(1 - t, x0) * x0) / _per_sample(t, x0)
    else:
        raise ValueError(f"unknown renoise mode {mode!r}")
    return add_noise(x0, n, t_next)  # (B, *D)


def generator_rollout(velocity_fn, z, K, k, noise, generator):
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
            x_t = renoise(x0, x_t, t, t_next, z, noise, generator)
            t = t_next
    return x_t, t


def generator_step(velocity_fn, x_t, t):
    """One generator step, x0 = x_t - t G(x_t, t) (D4): the sample x_g of the step being trained."""
    return velocity_to_x0(x_t, t, velocity_fn(x_t, t))  # (B, *D)


def generate(velocity_fn, z, K, noise="fresh", generator=None):
    """K-step sample of the generator, no gradient: (B, *D)."""
    x_t, t = generator_rollout(velocity_fn, z, K, K, noise, generator)
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
# 5. Backbones: every family quirk lives behind one interface                                      (D8)
#
# The loop sees a Backbone and three plain nn.Modules (teacher, fake, generator). It calls
#     backbone.velocity(net, x_t, t, cond, guidance) -> v      (B, *D) -- CFG, timestep scale, packing inside
#     backbone.sample_cond(n, generator) -> cond               a batch of conditioning (None for the toy)
#     backbone.trainable_copy() -> nn.Module                   a float32 copy of the teacher (generator, fake)
#     backbone.sample_shape                                    D, the shape of one sample
# and never branches on the model family.
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


class ToyBackbone:
    """The 2-D teacher behind the Backbone interface: unconditional, no CFG, no latents."""

    def __init__(self, teacher):
        self.teacher = teacher.requires_grad_(False).eval()  # frozen for the whole run
        self.sample_shape = (teacher.config["dim"],)

    def velocity(self, net, x_t, t, cond, guidance):
        return net(x_t, t)  # (B, 2)

    def sample_cond(self, n, generator):
        return None

    def trainable_copy(self):
        return copy.deepcopy(self.teacher).float().requires_grad_(True).train()


# ------------------------------------------------------------------------------------------------------------------
# 6. One SiD iteration: fake update(s), then a generator update, on the same generator sample        (D9)-(D14)
# ------------------------------------------------------------------------------------------------------------------

def _finite(loss):
    return bool(torch.isfinite(loss).item())


def sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng, update_generator=True):
    """One iteration of Algorithm 1 (derivation.md). Returns a dict of diagnostics; a phase whose loss is not finite
    skips its optimizer step and is named under 'nonfinite' (the loop decides when to stop)."""
    B, K = cfg.batch_size, cfg.steps
    device = next(generator.parameters()).device
    teacher = backbone.teacher
    # the same k for both updates: a uniform draw from {1..K} (the paper's mixture) or always K (D13)
    k = K if cfg.train_step == "last" else int(torch.randint(1, K + 1, (1,), generator=rng, device=device).item())
    z = torch.randn(B, *backbone.sample_shape, generator=rng, device=device)  # (B, *D) initial noise
    cond = backbone.sample_cond(B, rng)  # prompts (or None); the same batch for both updates

    def G(x, t):  # the student, always without CFG (guidance 1)
        return backbone.velocity(generator, x, t, cond, 1.0)

    # backward simulation: steps 1..k-1 without gradient; x_in is the input of the trained step k
    with autocast(cfg, device):
        x_in, t_in = generator_rollout(G, z, K, k, cfg.noise, rng)  # (B, *D), (B,)
    out = {"k": k, "nonfinite": []}

    # --- fake update(s): plain flow matching on generator samples (D9) -------------------------------------------
    for i in range(cfg.fake_updates):
        with torch.no_grad(), autocast(cfg, device):
            # stop-gradient: the fake network fits the generator's distribution, it must not move the generator
            x_g = generator_step(G, x_in, t_in) if i == 0 else generate(G, torch.randn_like(z), K, cfg.noise, rng)
        t = sample_t(B, cfg.t_dist, rng, device)  # (B,)
        eps = torch.randn(x_g.shape, generator=rng, device=device)  # (B, *D)
        with autocast(cfg, device):
            v_fake = backbone.velocity(fake, add_noise(x_g, eps, t), t, cond, cfg.cfg_train_fake)
            loss_fake = flow_matching_loss(v_fake.float(), x_g.float(), eps, t).mean()
        opt_fake.zero_grad(set_to_none=True)
        if _finite(loss_fake):
            loss_fake.backward()
            opt_fake.step()
        else:
            out["nonfinite"].append("fake")
        out["loss_fake"] = loss_fake.item()

    if not update_generator:
        return out

    # --- generator update (D11) -------------------------------------------------------------------------------------
    t = sample_t(B, cfg.t_dist, rng, device)  # (B,)
    eps = torch.randn(z.shape, generator=rng, device=device)  # (B, *D)
    with autocast(cfg, device):
        x_g = generator_step(G, x_in, t_in).float()  # (B, *D) the ONLY step that carries gradient into G
        x_t = add_noise(x_g, eps, t)  # (B, *D) differentiable in x_g: SiD's gradient also flows through here
        # DMD uses the networks as fixed critics: no gradient through their inputs (D14)
        critic = torch.no_grad() if cfg.loss == "dmd" else contextlib.nullcontext()
        with critic:
            x0_teacher = velocity_to_x0(x_t, t, backbone.velocity(teacher, x_t, t, cond, cfg.cfg_eval_real).float())
            x0_fake = velocity_to_x0(x_t, t, backbone.velocity(fake, x_t, t, cond, cfg.cfg_eval_fake).float())
    w = sid_weight(cfg.weighting, t, x_g, x0_teacher)  # (B,) no gradient
    if cfg.loss == "sid":
        loss_gen = sid_generator_loss(x_g, x0_teacher, x0_fake, cfg.alpha, w).mean()
    else:
        loss_gen = dmd_generator_loss(x_g, x0_teacher, x0_fake, w).mean()
    params = [p for p in generator.parameters() if p.requires_grad]
    opt_gen.zero_grad(set_to_none=True)
    if _finite(loss_gen):
        # gradient reaches the generator's weights ONLY: it flows back through both networks' inputs, but
        # `inputs=` keeps it out of the fake network's (and the frozen teacher's) weights
        loss_gen.backward(inputs=params)
        opt_gen.step()
    else:
        out["nonfinite"].append("generator")
    with torch.no_grad():
        # the diagnostic that means something: how far the fake network's posterior mean is from the teacher's
        out["score_gap"] = _sum_pixels((x0_teacher - x0_fake).float() ** 2).mean().item()
    out["loss_gen"] = loss_gen.item()
    return out


def autocast(cfg, device):
    """bf16 autocast on CUDA when cfg.precision == 'bf16-autocast'; a no-op elsewhere (CPU runs in float32)."""
    if cfg.precision == "bf16-autocast" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------------------
# 7. The loop: EMA, checkpoints (atomic, resumable), JSONL log, progress bar, non-finite policy
# ------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, net, decay):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a corrupt `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# config fields that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_FIELDS = ("iters", "out", "log_every", "save_every", "eval_every", "device", "progress")


def distill(cfg, backbone, on_eval=None):
    """Distil `backbone.teacher` into a K-step generator. Resumes from cfg.out/checkpoint.pt when it exists.
    `on_eval(step, generator, ema)` is called every cfg.eval_every iterations and at the end.
    Returns dict(generator=, ema=, fake=, step=, skipped=)."""
    device = next(backbone.teacher.parameters()).device
    torch.manual_seed(cfg.seed)
    generator, fake = backbone.trainable_copy(), backbone.trainable_copy()  # both start as the teacher (D13)
    ema = copy.deepcopy(generator).requires_grad_(False).eval()
    adam = dict(betas=(0.0, 0.999), eps=cfg.adam_eps)  # beta1 = 0 as the official code: no momentum
    opt_gen = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_gen, **adam)
    opt_fake = torch.optim.Adam([p for p in fake.parameters() if p.requires_grad], lr=cfg.lr_fake, **adam)
    rng = torch.Generator(device).manual_seed(cfg.seed)  # every random draw of the loop comes from here
    step, skipped, in_a_row = 0, 0, 0

    ckpt_path = log_path = None
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        ckpt_path, log_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "log.jsonl")
    if ckpt_path and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
                if k not in RESUMABLE_FIELDS and getattr(cfg, k, v) != v}
        if diff:
            raise UserError(f"{ckpt_path} was written with a different config ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                            "use another --out or the same settings")
        if ck["step"] > cfg.iters:
            raise UserError(f"{ckpt_path} is at iteration {ck['step']}, beyond --iters {cfg.iters}; use another --out")
        generator.load_state_dict(ck["generator"]); fake.load_state_dict(ck["fake"]); ema.load_state_dict(ck["ema"])
        opt_gen.load_state_dict(ck["opt_gen"]); opt_fake.load_state_dict(ck["opt_fake"])
        rng.set_state(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        step, skipped = ck["step"], ck["skipped"]
        if os.path.exists(log_path):  # drop log lines written after the checkpoint: they will be redone
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= step]
            with open(log_path, "w") as f:
                f.writelines(kept)

    def save():
        if ckpt_path:
            atomic_save(dict(generator=generator.state_dict(), fake=fake.state_dict(), ema=ema.state_dict(),
                             opt_gen=opt_gen.state_dict(), opt_fake=opt_fake.state_dict(), rng=rng.get_state(),
                             torch_rng=torch.get_rng_state(), step=step, skipped=skipped,
                             config=dataclasses.asdict(cfg)), ckpt_path)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iters, initial=step, disable=not cfg.progress, desc="SiD" if cfg.loss == "sid" else "DMD",
               dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.iters:
        m = sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng)
        step += 1
        if m["nonfinite"]:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= cfg.max_nonfinite:
                raise FloatingPointError(
                    f"non-finite {' and '.join(m['nonfinite'])} loss at iteration {step} ({in_a_row} in a row, "
                    f"{skipped} skipped in all); the last good checkpoint is kept")
        else:
            in_a_row = 0
        ema_update(ema, generator, cfg.ema_decay)
        if step % cfg.log_every == 0 or step == cfg.iters:
            bar.set_postfix(fake=f"{m['loss_fake']:.3g}", gap=f"{m['score_gap']:.3g}", gen=f"{m['loss_gen']:.3g}")
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(dict(step=step, time=round(time.time() - t0, 3), skipped=skipped,
                                            **{k: v for k, v in m.items() if k != "nonfinite"})) + "\n")
        if on_eval and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
            on_eval(step, generator, ema)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
            save()
        bar.update(1)
    bar.close()
    save()
    return dict(generator=generator, ema=ema, fake=fake, step=step, skipped=skipped)


# ------------------------------------------------------------------------------------------------------------------
# 8. Config: one typed place for every default; presets by name override a few fields; the CLI is generated
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # --- the teacher ---
    teacher: str = "toy"            # a preset name (see PRESETS), a local diffusers folder or a hub id
    # --- SiD (derivation.md) ---
    loss: str = "sid"               # 'sid' (D11) or 'dmd' (D14)
    alpha: float = 1.0              # (D11); official DiT code 1.0, original SiD 1.2; try 0.5-1.0 on new domains
    weighting: str = "1-t"          # w(t), one of WEIGHTINGS (D12)
    t_dist: str = "logit-normal"    # times for both updates: 'logit-normal' (official) or 'uniform'
    steps: int = 4                  # K, the generator's number of steps; t_k = 1 - k/K (D13)
    noise: str = "fresh"            # re-noising between generator steps: 'fresh', 'fixed' or 'ddim'
    train_step: str = "uniform"     # which step is trained: 'uniform' k in {1..K} (the paper) or 'last' (k = K)
    fake_updates: int = 1           # fake-network updates per generator update
    cfg_train_fake: float = 1.0     # CFG scale of the fake network in its own update (SiD-LSG)
    cfg_eval_fake: float = 1.0      # ... of the fake network inside the generator loss
    cfg_eval_real: float = 1.0      # ... of the teacher inside the generator loss
    # --- optimisation ---
    iters: int = 1000
    batch_size: int = 256
    lr_gen: float = 5e-6
    lr_fake: float = 5e-6
    adam_eps: float = 1e-8
    ema_decay: float = 0.999
    max_nonfinite: int = 3          # stop after this many iterations in a row with a non-finite loss
    seed: int = 0
    # --- I/O and runtime ---
    out: str = "out/sid"
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    device: str = "auto"            # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'
    precision: str = "fp32"         # 'fp32' or 'bf16-autocast' (CUDA: bf16 compute, fp32 trainable weights)
    progress: bool = True


CHOICES = dict(loss=("sid", "dmd"), weighting=WEIGHTINGS, t_dist=("logit-normal", "uniform"),
               noise=("fresh", "fixed", "ddim"), train_step=("uniform", "last"), precision=("fp32", "bf16-autocast"))

# Presets change only what differs from the Config defaults. The toy preset uses 'last'-step training and a larger
# learning rate: see README "Toy results" and derivation.md (D13) for why the uniform mixture is not the toy default.
PRESETS = {
    "toy": dict(teacher="toy", train_step="last", iters=600, batch_size=1024, lr_gen=3e-4, lr_fake=3e-4,
                ema_decay=0.99, out="out/toy", log_every=20, save_every=0),
}


def check_config(cfg):
    """Fail loudly, with one line, on values the algorithm cannot use."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of: {', '.join(allowed)}")
    for name in ("steps", "iters", "batch_size", "fake_updates", "max_nonfinite"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr_gen", "lr_fake", "adam_eps"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
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


def add_config_flags(parser, skip=()):
    """One --flag per Config field (dashes for underscores), default None so presets can fill the gaps."""
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=None, choices=CHOICES.get(f.name),
                                help=f"(default: from the preset, else {f.default!r})")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

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
