"""sid_flow.py -- Score identity Distillation (SiD) of flow-matching models, in one file.

Read it top to bottom beside derivation.md (labels (D1)...(D17)). PART I, the method, is all the 2-D toy needs: 1 path
algebra (Bayes' rule), 2 times, weights, guidance, 3 losses, 4 the few-step generator, 5 the teacher interface, 6 one
SiD iteration (every backward and step), 7 the loop. PART II scales it through Part I's interfaces (Backbone,
Runtime): 8 diffusers teachers, 9 LoRA, 10 real images, 11 quality, 12 torchrun, 13 config, 14 plan, export, CLI.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# ======================================== PART I -- THE METHOD ===================================================
# CONVENTIONS (stated once; test_sid_flow.py::test_conventions checks them)
#   time       t in [0, 1]; t = 0 is DATA, t = 1 NOISE (diffusers' direction; torchcfm's is the opposite: a flip is
#              the classic silent bug)
#   path       x_t = a_t x0 + s_t eps,  eps ~ N(0, I);  flow matching (default): a_t = 1 - t,  s_t = t      (D1)
#   velocity   v = dx_t/dt = a'_t x0 + s'_t eps;  flow matching: v = eps - x0                            (D2)
#   shapes     x: (B, *D) -- (B, 2) for the toy, (B, C, H, W) for DiT latents;  t: (B,);  per-sample losses: (B,)
#   CFG        v = v_uncond + w (v_cond - v_uncond), the empty prompt as uncond; w = 1 means "conditional only"

# --- 1. Path algebra: every parameterisation is an affine function of E[x0 | x_t] (D1)-(D7) -----------------------

FLOW, VP = "flow", "vp"  # the two Gaussian paths x_t = a_t x0 + s_t eps this file knows


def coefficients(path, t):
    """(a, s, da/dt, ds/dt) at time t: 'flow' a = 1 - t, s = t; 'vp' a = cos(pi t/2), s = sin(pi t/2), the cosine
    variance-preserving diffusion."""
    if path == FLOW:
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == VP:
        h = 0.5 * math.pi
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
    raise ValueError(f"unknown path {path!r}")


def _per_sample(t, x):
    """View t (B,) as (B, 1, ..., 1) so it broadcasts against x (B, *D)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0, eps, t, path=FLOW):
    """x_t = a_t x0 + s_t eps.                                                                              (D1)"""
    a, s, _, _ = coefficients(path, _per_sample(t, x0))
    return a * x0 + s * eps  # (B, *D)


def velocity_target(x0, eps, t, path=FLOW):
    """The conditional velocity d x_t / dt = a' x0 + s' eps; for flow matching eps - x0.                    (D2)"""
    _, _, da, ds = coefficients(path, _per_sample(t, x0))
    return da * x0 + ds * eps  # (B, *D)


def velocity_to_x0(x_t, t, v, path=FLOW):
    """E[x0 | x_t] from a velocity prediction: solve [a s; a' s'] [x0; eps] = [x_t; v] for x0.
    Flow matching: x0 = x_t - t v.                                                                          (D4)"""
    a, s, da, ds = coefficients(path, _per_sample(t, x_t))
    return (ds * x_t - s * v) / (a * ds - s * da)  # (B, *D); the determinant is 1 for flow matching


def velocity_to_eps(x_t, t, v, path=FLOW):
    """E[eps | x_t] from a velocity prediction. Flow matching: eps = x_t + (1 - t) v.                      (D4)"""
    a, s, da, ds = coefficients(path, _per_sample(t, x_t))
    return (a * v - da * x_t) / (a * ds - s * da)  # (B, *D)


def velocity_to_score(x_t, t, v, path=FLOW):
    """grad_x log p_t(x_t) = -E[eps | x_t] / s_t (Tweedie). Flow matching: -(x_t + (1 - t) v) / t.         (D5)"""
    _, s, _, _ = coefficients(path, _per_sample(t, x_t))
    return -velocity_to_eps(x_t, t, v, path) / s  # (B, *D)


def x0_to_velocity(x_t, t, x0, path=FLOW):
    """The inverse of velocity_to_x0: eps = (x_t - a x0) / s, then v = a' x0 + s' eps.                      (D4)"""
    a, s, da, ds = coefficients(path, _per_sample(t, x_t))
    return da * x0 + ds * (x_t - a * x0) / s  # (B, *D)


def score_to_x0(x_t, t, score, path=FLOW):
    """Tweedie's formula: E[x0 | x_t] = (x_t + s_t^2 grad log p_t(x_t)) / a_t.                              (D3)"""
    a, s, _, _ = coefficients(path, _per_sample(t, x_t))
    return (x_t + s**2 * score) / a  # (B, *D)


def flow_to_vp(x_t, t):
    """The signal-to-noise map: a flow-matching state (x_t, t) is a VP-diffusion state (x_tau, tau) with the
    same SNR a/s = (1 - t)/t, rescaled so a^2 + s^2 = 1. Returns (x_tau (B, *D), tau (B,)).                 (D7)"""
    norm = torch.sqrt((1 - t) ** 2 + t**2)  # (B,)
    tau = (2 / math.pi) * torch.atan2(t, 1 - t)  # (B,) since tan(pi tau / 2) = s/a = t/(1-t)
    return x_t / _per_sample(norm, x_t), tau


# --- 2. Times, weights and guidance used during distillation (D12), (D17) -----------------------------------------


def sample_t(n, rng, device, t_min=1e-3, t_max=1 - 1e-3):
    """Times for both updates, (n,): logit-normal as the official code, t = sigmoid(N(ln 2, 1.6^2)), median 2/3, skewed
    to high noise; clamped away from 0 and 1, where the conversions divide by t or 1 - t."""
    return torch.sigmoid(torch.randn(n, generator=rng, device=device) * 1.6 + math.log(2.0)).clamp(t_min, t_max)


# w(t) of the generator loss, per sample: the seven weightings of the official code; 'inv-l1' is original SiD's
# 1 / mean|x_g - x0_teacher|. Stop-gradient: a weight scales the step, it is not part of the objective.       (D12)
WEIGHTS = {
    "1-t": lambda t, l1: 1 - t,
    "(1-t)^2": lambda t, l1: (1 - t) ** 2,
    "inv-l1": lambda t, l1: 1 / l1,
    "(1-t)/t": lambda t, l1: (1 - t) / t,
    "((1-t)/t)^2": lambda t, l1: ((1 - t) / t) ** 2,
    "1/t": lambda t, l1: 1 / t,
    "1/t^2": lambda t, l1: 1 / t**2,
}
WEIGHTINGS = tuple(WEIGHTS)


def sid_weight(name, t, x_g, x0_teacher):
    """Per-sample weight w (B,), computed without gradient."""
    if name not in WEIGHTS:
        raise ValueError(f"unknown weighting {name!r}; choose from {', '.join(WEIGHTINGS)}")
    l1 = (x_g - x0_teacher).detach().abs().flatten(1).mean(1).clamp_min(1e-8)  # (B,)
    return WEIGHTS[name](t.detach(), l1)


# Classifier-free guidance inside the losses (D17): a call with scale w evaluates v_u + w (v_c - v_u) (the empty
# prompt's velocity v_u, the prompt's v_c); w = 1 is v_c alone, w = 0 v_u alone (Zero-CFG), w < 0 pushes away from the
# prompt (Anti-CFG). Outside the guidance interval [cfg_t_min, cfg_t_max] of noise levels every call uses w = 1.


def guidance_scale(w, t, t_min=0.0, t_max=1.0):
    """The CFG scale of one network call at times t (B,): `w` inside the guidance interval, 1 outside (D17). A float
    when it is one scale for the batch (no interval, or w = 1), else a per-sample (B,) tensor."""
    if w == 1 or (t_min <= 0.0 and t_max >= 1.0):
        return float(w)
    inside = (t >= t_min) & (t <= t_max)
    return torch.where(inside, torch.full_like(t, float(w)), torch.ones_like(t)).detach()  # (B,)


# --- 3. Losses: pure functions of tensors, each returning a per-sample (B,) tensor --------------------------------


def _sum_pixels(x):  # (B, *D) -> (B,)
    return x.flatten(1).sum(1)


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


def _bce(logits, target):  # BCE of C logits per sample (B, C) against 1 (real) or 0 (fake), clamped: (B,)
    return F.binary_cross_entropy_with_logits(
        logits.clamp(-10, 10), torch.full_like(logits, float(target)), reduction="none"
    ).mean(1)


def discriminator_loss(logits_real, logits_fake):
    """Data-aided: the fake network's pooled features (B, C) are C logits per sample; real -> 1, fake -> 0. (D16)"""
    return _bce(logits_real, 1) + _bce(logits_fake, 0)  # (B,)


def gan_generator_loss(logits_fake, weight):
    """The generator's adversarial term w(t) BCE(D(x_t of x_g) -> real), (B,). Its gradient reaches x_g through the
    fake network's input, as SiD's does.                                                                    (D16)"""
    return weight * _bce(logits_fake, 1)  # (B,)


# --- 4. The few-step generator (D13) -------------------------------------------------------------------------------


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
    else:  # 'ddim' (check_config admits no other)
        n = (x_t - _per_sample(1 - t, x0) * x0) / _per_sample(t, x0)
    return add_noise(x0, n, t_next)  # (B, *D)


def generator_rollout(velocity_fn, z, K, k, noise, draw):
    """Run the first k-1 of the generator's K steps WITHOUT gradient and return the input of step k:
    (x_t (B, *D), t (B,)). `velocity_fn(x_t, t) -> v`. Backward simulation: earlier outputs are detached, so
    only step k will carry gradient into the generator."""
    times = generator_times(K)
    x_t, t = z, torch.full((z.shape[0],), times[0], device=z.device, dtype=z.dtype)
    with torch.no_grad():  # stop-gradient: steps 1..k-1 are simulation, not training signal
        for j in range(k - 1):
            x0 = velocity_to_x0(x_t, t, velocity_fn(x_t, t))
            t_next = torch.full_like(t, times[j + 1])
            x_t, t = renoise(x0, x_t, t, t_next, z, noise, draw), t_next
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
    x, ts = z, torch.linspace(1.0, 0.0, steps + 1, device=z.device, dtype=z.dtype)
    with torch.no_grad():
        for i in range(steps):
            x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, ts[i].expand(z.shape[0]))
    return x  # (B, *D)


# --- 5. The teacher interface: every family quirk lives behind it (D8) ----------------------------------------------


class UserError(Exception):
    """Bad input from the user: main() prints the message on one line and exits with status 2."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C stopped the run after checkpointing its current iteration: main() says so in one line."""


@contextlib.contextmanager
def capture_features(net):
    """Record the input of the network's output projection (`head` of the toy MLP, `proj_out` of every diffusers
    DiT: the last hidden states) in every call inside the block. Yields the list of those tensors, one per call."""
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
    """The loop sees a Backbone and three plain nn.Modules (teacher, fake, generator), never the model family. The toy
    (network: run_toy.py) is one; SANA, SD3, FLUX are Part II's. It sets teacher, device, sample_shape D; supplies
        velocity(net, x_t, t, cond, guidance) -> v (B, *D)   CFG, timestep scale and latent packing inside
        sample_batch(n, rng, rows) -> (cond, x0_real)         `rows` of a batch of n: conditioning and real data,
                                                              each None when there is none (the toy: no prompts)
    and inherits students(), the trainable copies, and noise() / step_noise(), the N(0, I) draws."""

    uncond, prompts = None, ()  # the empty prompt's conditioning (CFG's unconditional branch), the prompts: a DiT's

    def trainable_copy(self, dtype=torch.float32):  # (no cast that changes nothing: diffusers would warn)
        net = copy.deepcopy(self.teacher)
        return (net if next(net.parameters()).dtype == dtype else net.to(dtype)).requires_grad_(True).train()

    def students(self, cfg, runtime):
        """(generator, fake, ema), all three starting as the teacher (D13): full copies on one process, trainable
        weights in float32 (bf16 with --precision bf16). Part II adds LoRA mode and FSDP2 sharding."""
        if cfg.mode != "full" or runtime.world > 1:
            raise UserError("the toy MLP trains in full mode on one process (LoRA and FSDP2 need a diffusers teacher)")
        generator, fake = self.trainable_copy(trainable_dtype(cfg)), self.trainable_copy(trainable_dtype(cfg))
        return generator, fake, copy.deepcopy(generator).requires_grad_(False).eval()

    def noise(self, shape, rng):
        """N(0, I) in the sample layout (B, *D), drawn from `rng` as the stock pipeline draws its initial noise."""
        return torch.randn(shape, generator=rng, device=self.device)

    def step_noise(self, shape, rng):
        """The re-noising draw between generator steps, in the layout the stock scheduler draws it (B, *D)."""
        return self.noise(shape, rng)


class ToyBackbone(Backbone):
    """The 2-D teacher: unconditional, no CFG, no latents. `real(n, rng)`, when given, draws true data (D16)."""

    def __init__(self, teacher, real=None):
        self.teacher = teacher.requires_grad_(False).eval()  # frozen for the whole run
        self.device, self.sample_shape, self.real = teacher.head.weight.device, (teacher.config["dim"],), real

    def velocity(self, net, x_t, t, cond, guidance):
        return net(x_t, t)  # (B, 2)

    def sample_batch(self, n, rng, rows=slice(None)):
        return None, (self.real(n, rng)[rows] if self.real else None)


# --- 6. One SiD iteration: fake update(s), then a generator update, on the same generator sample (D9)-(D16) --------


def sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng, images_seen=0, runtime=None):
    """One SiD iteration (derivation.md sections 3-4): cfg.fake_updates fake updates, then one generator update, on
    the same generator sample. Returns a dict of diagnostics; a phase whose loss is not finite skips its optimizer
    step and is named under 'nonfinite' (the loop decides when to stop)."""
    runtime = runtime or Runtime()
    device = next(generator.parameters()).device
    # every draw is made for the global batch (n samples over all ranks) from the rng all ranks share; each rank keeps
    # its rows: ranks see different samples, and one process with the same global batch sees the same numbers
    n, rows = cfg.batch_size * runtime.world, runtime.rows(cfg.batch_size)
    shape = (n, *backbone.sample_shape)
    # the trained step k, the same for both updates: uniform in {1..K} (the paper's mixture) or always K (D13); drawn
    # from (seed, images seen) so that every rank runs the same number of (collective) forwards
    k_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + images_seen)
    k = cfg.steps if cfg.train_step == "last" else int(torch.randint(1, cfg.steps + 1, (1,), generator=k_rng))
    z = backbone.noise(shape, rng)[rows]  # (B, *D) initial noise
    cond, x0_real = backbone.sample_batch(n, rng, rows)  # prompts (or None) and real samples (or None)
    # data-aided (D16), counted in images seen: the generator waits, then mixes the GAN term into its loss
    update_generator = x0_real is None or images_seen >= GAN_FREEZE_IMAGES
    gan_weight = cfg.gan_weight if x0_real is not None and images_seen >= GAN_START_IMAGES else 0.0

    def G(x, t):  # the student: no two-branch CFG (cfg.student_guidance is 1, or FLUX's embedded guidance)
        return backbone.velocity(generator, x, t, cond, cfg.student_guidance)

    # backward simulation: steps 1..k-1 without gradient; x_in is the input of the trained step k
    with autocast(cfg, device):
        x_in, t_in = generator_rollout(G, z, cfg.steps, k, cfg.noise, lambda x: backbone.step_noise(shape, rng)[rows])
    with torch.no_grad(), autocast(cfg, device):
        # stop-gradient: the fake network fits the generator's distribution, it must not move the generator
        x_g = generator_step(G, x_in, t_in).float()  # (B, *D); extra fake updates reuse it with fresh t and eps
    out = {"k": k, "nonfinite": []}
    for _ in range(cfg.fake_updates):
        t, eps = sample_t(n, rng, device)[rows], backbone.noise(shape, rng)[rows]  # (B,), (B, *D)
        out["nonfinite"] += fake_update(cfg, backbone, fake, opt_fake, x_g, t, eps, cond, x0_real, runtime, out)
    if update_generator:
        t, eps = sample_t(n, rng, device)[rows], backbone.noise(shape, rng)[rows]  # (B,), (B, *D)
        out["nonfinite"] += generator_update(
            cfg, backbone, generator, fake, opt_gen, x_in, t_in, t, eps, cond, gan_weight, runtime, out
        )
    return out


def fake_update(cfg, backbone, fake, opt_fake, x_g, t, eps, cond, x0_real, runtime, out):
    """Flow matching of the fake network on the generator's (detached) samples x_g (D9); with real samples it is also
    the discriminator (D16). Writes diagnostics into `out`; returns ['fake'] if the step was skipped, else []."""
    B = x_g.shape[0]
    with autocast(cfg, x_g.device), capture_features(fake) as hidden:
        w_fake = guidance_scale(cfg.cfg_train_fake, t, cfg.cfg_t_min, cfg.cfg_t_max)  # (D17)
        v_fake = backbone.velocity(fake, add_noise(x_g, eps, t), t, cond, w_fake)  # (B, *D)
        loss = flow_matching_loss(v_fake.float(), x_g, eps, t).mean()
        if x0_real is not None:
            # the real samples are seen as the fakes were: with the prompt, or under Zero-CFG's one-branch call (a
            # batch-wide scale 0) on the empty prompt alone
            w_d = 0.0 if not torch.is_tensor(w_fake) and w_fake == 0.0 else 1.0
            backbone.velocity(fake, add_noise(x0_real, eps, t), t, cond, w_d)  # its features: hidden[-1]
            loss_d = discriminator_loss(pooled_logits(hidden[-1], B), pooled_logits(hidden[0], B)).mean()
            loss, out["loss_d"] = loss + loss_d, loss_d.item()
    out["loss_fake"] = loss.item()
    opt_fake.zero_grad(set_to_none=True)
    if runtime.any_rank(not torch.isfinite(loss).item()):  # (every rank skips: a backward is a collective)
        return ["fake"]
    loss.backward()  # the fake network's weights are the only trainable tensors here (x_g: no_grad; teacher: frozen)
    runtime.average_grads(fake)  # (one process: nothing to average)
    opt_fake.step()
    return []


def generator_update(cfg, backbone, generator, fake, opt_gen, x_in, t_in, t, eps, cond, gan_weight, runtime, out):
    """The generator update (D11) through its step k (input x_in at time t_in), + the adversarial term if data-aided
    (D16). DMD (D14) makes the same calls with the networks as fixed critics. Returns ['generator'] if skipped."""
    B = x_in.shape[0]
    with autocast(cfg, x_in.device):
        x_g = generator_step(
            lambda x, s: backbone.velocity(generator, x, s, cond, cfg.student_guidance), x_in, t_in
        ).float()  # (B, *D) the ONLY step that carries gradient into G
        x_t = add_noise(x_g, eps, t)  # (B, *D) differentiable in x_g: SiD's gradient also flows through here
        critic = torch.no_grad() if cfg.loss == "dmd" else contextlib.nullcontext()  # DMD: no input gradient (D14)
        w_real, w_fake = (
            guidance_scale(w, t, cfg.cfg_t_min, cfg.cfg_t_max)  # (D17)
            for w in (cfg.cfg_eval_real, cfg.cfg_eval_fake)
        )
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
        loss, out["loss_gan"] = (1 - gan_weight) * loss + gan_weight * loss_gan, loss_gan.item()
    # the diagnostic that means something: how far the fake network's posterior mean is from the teacher's
    out["score_gap"] = _sum_pixels((x0_teacher - x0_fake).detach().float() ** 2).mean().item()
    out["loss_gen"] = loss.item()
    opt_gen.zero_grad(set_to_none=True)
    if runtime.any_rank(not torch.isfinite(loss).item()):
        return ["generator"]
    # The gradient's routing, in two stages. (1) d loss / d x_g: through x_g itself and through x_t into BOTH
    # networks' inputs; autograd.grad accumulates into no weight, so neither the fake network nor the teacher gets a
    # gradient from this loss. (2) That gradient pushed back through the generator's step alone. (Both are plain
    # backward passes of the graph as built, which is what FSDP2's sharded weights need: section 12.)
    (grad_x_g,) = torch.autograd.grad(loss, x_g)  # (B, *D)
    x_g.backward(grad_x_g)
    runtime.average_grads(generator)
    opt_gen.step()
    return []


# --- 7. The loop: optimizers, EMA, the runtime's one-process defaults, checkpoints, distill() ---------------------

MAX_NONFINITE, LOG_EVERY = 3, 10  # stop after 3 non-finite iterations in a row; a line of OUT/log.jsonl every 10
GAN_FREEZE_IMAGES, GAN_START_IMAGES = 20_000, 40_000  # data-aided (D16): the generator waits, then the GAN term


def trainable_dtype(cfg):
    """The generator's and fake network's weights: float32 masters, or bf16 with --precision bf16 (pure bf16)."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def autocast(cfg, device):
    """bf16 autocast (--precision bf16-autocast, bf16), on the CPU as on CUDA: the CPU tests run the GPU's path."""
    return contextlib.nullcontext() if cfg.precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizers(cfg, generator, fake):
    """Adam(0, 0.999) for the generator and the fake network (official: no momentum); eps 1e-4 for pure bf16."""
    # foreach=False: the default multi-tensor step allocates temporaries the size of every gradient at once (on a
    # GPU, tens of GB for a full DiT copy: the peak of a checkpointed run); one tensor at a time costs ~nothing
    adam = dict(betas=(0.0, 0.999), eps=1e-4 if cfg.precision == "bf16" else 1e-8, foreach=False)
    return (
        torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_gen, **adam),
        torch.optim.Adam([p for p in fake.parameters() if p.requires_grad], lr=cfg.lr_fake, **adam),
    )


@torch.no_grad()
def ema_update(ema, net, decay, step):
    """EMA with warm-up: the effective decay min(decay, (1 + step) / (10 + step)) lets the average follow the fast
    early moves away from the teacher and average only once training settles."""
    decay = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a corrupt `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Runtime:
    """Where the ranks live, so that the method never sees them: one process (rank 0 of 1), all the toy needs. Under
    torchrun, Part II's Distributed overrides each method. `nets`: {name: (network, its optimizer or None)}."""

    rank, world = 0, 1

    def __init__(self, device=None):
        self.device = device

    def rows(self, B):  # this rank's rows of a draw made for the global batch of B * world samples
        return slice(self.rank * B, (self.rank + 1) * B)

    def any_rank(self, flag):  # under torchrun: true on some rank, so that all ranks skip or stop alike
        return flag

    def average_grads(self, net):  # after a backward, make net's gradients the global batch's (here they are)
        pass

    def checkpoint_path(self, out):  # (and read_meta, save, load: Distributed's is a sharded folder)
        return os.path.join(out, "checkpoint.pt")

    def read_meta(self, path):  # through a memory map: no weight is read
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return {k: ck[k] for k in ("rng", "step", "skipped", "config")}

    def save(self, path, nets, meta):
        """One file: meta and every network's and optimizer's state, written beside and renamed into place."""
        state = dict(meta, **{name: net.state_dict() for name, (net, _) in nets.items()})
        state.update({f"opt_{name}": opt.state_dict() for name, (_, opt) in nets.items() if opt})
        atomic_save(state, path)

    def load(self, path, nets):
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name, (net, opt) in nets.items():
            net.load_state_dict(state[name])
            if opt:
                opt.load_state_dict(state[f"opt_{name}"])


def resumable(cfg):  # the fields a resumed run may change, the rest must not: --iters too, unless a cosine spans it
    return ("out", "save_every", "eval_every", "device") + (("iters",) if cfg.lr_schedule == "constant" else ())


def resume(cfg, runtime, nets, rng):
    """Restore the networks, optimizers and rng from cfg.out's checkpoint if there is one: (step, skipped)."""
    if not cfg.out:
        return 0, 0
    os.makedirs(cfg.out, exist_ok=True)
    path = runtime.checkpoint_path(cfg.out)
    if not os.path.exists(path):
        return 0, 0
    meta = runtime.read_meta(path)
    diff = [
        f"{k}: {v} -> {getattr(cfg, k)}"
        for k, v in meta["config"].items()
        if k not in resumable(cfg) and getattr(cfg, k, v) != v
    ]
    if diff:
        raise UserError(
            f"{path} was written with a different config ({', '.join(diff)}); use another --out or the same settings"
        )
    if meta["step"] > cfg.iters:
        raise UserError(f"{path} is at iteration {meta['step']}, beyond --iters {cfg.iters}; use another --out")
    runtime.load(path, nets)
    rng.set_state(meta["rng"])
    if runtime.rank == 0:
        print(f"resumed from {path} at iteration {meta['step']}")
        with open(os.path.join(cfg.out, "log.jsonl"), "a+") as f:  # drop the lines after the checkpoint: redone
            f.seek(0)
            kept = [line for line in f if json.loads(line)["step"] <= meta["step"]]
            f.truncate(0)
            f.writelines(kept)
    return meta["step"], meta["skipped"]


def log(cfg, bar, m):
    """The progress bar's numbers, and a line of OUT/log.jsonl."""
    bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss_fake", "score_gap", "loss_gen", "loss_d") if k in m})
    if cfg.out:
        with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in m.items() if k != "nonfinite" and v is not None}) + "\n")


def distill(cfg, backbone, on_eval=None, runtime=None):
    """Distil `backbone.teacher` into a K-step generator, resuming from cfg.out's checkpoint when there is one.
    `on_eval(step, generator, ema)` is called (on every rank) every cfg.eval_every iterations and at the end.
    Returns dict(generator=, ema=, fake=, step=, skipped=, optimizers=)."""
    runtime = runtime or Runtime()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 broadcasts nothing)
    generator, fake, ema = backbone.students(cfg, runtime)
    opt_gen, opt_fake = make_optimizers(cfg, generator, fake)
    # the loop's only source of randomness, the same on every rank (each keeps its rows of the global batch); the
    # global RNGs are never drawn from, so this state is all a checkpoint needs to resume exactly
    rng = torch.Generator(runtime.device or next(generator.parameters()).device).manual_seed(cfg.seed)
    nets = dict(generator=(generator, opt_gen), fake=(fake, opt_fake), ema=(ema, None))
    step, skipped = resume(cfg, runtime, nets, rng)
    save = lambda: (
        cfg.out
        and runtime.save(
            runtime.checkpoint_path(cfg.out),
            nets,
            dict(  # noqa: E731
                rng=rng.get_state(), step=step, skipped=skipped, config=dataclasses.asdict(cfg)
            ),
        )
    )
    bar = tqdm(
        total=cfg.iters,
        initial=step,
        desc=cfg.loss.upper(),
        dynamic_ncols=True,
        disable=True if runtime.rank or step >= cfg.iters else None,
    )  # None: a bar only on a terminal
    in_a_row, t0, stop = 0, time.time(), []
    # SIGTERM (a preempted job) or Ctrl-C: finish this iteration, checkpoint it, stop (the same command resumes)
    handlers = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while step < cfg.iters:
            # the learning rates: constant (official) or a cosine from 1 to 0 over the run
            scale = 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
            for opt, lr in ((opt_gen, cfg.lr_gen), (opt_fake, cfg.lr_fake)):
                opt.param_groups[0]["lr"] = lr * scale
            m = sid_iteration(
                cfg, backbone, fake, generator, opt_fake, opt_gen, rng, step * cfg.batch_size * runtime.world, runtime
            )
            step += 1
            skipped, in_a_row = (skipped + 1, in_a_row + 1) if m["nonfinite"] else (skipped, 0)
            if in_a_row >= MAX_NONFINITE:
                raise FloatingPointError(
                    f"non-finite {' and '.join(m['nonfinite'])} loss at iteration {step} "
                    f"({in_a_row} in a row, {skipped} skipped); the last good checkpoint is kept"
                )
            ema_update(ema, generator, cfg.ema_decay, step)
            if on_eval and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
                m["eval"] = on_eval(step, generator, ema)  # e.g. a quality number: logged with the losses
            if runtime.rank == 0 and (step % LOG_EVERY == 0 or step == cfg.iters or "eval" in m):
                log(cfg, bar, dict(step=step, time=round(time.time() - t0, 3), skipped=skipped, **m))
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
                save()
            bar.update(1)
            if runtime.any_rank(bool(stop)) and step < cfg.iters:
                save()
                raise Interrupted(
                    f"stopped at iteration {step} of {cfg.iters}"
                    + (f"; {cfg.out} holds it: run the same command to continue" if cfg.out else "")
                )
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    save()
    return dict(generator=generator, ema=ema, fake=fake, step=step, skipped=skipped, optimizers=(opt_gen, opt_fake))


# ============================= PART II -- THE MACHINERY THAT SCALES IT (a first reading may stop here) =============

import argparse
import re
import shutil
import socket
import sys
import urllib.parse
import warnings

import diffusers
import huggingface_hub
import peft
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
import transformers
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from matplotlib.figure import Figure  # (no pyplot: no GUI backend, no global state)
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

HERE = os.path.dirname(os.path.abspath(__file__))

# --- 8. Diffusers teachers: SANA, SD3 / SD3.5, FLUX behind the Backbone interface ---------------------------------

PROMPT_CACHE_BYTES = 8 << 30  # the rule: encode every prompt once and free the text encoders if the cache fits


def read_prompts(path):  # one prompt per line; blank lines dropped, duplicates kept once (first occurrence order)
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path}: no such file")
    prompts = list(dict.fromkeys(line.strip() for line in open(path, encoding="utf-8") if line.strip()))
    if not prompts:
        raise UserError(f"--prompts {path}: the file has no prompts (one per line)")
    return prompts


DEFAULT_PROMPTS = read_prompts(os.path.join(HERE, "assets", "prompts.txt"))  # when no --prompts file is given


def cfg_branches(w, embedded=False, per_sample=False):
    """Batches of work of a velocity call at CFG scale w: 1 if embedded, w = 1 or a batch-wide w = 0; else 2."""
    return 1 if embedded or w == 1 or (w == 0 and not per_sample) else 2


def _cat(conds):  # conditioning dicts concatenated along the batch
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class DiTBackbone(Backbone):
    """A diffusers pipeline as a Backbone (teacher: pipe.transformer): prompt cache, CFG in one call (D17), decoding. A
    family adds encode(prompts) -> cond, batch-first tensors, and forward(net, x_t, t, cond, guidance) -> v (D2)."""

    guidance_embedded = False
    packing = 1  # FLUX packs 2x2 latent patches into tokens before the transformer
    step_noise_from_generator = True  # does the stock pipeline draw its per-step noise from `generator`? (sampling)
    pipeline_kwargs = {}  # what the stock pipeline must be told to condition as we do

    def __init__(self, pipe, resolution, device, teacher_dtype):
        self.pipe, self.device, self.resolution = pipe, device, resolution
        # every component on the device in the teacher's dtype, the text encoders too (a T5-XXL on a GPU machine's CPU
        # would take hours): set_prompts() frees them once the prompts are cached
        self.teacher = pipe.transformer.to(device, teacher_dtype).requires_grad_(False).eval()
        for name in ("vae", *self.text_encoders()):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device, teacher_dtype).requires_grad_(False).eval()
        f, c = pipe.vae_scale_factor, self.teacher.config
        check_resolution(resolution, f, c.patch_size * self.packing)
        self.sample_shape = (c.in_channels // self.packing**2, resolution // f, resolution // f)  # (C, h, w)
        self.prompts, self.bank, self.uncond, self.data = [], None, None, None

    def text_encoders(self):  # the names of the pipeline's text encoders still loaded (freed ones are None)
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.pipe, n, None)]

    def set_prompts(self, prompts):
        """Encode the prompts once, kept on the CPU, and free the text encoders -- if PROMPT_CACHE_BYTES holds them."""
        self.prompts = list(prompts)
        with torch.no_grad():
            self.uncond = self.encode([""])  # the CFG unconditional branch, on the device
            per_prompt = sum(v.numel() * v.element_size() for v in self.encode(self.prompts[:1]).values())
            if per_prompt * len(self.prompts) <= PROMPT_CACHE_BYTES:  # encoded 16 at a time, each chunk to the CPU
                self.bank = _cat(
                    [
                        {k: v.cpu() for k, v in self.encode(self.prompts[i : i + 16]).items()}
                        for i in range(0, len(self.prompts), 16)
                    ]
                )
                for name in self.text_encoders():
                    setattr(self.pipe, name, None)  # freed: every embedding the run will need is cached
                torch.cuda.empty_cache()  # (nothing to do without CUDA)

    def cond_for(self, idx):  # conditioning for prompt indices idx (list of int), on the device
        if self.bank is not None:
            return {k: v[idx].to(self.device) for k, v in self.bank.items()}
        with torch.no_grad():
            return self.encode([self.prompts[i] for i in idx])

    def sample_batch(self, n, rng, rows=slice(None)):
        """(cond, x0_real) of `rows` of n random prompts; with data: its captions, and as x0_real their latents."""
        idx = torch.randint(len(self.prompts), (n,), generator=rng, device=rng.device)[rows].tolist()
        return self.cond_for(idx), (self.data[idx].to(self.device) if self.data is not None else None)

    def velocity(self, net, x_t, t, cond, guidance):
        """v_u + w (v_c - v_u) (D17), w a float or per-sample (B,); a float 1 or 0: one branch alone (cfg_branches)"""
        B, per_sample = x_t.shape[0], torch.is_tensor(guidance)
        if self.guidance_embedded or (not per_sample and guidance == 1.0):
            return self.forward(net, x_t, t, cond, guidance)
        uncond = {k: v.expand(B, *v.shape[1:]) for k, v in self.uncond.items()}
        if not per_sample and guidance == 0.0:  # Zero-CFG: the network sees the empty prompt only
            return self.forward(net, x_t, t, uncond, guidance)
        v_uncond, v_cond = self.forward(
            net, torch.cat([x_t, x_t]), torch.cat([t, t]), _cat([uncond, cond]), guidance
        ).chunk(2)  # (B, C, h, w) each
        w = guidance.view(B, *[1] * (x_t.dim() - 1)) if per_sample else guidance  # (B, 1, 1, 1) or a float
        return v_uncond + w * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x):
        """Latents (B, C, h, w) -> images (B, H, W, 3) float in [0, 1], as the stock pipeline decodes them."""
        vae = self.pipe.vae
        latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="np")

    def _dtype(self, net):  # the dtype to feed `net`: its weights' (a LoRA view: its base's, not the adapters')
        return net.base.dtype if isinstance(net, AdapterView) else next(net.parameters()).dtype

    def students(self, cfg, runtime):
        """Three LoRA adapters on the teacher itself, or three full copies (under torchrun: built sharded)."""
        if cfg.mode == "lora":
            nets = lora_students(self, cfg.lora_rank)
        elif runtime.world == 1:
            nets = super().students(cfg, runtime)
        else:  # compiled blocks, then sharded (section 12)
            shard(self.teacher, compiled=cfg.compile)
            nets = [
                sharded_copy(self.teacher, trainable_dtype(cfg), student_precision(cfg), trains, cfg.compile)
                for trains in (True, True, False)
            ]
        # the networks that run: LoRA's one base, seen through four adapter states; else teacher, generator and fake
        for net in [self.teacher.base] if cfg.mode == "lora" else [self.teacher, *nets[:2]]:
            if cfg.grad_checkpointing:
                checkpoint_blocks(net, cfg.grad_checkpointing)
            if cfg.compile and runtime.world == 1:
                for block in blocks(net):
                    block.compile(**COMPILE)
        return nets


class SanaBackbone(DiTBackbone):
    """SANA: Gemma-2 embeddings and mask (no complex_human_instruction, no resolution binning); t * 1000 * scale."""

    pipeline_kwargs = {"complex_human_instruction": None, "use_resolution_binning": False}

    def encode(self, prompts):
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=False,
            max_sequence_length=300,
            complex_human_instruction=None,
        )
        return {"embeds": embeds, "mask": mask}  # (B, L, C), (B, L)

    def forward(self, net, x_t, t, cond, guidance):
        dt = self._dtype(net)
        v = net(
            x_t.to(dt),
            encoder_hidden_states=cond["embeds"].to(dt),
            encoder_attention_mask=cond["mask"],
            timestep=t * 1000 * net.config.timestep_scale,
            return_dict=False,
        )[0]
        return v[:, : x_t.shape[1]]  # a learned-sigma head outputs 2C channels: the first C are the velocity


class SD3Backbone(DiTBackbone):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5 embeddings and pooled projections; the transformer takes t * 1000."""

    step_noise_from_generator = False

    def encode(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=256,
        )
        return {"embeds": embeds, "pooled": pooled}  # (B, L, C), (B, P)

    def forward(self, net, x_t, t, cond, guidance):
        dt = self._dtype(net)
        return net(
            hidden_states=x_t.to(dt),
            timestep=t * 1000,
            encoder_hidden_states=cond["embeds"].to(dt),
            pooled_projections=cond["pooled"].to(dt),
            return_dict=False,
        )[0]


class FluxBackbone(DiTBackbone):
    """FLUX.1: T5 embeddings, pooled CLIP, 2-D position ids, latents packed 2x2 into tokens, t in [0, 1]. FLUX.1-dev is
    guidance-distilled: every CFG scale is fed to its guidance embedding, never a second branch (0 is not the empty
    prompt: no Zero-CFG); the student gets cfg.student_guidance, the stock FluxPipeline the same guidance_scale."""

    guidance_embedded = True
    packing = 2
    step_noise_from_generator = False

    def encode(self, prompts):
        embeds, pooled, self.txt_ids = self.pipe.encode_prompt(  # txt_ids (L, 3), the same for every prompt
            prompt=prompts, prompt_2=prompts, device=self.device, max_sequence_length=512
        )
        return {"embeds": embeds, "pooled": pooled}  # (B, L, C), (B, P)

    @staticmethod
    def pack(x):  # (B, C, h, w) -> (B, h/2 * w/2 tokens, 4C), a token's channels ordered (C, 2, 2) as FluxPipeline's
        return F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)

    @staticmethod
    def unpack(x, h, w):  # (B, tokens, 4C) -> (B, C, h, w)
        return F.pixel_shuffle(x.transpose(1, 2).reshape(len(x), -1, h // 2, w // 2), 2)

    def forward(self, net, x_t, t, cond, guidance):
        dt, (_, h, w) = self._dtype(net), self.sample_shape  # img_ids: (tokens, 3), each (0, row, column)
        ids = torch.cartesian_prod(*(torch.arange(n, device=x_t.device).float() for n in (1, h // 2, w // 2)))
        g = (
            torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])  # (B,)
            if net.config.guidance_embeds
            else None
        )
        v = net(
            hidden_states=self.pack(x_t).to(dt),
            timestep=t,
            guidance=g,
            pooled_projections=cond["pooled"].to(dt),
            encoder_hidden_states=cond["embeds"].to(dt),
            txt_ids=self.txt_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        return self.unpack(v, h, w)

    def step_noise(self, shape, rng):
        B, C, h, w = shape  # FlowMatchEulerDiscreteScheduler draws in the packed layout the pipeline steps in
        return self.unpack(torch.randn((B, (h // 2) * (w // 2), C * 4), generator=rng, device=self.device), h, w)


FAMILIES = {"SanaPipeline": SanaBackbone, "StableDiffusion3Pipeline": SD3Backbone, "FluxPipeline": FluxBackbone}

# --- 9. LoRA mode: one frozen base transformer, adapters "generator", "fake" and "ema"; the teacher is the base -----
# Two peft pitfalls, handled here once: (1) set_adapter() makes ONLY the active adapter trainable: after each switch the
# requires_grad flags are put back (generator and fake train, ema does not), or a backward pass after a switch would
# silently skip the other adapter; (2) gradient checkpointing recomputes a block in backward, when another adapter may
# be active: the checkpoint function records the forward pass's adapter and replays it on that block's LoRA layers.

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of every diffusers DiT family
LORA_TRAINABLE = ("generator", "fake")


def _tuner_layers(module):  # [(peft LoRA layer, [(lora parameter, trains?)])] in `module`, found once, cached on it
    if "_sid_tuner_layers" not in module.__dict__:
        module.__dict__["_sid_tuner_layers"] = [
            (m, [(p, n.split(".")[1] in LORA_TRAINABLE) for n, p in m.named_parameters() if n.startswith("lora_")])
            for m in module.modules()
            if isinstance(m, BaseTunerLayer)
        ]
    return module.__dict__["_sid_tuner_layers"]


def _adapter_state(module):  # the adapter a forward pass of `module` runs with now: its name, or None (adapters off)
    layer = next((layer for layer, _ in _tuner_layers(module)), None)
    return None if layer is None or layer.disable_adapters else layer.active_adapters[0]


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


def blocks(net):  # the repeated blocks of a diffusers DiT: its ModuleLists' members (FLUX has two kinds)
    return [block for child in net.children() if isinstance(child, nn.ModuleList) for block in child]


def checkpoint_blocks(net, share):
    """Checkpoint a `share` of net's blocks, spread evenly (0.5: every second), replaying the forward's LoRA adapter."""
    chosen = {id(b) for i, b in enumerate(blocks(net)) if math.floor((i + 1) * share) > math.floor(i * share)}

    def checkpoint(block, *args):  # diffusers calls it for every block when checkpointing is enabled
        if id(block) not in chosen:
            return block(*args)
        state = _adapter_state(block)

        def run(*a):
            with use_adapter(block, state):
                return block(*a)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    net.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


# torch.compile of each block alone: one graph serves every block of a kind (minutes, not tens of minutes). Per-sample
# guidance scales stay outside; the batch sizes (B, 2B with CFG) and LoRA's four adapter states each compile once.
COMPILE = dict(dynamic=False)
torch._dynamo.config.cache_size_limit = 64


class AdapterView(nn.Module):
    """The shared base seen through one adapter (None: the teacher, adapters off). Not a submodule: parameters()
    and state_dict() are the adapter's (the teacher's: the frozen base's): optimizers, EMA, checkpoints hold MBs."""

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

    def _key(self, name):  # adapter-agnostic names, so generator and ema states are interchangeable
        return name.replace(f".{self.adapter}.", ".") if self.adapter else name

    def state_dict(self, *args, **kwargs):
        return {self._key(n): p.detach() for n, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(state[self._key(n)])

    def forward(self, *args, **kwargs):
        with use_adapter(self.base, self.adapter):
            return self.base(*args, **kwargs)

    def merged_state_dict(self):
        """The base's state dict with this LoRA fused in: W + delta in float32 (bf16 drops delta < 2^-9 |W|), as W."""
        state = {
            k.replace(".base_layer", ""): v.detach() for k, v in self.base.state_dict().items() if "lora" not in k
        }
        for name, module in self.base.named_modules():
            if isinstance(module, BaseTunerLayer) and self.adapter in module.lora_A:
                w, delta = module.get_base_layer().weight.detach(), module.get_delta_weight(self.adapter).detach()
                state[f"{name}.weight"] = (w.float() + delta.float()).to(w.dtype)
        return state


def lora_students(backbone, rank):
    """(generator, fake, ema) adapter views on the teacher, all starting as it (LoRA B = 0); teacher: adapters off."""
    base = backbone.teacher
    for name in ("generator", "fake", "ema"):
        with warnings.catch_warnings():  # peft warns that a model gets several adapters: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            base.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name=name)
    views = [AdapterView(base, name) for name in ("generator", "fake", "ema")]
    for view in views:  # trainable adapter weights in float32 even on a bf16 base (bf16 compute comes from autocast)
        for p in view.parameters():
            p.data = p.data.float()
    views[2].load_state_dict(views[0].state_dict())
    _set_adapter_state(base, None, force=True)
    backbone.teacher = AdapterView(base, None)
    return views


# --- 10. Real images for data-aided SiD (D16): read, resize + center-crop, encode once with the teacher's VAE ------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_captions(path):
    """[(image path, caption)] of a folder of images with same-name .txt captions, and how many images have none."""
    if not os.path.isdir(path):
        raise UserError(f"--data {path}: not a folder of images with same-name .txt captions")
    images = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_EXTENSIONS)]
    pairs = [
        (im, open(txt, encoding="utf-8").read().strip())
        for im in images
        if os.path.isfile(txt := os.path.splitext(im)[0] + ".txt")
    ]
    pairs = [(image, caption) for image, caption in pairs if caption]
    return pairs, len(images) - len(pairs)


def encode_data(backbone, path, cache_path):
    """(latents (N, C, h, w) on the CPU, captions, skipped counts) of a data set, encoded once, cached at cache_path."""
    key = dict(path=os.path.abspath(path), resolution=backbone.resolution, teacher=backbone.source)
    cache = torch.load(cache_path, weights_only=False) if os.path.isfile(cache_path) else {}
    if cache.get("key") == key:
        return cache["latents"], cache["captions"], cache["skipped"]
    (pairs, no_caption), vae, R = read_image_captions(path), backbone.pipe.vae, backbone.resolution
    latents, captions, unreadable = [], [], 0
    for image_path, caption in pairs:
        try:  # resized (shorter side) and center-cropped to a square by the pipeline's own processor: (1, 3, R, R)
            with Image.open(image_path) as im:
                x = backbone.pipe.image_processor.preprocess(im.convert("RGB"), R, R, resize_mode="crop")
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
    if not latents:
        raise UserError(
            f"--data {path}: no usable image-caption pairs ({unreadable} unreadable, {no_caption} without caption)"
        )
    latents, skipped = torch.cat(latents), dict(unreadable=unreadable, no_caption=no_caption)  # (N, C, h, w)
    atomic_save(dict(key=key, latents=latents, captions=captions, skipped=skipped), cache_path)
    return latents, captions, skipped


# --- 11. A quality number for every run, with no extra download: the student's Frechet distance to the teacher ----
# At a run's start the teacher draws a reference set, QUALITY_SIZE samples (the run's prompts in turn, fixed seeds), by
# its own REFERENCE_STEPS-step Euler sampler guided as in the losses; each evaluation, the student (EMA) draws the same
# prompts and seeds. The teacher sees both given the empty prompt (the image, not its fit to a prompt): its last hidden
# states at t = QUALITY_T, averaged over a 4 x 4 grid of image regions, whitened on the reference's top QUALITY_DIMS
# principal directions (there the reference is N(0, I)), then FID's Frechet distance to N(0, I). Validated by
# experiments/digits.py --metric-study; the alternatives weighed by experiments/metric_variants.py.
QUALITY_SIZE, QUALITY_T, QUALITY_DIMS, REFERENCE_STEPS = 512, 0.3, 8, 32


def grid_features(hidden, B, cells=4):  # (B, N, C) -> (B, C, side, side) -> 4 x 4 averages (B, 16 C); toy: (B, C)
    h, side = hidden[-B:].float(), math.isqrt(hidden.shape[1]) if hidden.dim() == 3 else 0  # N tokens: side x side
    return F.adaptive_avg_pool2d(h.reshape(B, side, side, -1).permute(0, 3, 1, 2), cells).flatten(1) if side else h


def frechet_to_standard(f):
    """FID's Frechet distance between a Gaussian fitted to f (n, d) and N(0, I): |mu|^2 + tr(C + I - 2 C^1/2), i.e.
    |mu|^2 + sum_i (sqrt(lambda_i) - 1)^2 over the eigenvalues lambda_i of f's covariance C."""
    lam = torch.linalg.eigvalsh(torch.cov(f.T)).clamp_min(0)  # (d,)
    return (f.mean(0).square().sum() + (lam.sqrt() - 1).square().sum()).item()


class Quality:
    """quality(net) -> the score of a generator's K-step samples, kept in .samples (the preview); lower is better;
    .lines: the teacher's own 4- and 8-step scores. `seed`: the initial noise's; the features' +1, re-noising's +2."""

    def __init__(self, backbone, cfg, cache=None, seed=0):
        self.backbone, self.cfg, self.seed, n, bb = backbone, cfg, seed, QUALITY_SIZE, backbone
        idx = [i % len(bb.prompts) for i in range(n)] if bb.prompts else None
        self.cond = idx and bb.cond_for(idx)  # (dict of (n, ...) tensors, or None: an unconditional teacher)
        self.z = bb.noise((n, *bb.sample_shape), torch.Generator(bb.device).manual_seed(seed))
        key = dict(
            prompts=idx and [bb.prompts[i] for i in idx],
            shape=bb.sample_shape,
            seed=seed,
            settings=(n, QUALITY_T, QUALITY_DIMS, REFERENCE_STEPS, cfg.cfg_eval_real, cfg.cfg_t_min, cfg.cfg_t_max),
        )
        saved = torch.load(cache, bb.device, weights_only=False) if cache and os.path.isfile(cache) else {}
        if saved.get("key") == key:
            self.mean, self.basis, self.lines = saved["stats"]
            return
        teacher = lambda K: self.chunked(
            lambda z, c: euler_sample(
                lambda x, t: bb.velocity(  # noqa: E731  K steps
                    bb.teacher, x, t, c, guidance_scale(cfg.cfg_eval_real, t, cfg.cfg_t_min, cfg.cfg_t_max)
                ),
                z,
                K,
            ),
            self.z,
        )
        with autocast(cfg, bb.device):
            f = self.features(teacher(REFERENCE_STEPS))  # (n, C), float64 (as all that follows)
            self.mean, std = f.mean(0), f.std(0) + 1e-6
            _, s, v = torch.linalg.svd((f - self.mean) / std, full_matrices=False)  # principal directions
            d = min(QUALITY_DIMS, n - 1)  # directions kept (n - 1 at most: centred, the reference spans no more)
            self.basis = v[:d].T * (n - 1) ** 0.5 / s[:d] / std[:, None]  # (C, d): the reference's covariance -> I
            self.lines = {K: self.score(teacher(K)) for K in (4, 8)}  # the plot's: the same prompts and seeds
        if cache and int(os.environ.get("RANK", 0)) == 0:
            atomic_save(dict(key=key, stats=(self.mean, self.basis, self.lines)), cache)

    def chunked(self, fn, x):  # fn(rows, their conditioning) over 16 rows at a time: no batch larger than that
        return torch.cat(
            [
                fn(x[i : i + 16], self.cond and {k: v[i : i + 16] for k, v in self.cond.items()})
                for i in range(0, len(x), 16)
            ]
        )

    def features(self, x):
        """The teacher's grid-averaged last hidden states of x (N, *D) noised to QUALITY_T, prompt-free: (N, 16 C)."""
        bb, t = self.backbone, torch.full((len(x),), QUALITY_T, device=x.device)

        def pooled(x_t, _):  # (the rows' prompts unused: the empty prompt's conditioning, or None for the toy)
            empty = bb.uncond and {k: v.expand(len(x_t), *v.shape[1:]) for k, v in bb.uncond.items()}
            with torch.no_grad(), capture_features(bb.teacher) as hidden:
                bb.velocity(bb.teacher, x_t, t[: len(x_t)], empty, 1.0)
            return grid_features(hidden[0], len(x_t))

        eps = bb.noise(x.shape, torch.Generator(bb.device).manual_seed(self.seed + 1))  # the same each time
        return self.chunked(pooled, add_noise(x, eps, t)).double()

    def score(self, x):  # whitened as the reference: (N, d)
        return frechet_to_standard((self.features(x) - self.mean) @ self.basis)

    def __call__(self, net):
        bb, g, cfg = self.backbone, torch.Generator(self.backbone.device).manual_seed(self.seed + 2), self.cfg
        draw = lambda x: bb.step_noise(x.shape, g)  # noqa: E731
        with autocast(cfg, bb.device):
            self.samples = self.chunked(
                lambda z, c: generate(
                    lambda x, t: bb.velocity(net, x, t, c, cfg.student_guidance), z, cfg.steps, cfg.noise, draw
                ),
                self.z,
            )
            return self.score(self.samples)


def plot_quality(out, lines, now):
    """OUT/quality.png: the student's number over the run (OUT/log.jsonl's, and `now`), the teacher's as lines."""
    log = os.path.join(out, "log.jsonl")
    points = [
        (m["step"], m["eval"]["quality"])
        for m in map(json.loads, open(log) if os.path.exists(log) else [])
        if "quality" in (m.get("eval") or {}) and m["step"] < now[0]
    ] + [now]
    ax = Figure(figsize=(6, 3.5)).subplots()
    ax.plot(*zip(*points), "o-", label="student (EMA)")
    for (K, q), ls in zip(lines.items(), ("--", ":")):
        ax.axhline(q, color="gray", ls=ls, label=f"teacher, {K} Euler steps")
    ax.set(xlabel="iteration", ylabel="Frechet distance to the teacher (lower is better)", yscale="symlog")
    ax.legend()
    ax.figure.savefig(os.path.join(out, "quality.png"), dpi=90, bbox_inches="tight")


# --- 12. torchrun: Part I's Runtime for several processes -- FSDP2 sharding, gradient averaging, sharded checkpoints

# cuDNN's fused attention, torch's first choice on Hopper GPUs, returned NaN in the backward pass through FLUX's joint
# attention on an H200 (torch 2.11) where the flash, memory-efficient and math kernels stayed finite: switched off.
torch.backends.cuda.enable_cudnn_sdp(False)


class Distributed(Runtime):
    """Several processes under torchrun. Full mode (`sharded`): FSDP2 shards every network, averages gradients in
    backward, checkpoints a torch.distributed.checkpoint folder. LoRA mode: replicated adapters, gradients all-reduced
    by hand (DDP expects a backward into the weights after every forward; SiD runs the fake network forward alone)."""

    def __init__(self, rank, world, device, sharded):
        super().__init__(device)
        self.rank, self.world, self.sharded = rank, world, sharded

    def any_rank(self, flag):
        flag = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def average_grads(self, net):
        if not self.sharded:  # (FSDP2 averaged them in backward)
            for p in net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)  # the mean over ranks: the gradient of the global batch's mean loss

    def checkpoint_path(self, out):
        return os.path.join(out, "checkpoint" if self.sharded else "checkpoint.pt")

    def read_meta(self, path):
        return torch.load(f"{path}/meta.pt", weights_only=False) if self.sharded else super().read_meta(path)

    def save(self, path, nets, meta):
        if not self.sharded:
            return super().save(path, nets, meta) if self.rank == 0 else None
        tmp = f"{path}.tmp"
        if self.rank == 0:
            remove_path(tmp)
        dist.barrier()
        dcp.save(sharded_state(nets), checkpoint_id=tmp)  # every rank writes its shards
        if self.rank == 0:
            torch.save(meta, os.path.join(tmp, "meta.pt"))
            replace_path(tmp, path)
        dist.barrier()

    def load(self, path, nets):
        if not self.sharded:
            return super().load(path, nets)
        state = sharded_state(nets)  # filled in place; partial: Adam has no state for a weight that never had a grad
        dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        for name, (net, opt) in nets.items():
            set_model_state_dict(net, state[name]["model"])
            if opt:
                set_optimizer_state_dict(net, opt, state[name]["optim"])


def sharded_state(nets):  # DCP's sharded state dicts of every network and optimizer: to save, or to load into
    return {
        name: dict(model=get_model_state_dict(net), optim=get_optimizer_state_dict(net, opt))
        if opt
        else dict(model=get_model_state_dict(net))
        for name, (net, opt) in nets.items()
    }


def setup_runtime(cfg):  # one process, or torchrun's process group (WORLD_SIZE, RANK, LOCAL_RANK; NCCL or gloo)
    device, world = resolve_device(cfg.device), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Runtime(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(int(os.environ["RANK"]), world, device, sharded=cfg.mode == "full")


def shard(net, mp_policy=None, device_type=None, compiled=False):
    """FSDP2: each block a unit (compiled first with --compile), then the root, on a mesh of the net's device type."""
    mesh = init_device_mesh(device_type or next(net.parameters()).device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, **(dict(mp_policy=mp_policy) if mp_policy else {}))
    for block in blocks(net):
        if compiled:
            block.compile(**COMPILE)
        fully_shard(block, **kw)
    fully_shard(net, **kw)
    return net


def student_precision(cfg):  # bf16 autocast over float32 masters: all-gather bf16 weights, reduce float32 gradients
    return MixedPrecisionPolicy(torch.bfloat16, torch.float32) if cfg.precision == "bf16-autocast" else None


def sharded_copy(teacher, dtype, mp_policy, trainable, compiled=False):
    """A copy of the sharded teacher in `dtype`: made on the meta device, sharded alike, each rank fills its shards."""
    with torch.device("meta"):
        net = type(teacher).from_config(teacher.config).to(dtype)
    device = next(teacher.parameters()).device
    net.requires_grad_(trainable).train(trainable)
    shard(net, mp_policy, device.type, compiled)  # the module is still on the meta device: the teacher's mesh
    net.to_empty(device=device)
    with torch.no_grad():
        for (n, p), (m, q) in zip(net.named_parameters(), teacher.named_parameters(), strict=True):
            assert n == m, (n, m)
            p.to_local().copy_(q.to_local())  # the same FSDP2 layout: local shard to local shard
        for b, c in zip(net.buffers(), teacher.buffers(), strict=True):
            b.copy_(c)  # buffers are not sharded
    return net


def remove_path(path):  # a file or a folder, if it is there
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def replace_path(tmp, path):
    """Move a finished file or folder onto `path`: the old one renamed away first, removed last (never half a one)."""
    remove_path(f"{path}.old")
    if os.path.exists(path):
        os.replace(path, f"{path}.old")
    os.replace(tmp, path)
    remove_path(f"{path}.old")


# --- 13. Config: one typed place for every default; presets by name override a few fields -------------------------


def option(default, help, choices=None, const=None):
    """A Config field: its default, the help of its --flag, the values it allows, its value as a bare flag."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, const=const))


@dataclasses.dataclass
class Config:
    teacher: str = option("toy", "the teacher: a preset (listed below), a local diffusers pipeline folder or a hub id")
    loss: str = option("sid", "the generator loss: SiD's (D11), or DMD's for contrast (D14)", ("sid", "dmd"))
    alpha: float = option(1.0, "weight of the fake-score term in SiD's generator loss (D11); original SiD: 1.2")
    weighting: str = option("1-t", "the generator loss's weight w(t) over noise levels (D12)", WEIGHTINGS)
    steps: int = option(4, "K, the generator's number of steps, at t = 1, 1 - 1/K, ... (D13)")
    noise: str = option(
        "fresh",
        "the noise that re-noises between generator steps: new, the initial one, or the one "
        "the current state implies (a plain Euler step)",
        ("fresh", "fixed", "ddim"),
    )
    train_step: str = option(
        "uniform",
        "which generator step each iteration trains: uniform over 1..K (the paper) or the last",
        ("uniform", "last"),
    )
    fake_updates: int = option(1, "fake-network updates per generator update")
    cfg_train_fake: float = option(1.0, "guidance scale of the fake network in its own update (1: none; D17)")
    cfg_eval_fake: float = option(1.0, "guidance scale of the fake network inside the generator loss (D17)")
    cfg_eval_real: float = option(1.0, "guidance scale of the teacher inside the generator loss (D17)")
    cfg_t_min: float = option(0.0, "the guidance scales apply only for noise levels t >= this (D17)")
    cfg_t_max: float = option(1.0, "the guidance scales apply only for noise levels t <= this (D17)")
    iters: int = option(1000, "generator updates in the run")
    batch_size: int = option(256, "generated samples per update, per process")
    lr_gen: float = option(5e-6, "the generator's Adam learning rate")
    lr_fake: float = option(5e-6, "the fake network's Adam learning rate")
    lr_schedule: str = option("constant", "learning rates constant (official) or cosine to 0", ("constant", "cosine"))
    ema_decay: float = option(0.999, "decay of the generator's moving average: the student a run keeps")
    seed: int = option(0, "seed of every random draw of the run")
    student_guidance: float = option(1.0, "guidance the generator is called with: 1 (none); FLUX: embedded guidance")
    gan_weight: float = option(0.5, "data-aided runs: share of the adversarial term in the generator loss (D16)")
    resolution: int = option(0, "image side in pixels (0: the teacher's native size)")
    prompts: str = option("", "a text file of prompts, one per line (none: a built-in list of 16)")
    data: str = option("", "real images for data-aided SiD (D16): a folder of images, x.png with its caption x.txt")
    out: str = option("out/sid", "the run folder: checkpoint, log.jsonl, previews and the exported student")
    save_every: int = option(500, "iterations between checkpoints (0: only at the end)")
    eval_every: int = option(0, "iterations between evaluations of the student: a quality number, a preview (0: none)")
    device: str = option("auto", "'auto' (CUDA if there is one), 'cpu', 'cuda' or 'cuda:N'")
    precision: str = option(
        "fp32",
        "fp32; bf16-autocast (bf16 teacher and compute, float32 trainable weights); or "
        "bf16 (pure bf16, the trainable weights too)",
        ("fp32", "bf16-autocast", "bf16"),
    )
    grad_checkpointing: float = option(
        0.0,
        "share of the transformer blocks recomputed in backward, spread evenly: "
        "less memory, more time (0.5: every second block; no value: 1)",
        const=1.0,
    )
    compile: bool = option(False, "torch.compile each transformer block: minutes of compilation, then faster steps")
    mode: str = option(
        "full",
        "full: three copies of the DiT (FSDP2-sharded under torchrun); lora: LoRA adapters on one frozen DiT",
        ("full", "lora"),
    )
    lora_rank: int = option(64, "rank of the LoRA adapters (--mode lora)")


# Presets change only what differs from the Config defaults. The toy: the last step trained (derivation.md section 4),
# re-noising with the initial noise, w = 1/t, larger learning rates on a cosine (experiments/README.md). The DiT
# presets: the official SiD-DiT settings (Adam(0, 0.999), lr 5e-6, SANA's CFG 4.5 for all three scales, bf16 autocast;
# SD3 the same, FLUX its usual embedded 3.5: untuned), batch per process; one change, from the guidance study
# (experiments/README.md): guidance only for t in [0.2, 0.6] (D17). Batch and checkpointed share fill one 80 GB GPU, at
# most 69 GiB by the memory plan: larger teachers train LoRA there, on several GPUs full (FSDP2).
_INTERVAL = dict(cfg_t_min=0.2, cfg_t_max=0.6)
_CFG = lambda w: dict(cfg_train_fake=w, cfg_eval_fake=w, cfg_eval_real=w)  # noqa: E731  one CFG scale for all three
_SMALL = dict(
    train_step="last",
    weighting="inv-l1",
    ema_decay=0.99,
    save_every=0,  # toy and digits
    gan_weight=0.01,
)  # the SiD term sums 2 (or 64) dims here, not 10^4+: the GAN term must weigh far less
_DIT = dict(precision="bf16-autocast", batch_size=4, iters=20_000, save_every=500, eval_every=1000, **_INTERVAL)
HUB_IDS = {
    "sana-0.6b-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    "sana-1.6b-1024": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
}
PRESETS = {
    "toy": dict(
        _SMALL,
        teacher="toy",
        iters=2400,
        batch_size=2048,
        lr_gen=1.6e-3,
        lr_fake=2.4e-3,
        fake_updates=2,
        weighting="1/t",
        noise="fixed",
        lr_schedule="cosine",
        out="out/toy",
    ),
    # experiments/digits.py: a 3-block SANA DiT on 8x8 digits, the class as a one-token caption, guided at CFG 2
    "digits": dict(
        _SMALL,
        **_CFG(2.0),
        **_INTERVAL,
        teacher="digits",
        iters=300,
        batch_size=128,
        lr_gen=1e-4,
        lr_fake=3e-4,
        out="out/digits",
    ),
    "sana-0.6b-512": dict(_DIT, **_CFG(4.5), resolution=512, batch_size=32, grad_checkpointing=0.75),
    "sana-1.6b-1024": dict(_DIT, **_CFG(4.5), resolution=1024, grad_checkpointing=1.0),
    "sd3-medium": dict(_DIT, **_CFG(4.5), mode="lora", resolution=1024, grad_checkpointing=0.2),
    "sd3.5-medium": dict(_DIT, **_CFG(4.5), mode="lora", resolution=1024, grad_checkpointing=0.2),
    "sd3.5-large": dict(_DIT, **_CFG(4.5), mode="lora", resolution=1024, grad_checkpointing=0.85),
    "flux-dev": dict(_DIT, **_CFG(3.5), student_guidance=3.5, mode="lora", resolution=1024, grad_checkpointing=1.0),
}


def check_config(cfg):  # fail loudly, with one line, on values the algorithm cannot use
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices and value not in choices:
            raise UserError(f"{flag(f.name)} {value!r} is not one of: {', '.join(choices)}")
        if f.type is float and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} must be finite, got {value}")
    rules = (
        (("steps", "iters", "batch_size", "fake_updates", "lora_rank"), lambda v: v >= 1, "be at least 1"),
        (("lr_gen", "lr_fake"), lambda v: v > 0, "be positive"),
        (("resolution", "save_every", "eval_every"), lambda v: v >= 0, "not be negative"),
        (("ema_decay",), lambda v: 0 <= v < 1, "be in [0, 1)"),
        (("grad_checkpointing",), lambda v: 0 <= v <= 1, "be in [0, 1]"),
    )
    for names, ok, rule in rules:
        for name in names:
            if not ok(getattr(cfg, name)):
                raise UserError(f"{flag(name)} must {rule}, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.cfg_t_min < cfg.cfg_t_max <= 1.0:
        raise UserError(
            f"the guidance interval needs 0 <= --cfg-t-min < --cfg-t-max <= 1, not {cfg.cfg_t_min} and {cfg.cfg_t_max}"
        )
    return cfg


def make_config(preset=None, **overrides):  # Config defaults <- preset <- overrides (None ignored), then checked
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    return check_config(Config(**{**PRESETS.get(preset, {}), **{k: v for k, v in overrides.items() if v is not None}}))


def add_config_flags(parser, skip=(), presets=None):
    """A --flag per Config field (default None: the preset fills it), its help the defaults of presets {label: name}"""
    presets = presets or {"": None}
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        values = {label: PRESETS.get(name, {}).get(f.name, f.default) for label, name in presets.items()}
        common = max(values.values(), key=list(values.values()).count)  # the value most presets share
        rest = "; ".join(f"{label}: {v}" for label, v in values.items() if v != common)
        help = f"{f.metadata['help']} [default: {common if common != '' else 'none'}{f' ({rest})' if rest else ''}]"
        kw = (
            dict(action=argparse.BooleanOptionalAction)
            if f.type is bool
            else dict(type=f.type, choices=f.metadata["choices"])
        )
        if f.metadata["const"] is not None:
            kw.update(nargs="?", const=f.metadata["const"])
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, help=help.replace("%", "%%"), **kw)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2, negative numbers (-1e-4 too) as values, text as written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def resolve_device(name):  # 'auto': CUDA if there is one
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this machine has no CUDA device")
    try:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows")


# --- 14. Teachers from disk or hub, the memory plan, export, and the command line ---------------------------------


def resolve_teacher(name, configs_only=False):
    """(source, pipeline class name read from its model_index.json) of a preset (its hub id; `configs_only`: its configs
    in assets/hf, offline and without a token for the gated ones), an existing folder, or a hub id 'owner/repo'."""
    src = HUB_IDS.get(name, name)
    if configs_only and name in HUB_IDS:
        src = os.path.join(HERE, "assets", "hf", "hub", f"models--{src.replace('/', '--')}", "snapshots", "0" * 40)
    if os.path.exists(src):
        index = os.path.join(src, "model_index.json")
        if not os.path.isfile(index):
            raise UserError(f"--teacher {name}: {src} is not a diffusers pipeline folder (no model_index.json)")
    elif src.count("/") == 1 and not src.startswith((".", "/", "~")):
        index = _hub_file(name, src, "model_index.json")
    else:
        raise UserError(f"--teacher {name}: not a preset ({', '.join(HUB_IDS)}), a folder, or a hub id owner/repo")
    with open(index) as f:
        family = json.load(f).get("_class_name", "?")
    if family not in FAMILIES:
        raise UserError(f"--teacher {name}: pipeline class {family} is not supported ({', '.join(FAMILIES)} are)")
    return src, family


def _hub_file(name, repo, filename):
    """hf_hub_download of one file: the cache, else the hub after a 5-second probe (not half a minute of retries); or
    a line that says why not: offline, unreachable, gated, missing."""
    hub, where = huggingface_hub.constants, f"--teacher {name}: cannot read {repo}/{filename}"
    local, url = "; or give --teacher a local pipeline folder", urllib.parse.urlparse(hub.ENDPOINT)
    with contextlib.suppress(Exception):
        return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
    if hub.HF_HUB_OFFLINE:
        raise UserError(f"{where}: HF_HUB_OFFLINE is set and it is not in the hub cache ({hub.HF_HUB_CACHE}){local}")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:  # no route to the hub: say so now, not after the client's retries
        raise UserError(
            f"{where}: the hub ({url.hostname}) is unreachable ({e}); offline, set HF_HUB_OFFLINE=1{local}"
        )
    try:
        return huggingface_hub.hf_hub_download(repo, filename)
    except GatedRepoError:
        why = f"the model is gated: accept its licence at https://huggingface.co/{repo}, log in (`hf auth login`)"
    except RepositoryNotFoundError:
        why = "no such model on the hub (or a private one: log in with `hf auth login`)"
    except Exception as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
    raise UserError(f"{where}: {why}{local}")


def teacher_dtype(cfg):  # the frozen teacher's (and every pipeline component's) dtype: bf16 unless the run is fp32
    return torch.float32 if cfg.precision == "fp32" else torch.bfloat16


def load_backbone(cfg, device, src=None, family=None):
    """The teacher pipeline as a Backbone, at cfg.resolution (0: the transformer's native size)."""
    for lib in (diffusers, transformers, huggingface_hub):  # their notes and progress bars are noise; failures raise
        lib.utils.logging.set_verbosity(lib.utils.logging.CRITICAL)
    diffusers.utils.logging.disable_progress_bar(), transformers.utils.logging.disable_progress_bar()
    if src is None:
        src, family = resolve_teacher(cfg.teacher)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(src, dtype=teacher_dtype(cfg))
    except (OSError, ValueError) as e:  # missing weights (a configs-only cache or folder), a broken pipeline
        raise UserError(
            f"cannot load the pipeline {src}: {' '.join(str(e).split())} (a cache or folder holding only "
            "configs, such as assets/hf, serves --dry-run alone)"
        )
    pipe.set_progress_bar_config(disable=True)
    native = (getattr(pipe.transformer.config, "sample_size", None) or 128) * pipe.vae_scale_factor
    backbone = FAMILIES[family](pipe, cfg.resolution or native, device, teacher_dtype(cfg))
    backbone.source, backbone.family = src, family
    return backbone


def _read_json(src, name):  # a file of a pipeline folder, or of a hub id (from the hub cache when it is there)
    with open(os.path.join(src, name) if os.path.isdir(src) else huggingface_hub.hf_hub_download(src, name)) as f:
        return json.load(f)


def meta_transformer(src):  # the teacher's transformer on the meta device from its config.json: shapes, no weights
    index, config = _read_json(src, "model_index.json"), _read_json(src, "transformer/config.json")
    with torch.device("meta"):
        return getattr(diffusers, index["transformer"][1]).from_config(config)


# Per family, beyond its transformer config: text tokens (SANA: Gemma-2, 300; SD3: 77 CLIP + 256 T5; FLUX: 512 T5),
# the VAE's factor (DC-AE 32, KL 8), and the text encoders' parameters, on the GPU while the prompts are encoded.
TEXT_TOKENS = {"SanaPipeline": 300, "StableDiffusion3Pipeline": 77 + 256, "FluxPipeline": 512}
VAE_FACTOR = {"SanaPipeline": 32, "StableDiffusion3Pipeline": 8, "FluxPipeline": 8}
TEXT_ENCODER_PARAMS = {
    "SanaPipeline": 2.61e9,
    "StableDiffusion3Pipeline": 0.12e9 + 0.69e9 + 4.76e9,
    "FluxPipeline": 0.12e9 + 4.76e9,
}
# Activations a block saves for backward, in elements per token and channel, when its weights train and when they are
# frozen (only what the input's gradient needs: the teacher, LoRA's base); a checkpointed block keeps only its inputs,
# CHECKPOINTED_INPUTS. Measured with saved-tensor hooks (experiments/bench.py); test_memory_plan_matches_measured_bytes.
SAVED_PER_BLOCK = {
    "SanaPipeline": (41.0, 35.0),
    "StableDiffusion3Pipeline": (18.0, 10.0),
    "FluxPipeline": (24.0, 12.0),
}
CHECKPOINTED_INPUTS = {
    "SanaPipeline": (2.8, 1.1),
    "StableDiffusion3Pipeline": (2.0, 1.35),
    "FluxPipeline": (2.15, 1.6),
}
# A text token's cost in a block, relative to an image token's: SANA's enter only its cross-attention.
TEXT_IN_BLOCKS = {"SanaPipeline": 0.1, "StableDiffusion3Pipeline": 1.0, "FluxPipeline": 1.0}


def vae_factor(src, family):
    """The VAE's spatial factor: 2^(blocks - 1) by the pipeline's vae/config.json (as diffusers), else the family's."""
    c = _read_json(src, "vae/config.json") if os.path.isfile(os.path.join(src, "vae", "config.json")) else {}
    blocks = c.get("encoder_block_out_channels") or c.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else VAE_FACTOR[family]


def memory_plan(cfg, net, world_size=1, factor=None):
    """Bytes per GPU of weights, gradients, Adam's moments and activations for cfg on `world_size` GPUs (`net` on the
    meta device). full: teacher, generator, fake and EMA, sharded by FSDP2; lora: a frozen base + three float32
    adapters. Activations peak in the generator update: the generator's graph (batch B), the teacher's and fake's (2B
    with two-branch CFG), and on one GPU bf16 copies of trainable weights. A run needs max('total', 'startup')."""
    family = {"Sana": "SanaPipeline", "SD3": "StableDiffusion3Pipeline", "Flux": "FluxPipeline"}[
        re.match("Sana|SD3|Flux", type(net).__name__).group()
    ]  # from its transformer class: SanaTransformer2DModel...
    c, P = net.config, sum(p.numel() for p in net.parameters())
    base_bytes, train_bytes = (4 if cfg.precision == "fp32" else 2), (2 if cfg.precision == "bf16" else 4)
    if cfg.mode == "lora":
        lora = sum(
            cfg.lora_rank * (m.in_features + m.out_features)
            for name, m in net.named_modules()
            if isinstance(m, nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS)
        )
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
    per_sample = cfg.cfg_t_min > 0 or cfg.cfg_t_max < 1  # a guidance interval: per-sample scales (D17)
    cfg_batch = [cfg_branches(w, family == "FluxPipeline", per_sample) for w in (cfg.cfg_eval_real, cfg.cfg_eval_fake)]
    batches = (
        cfg.batch_size,
        cfg.batch_size * cfg_batch[0],
        cfg.batch_size * cfg_batch[1],
    )  # generator, teacher, fake
    trains = (cfg.mode == "full", False, cfg.mode == "full")  # whose weights take gradients in the generator update
    unit = tokens * width * base_bytes  # one element per token-channel, in bytes
    per_block = [b * SAVED_PER_BLOCK[family][0 if t else 1] * unit for b, t in zip(batches, trains)]
    # a checkpointed block keeps its inputs (text tokens in full: they are inputs) and is recomputed one at a time
    n_ck = math.floor(layers * cfg.grad_checkpointing)  # as many as checkpoint_blocks chooses
    unit_in = (image_tokens + TEXT_TOKENS[family]) * width * base_bytes
    inputs = sum(b * CHECKPOINTED_INPUTS[family][0 if t else 1] * unit_in for b, t in zip(batches, trains))
    stored, recompute = n_ck * inputs + (layers - n_ck) * sum(per_block), (max(per_block) if n_ck else 0)
    plan = dict(
        parameters=P,
        trainable=trainable,
        weights=weights / shard,
        gradients=trainable * grad_bytes / shard,
        optimizer=2 * trainable * grad_bytes / shard,
        activations=stored + recompute + copies,
        recompute=recompute,
    )
    plan["total"] = plan["weights"] + plan["gradients"] + plan["optimizer"] + plan["activations"]
    plan["startup"] = P * base_bytes + TEXT_ENCODER_PARAMS[family] * base_bytes
    return plan


def check_inputs(cfg, configs_only=False):
    """What the inputs and configs tell before any weights load: (prompts, src, family, meta-device net, VAE factor)."""
    if cfg.data and cfg.prompts:
        raise UserError("--data and --prompts: with a data set its captions are the prompts; give one of them")
    if cfg.data and not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data}: no such folder")
    prompts = read_prompts(cfg.prompts) if cfg.prompts else DEFAULT_PROMPTS
    src, family = resolve_teacher(cfg.teacher, configs_only)
    net, factor = meta_transformer(src), vae_factor(src, family)
    if cfg.resolution:
        check_resolution(cfg.resolution, factor, net.config.patch_size * FAMILIES[family].packing)
    return prompts, src, family, net, factor


def cmd_dry_run(cfg, world_size):  # the memory plan per GPU from the configs, after the checks a run makes first
    _, _, _, net, factor = check_inputs(cfg, configs_only=True)
    if not cfg.resolution:
        raise UserError(f"--dry-run needs --resolution for {cfg.teacher}, which is not a preset")
    plan = memory_plan(cfg, net, world_size, factor)
    print(
        f"memory plan per GPU: {cfg.teacher} ({type(net).__name__}, {plan['parameters'] / 1e9:.2f} B parameters), "
        f"mode {cfg.mode}, precision {cfg.precision}, {world_size} GPU(s), batch {cfg.batch_size}/GPU at "
        f"{cfg.resolution} px, {cfg.grad_checkpointing:.0%} of the blocks checkpointed"
    )
    print(f"  trainable parameters  {plan['trainable'] / 1e6:12.1f} M")
    for key in ("weights", "gradients", "optimizer", "activations", "total", "startup"):
        print(f"  {key:<20}  {plan[key] / 2**30:12.1f} GiB" + ("  (teacher + text encoders)" * (key == "startup")))
    return plan


def check_resolution(resolution, factor, patch):  # a whole number of latent patches, at most MAX_RESOLUTION
    if not 0 < resolution <= MAX_RESOLUTION or resolution % (factor * patch):
        raise UserError(
            f"--resolution {resolution}: must be a positive multiple of {factor * patch} for this teacher "
            f"(VAE factor {factor} x patch {patch}), at most {MAX_RESOLUTION}"
        )


MAX_RESOLUTION = 4096  # pixels: twice the largest side any supported teacher was trained at
STUDENT_META = "sid_flow.json"  # written beside the exported pipeline: how to sample it


def plain_copy(net, state, dtype):
    """A new module of net's class holding `state`, in `dtype` on the CPU (made on the meta device: no initialising)."""
    with torch.device("meta"):
        plain = type(net).from_config(net.config)
    plain.to(dtype).to_empty(device="cpu").load_state_dict(state)  # (to_empty: in place; loading copies, casting)
    return plain.eval()


def export_student(backbone, net, cfg, folder):
    """A diffusers pipeline folder, written beside and renamed into place: the teacher's components, `net` (LoRA fused)
    and FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, no shift): with sigmas generator_times(K), (D13)."""
    dtype, w = teacher_dtype(cfg), next(net.parameters())
    if isinstance(net, AdapterView):
        transformer = plain_copy(net.base, net.merged_state_dict(), dtype)
    elif w.device.type == "cpu" and w.dtype == dtype:
        transformer = net  # already a plain CPU copy in the right dtype
    else:
        transformer = plain_copy(net, net.state_dict(), dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        backbone.source,
        transformer=transformer,
        dtype=dtype,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True
        ),
    )
    tmp = f"{folder}.tmp{os.getpid()}"
    remove_path(tmp)  # (a crashed export's leftovers: a process id comes back)
    pipe.save_pretrained(tmp)
    if isinstance(net, AdapterView):  # the adapter alone too, loadable with load_lora_adapter()
        net.base.save_lora_adapter(os.path.join(tmp, "lora"), adapter_name=net.adapter)
    meta = dict(
        family=backbone.family,
        teacher=backbone.source,
        resolution=backbone.resolution,
        steps=cfg.steps,
        sigmas=generator_times(cfg.steps),
        guidance_scale=cfg.student_guidance,
        precision=cfg.precision,
        pipeline_kwargs=backbone.pipeline_kwargs,
        global_rng_step_noise=not backbone.step_noise_from_generator,
    )
    with open(os.path.join(tmp, STUDENT_META), "w") as f:
        json.dump(meta, f, indent=1)
    replace_path(tmp, folder)
    return folder


def cmd_distill(cfg):
    prompts, src, family, shapes, factor = check_inputs(cfg)  # bad input fails here, before any weights load
    runtime = setup_runtime(cfg)
    check_fits(cfg, shapes, factor, runtime)
    backbone = load_backbone(cfg, runtime.device, src, family)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.data:  # data-aided SiD: captions become the prompt set, latents the real samples (row for row)
        backbone.data, prompts, skipped = encode_data(backbone, cfg.data, os.path.join(cfg.out, "data_cache.pt"))
        if runtime.rank == 0:
            print(
                f"data: {len(prompts)} image-caption pairs; skipped {skipped['unreadable']} unreadable images and "
                f"{skipped['no_caption']} without caption"
            )
    backbone.set_prompts(prompts)
    quality = []  # built at the first evaluation: a run without evaluations draws no reference set

    def on_eval(step, generator, ema):  # every rank draws (a sharded forward is collective), rank 0 writes
        quality[:] = quality or [Quality(backbone, cfg, os.path.join(cfg.out, "reference.pt"))]
        q = quality[0](ema)
        if runtime.rank == 0:  # the preview, one PNG row: the first 4 samples it scored (the run's first 4 prompts)
            row = torch.as_tensor(backbone.decode(quality[0].samples[:4].float())).clamp(0, 1)  # (4, H, W, 3)
            path = os.path.join(cfg.out, f"preview_{step:07d}.png")
            Image.fromarray((torch.cat(list(row), 1) * 255).round().byte().numpy()).save(path)
            plot_quality(cfg.out, quality[0].lines, (step, q))
        return dict(quality=q)

    res = distill(cfg, backbone, on_eval=on_eval, runtime=runtime)
    which = "ema" if cfg.ema_decay > 0 else "generator"
    if runtime.rank == 0:
        net = res[which]
        if runtime.world > 1 and cfg.mode == "full":  # rank 0 reads the exported network alone from the checkpoint
            net = shapes.to(teacher_dtype(cfg)).to_empty(device="cpu")
            load_checkpoint_weights(runtime.checkpoint_path(cfg.out), which, net)
        folder = export_student(backbone, net, cfg, os.path.join(cfg.out, "student"))
        print(
            f"student pipeline: {folder} ({res['skipped']} non-finite iterations skipped, {runtime.world} processes)"
        )
    if runtime.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def check_fits(cfg, net, factor, runtime):
    """On CUDA, before any weights load: one line if the memory plan exceeds the free memory, naming what would fit."""
    if runtime.device.type != "cuda":
        return
    cfg = dataclasses.replace(cfg, resolution=cfg.resolution or (net.config.get("sample_size") or 128) * factor)
    need = lambda c: max(*(memory_plan(c, net, runtime.world, factor)[k] for k in ("total", "startup")))  # noqa
    free = torch.cuda.mem_get_info(runtime.device)[0]
    if need(cfg) > free:
        lighter = [dict(grad_checkpointing=s) for s in (0.5, 1.0)] + [
            dict(mode="lora", grad_checkpointing=s) for s in (0.0, 0.5, 1.0)
        ]  # in this order
        fits = [d for d in lighter + [dict(lighter[-1], batch_size=1)] if need(dataclasses.replace(cfg, **d)) <= free]
        hint = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in fits[0].items()) if fits else "more GPUs (torchrun)"
        raise UserError(
            f"the memory plan needs {need(cfg) / 2**30:.1f} GiB per GPU ({cfg.mode} mode, batch "
            f"{cfg.batch_size} at {cfg.resolution} px), {free / 2**30:.1f} GiB are free: try {hint} "
            "(--dry-run prints the plan)"
        )


def find_checkpoint(out):  # (path, meta) of a run's checkpoint: a sharded folder (torchrun, full mode) or a file
    folder, file = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.pt")
    if os.path.isdir(folder):
        return folder, torch.load(os.path.join(folder, "meta.pt"), weights_only=False)
    if not os.path.isfile(file):
        raise UserError(f"--out {out}: no checkpoint there (export reads the run folder of sid_flow.py)")
    return file, Runtime().read_meta(file)


def load_checkpoint_weights(path, which, net):
    """Network `which` of a checkpoint into `net` in place, reading only its tensors (DCP folder, or a mapped file)."""
    if os.path.isdir(path):
        state = {which: {"model": net.state_dict()}}  # in place: DCP reads into these tensors, casting to their dtype
        dcp.load(state, checkpoint_id=path, no_dist=True)  # this process alone, even inside a process group
        net.load_state_dict(state[which]["model"])
    else:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=False, mmap=True)[which])


def cmd_export(out, weights, device):
    """OUT/student from a run's checkpoint, finished or not; full mode loads it into the teacher's own transformer."""
    path, meta = find_checkpoint(out)
    if meta["config"]["teacher"] in ("toy", "digits"):
        raise UserError(
            f"--out {out}: a run of the {meta['config']['teacher']} teacher; export writes diffusers "
            "pipelines of image teachers, and this student's weights are already in its checkpoint.pt"
        )
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{**{k: v for k, v in meta["config"].items() if k in names}, "device": device})
    backbone = load_backbone(cfg, resolve_device(cfg.device))
    if cfg.mode == "lora":
        net = dict(zip(("generator", "fake", "ema"), lora_students(backbone, cfg.lora_rank)))[weights]
    else:
        net = backbone.teacher  # export needs no teacher: its module takes the student's weights
    load_checkpoint_weights(path, weights, net)
    print(
        f"student pipeline ({weights}, iteration {meta['step']}):",
        export_student(backbone, net, cfg, os.path.join(out, "student")),
    )


EPILOG = f"""presets (--teacher NAME): {", ".join(HUB_IDS)}; a local diffusers pipeline folder or a hub id owner/repo
works too ("a folder or hub id" in the defaults above). The 2-D toy: python run_toy.py --help
  python sid_flow.py export --out OUT [--weights ema|generator] [--device D]   # any checkpoint -> OUT/student
The student is a stock diffusers pipeline: README.md, "The student in stock diffusers", samples it."""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:  # OUT/checkpoint -> OUT/student, from any checkpoint (a finished run exports itself)
        p = Parser(prog="sid_flow.py export", description="any OUT/checkpoint -> OUT/student, a diffusers pipeline")
        p.add_argument("--out", required=True, help="the run folder of sid_flow.py holding its checkpoint")
        p.add_argument("--weights", default="ema", choices=("ema", "generator"), help="the student's [default: ema]")
        p.add_argument("--device", default="auto", help="auto (CUDA if any), cpu, cuda or cuda:N [default: auto]")
        return cmd_export(**vars(p.parse_args(argv[1:])))
    p = Parser(
        prog="sid_flow.py",
        description=__doc__.split("\n")[0],
        epilog=EPILOG,
        usage="python sid_flow.py --teacher NAME [options] | python sid_flow.py export --out OUT ...",
    )
    p.add_argument(
        "--teacher", help="the teacher (required): a preset (below), a pipeline folder, a hub id owner/repo"
    )
    p.add_argument("--out", help="the run folder: checkpoint, log, previews, student [default: out/TEACHER's name]")
    presets = {name: name for name in HUB_IDS} | {"a folder or hub id": None}  # the defaults its --help names
    add_config_flags(p, skip=("teacher", "out"), presets=presets)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan per GPU ($WORLD_SIZE GPUs, else one) "
        "from the teacher's configs (no weights are downloaded)",
    )
    a = vars(p.parse_args(argv))
    dry_run = a.pop("dry_run")
    if a["teacher"] is None:
        raise UserError(f"--teacher is required: a preset ({', '.join(HUB_IDS)}), a pipeline folder or a hub id")
    if a["teacher"] in PRESETS and a["teacher"] not in HUB_IDS:
        where = "python experiments/digits.py" if a["teacher"] == "digits" else "python run_toy.py"
        raise UserError(f"--teacher {a['teacher']}: that teacher is trained by {where.split()[1]}: run `{where}`")
    a["out"] = a["out"] or f"out/{slug(a['teacher'])}"
    cfg = make_config(a["teacher"] if a["teacher"] in PRESETS else None, **a)
    return cmd_dry_run(cfg, int(os.environ.get("WORLD_SIZE", 1))) if dry_run else cmd_distill(cfg)


def slug(name):
    """A folder name (letters, digits, '.-_'; never '' or a dot name) from the last part of a name, path or hub id."""
    base = os.path.basename(os.path.abspath(name)) if os.path.exists(name) else name.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in base).strip(".") or "run"


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # every rank stopped at the same iteration; one of them says so
        if int(os.environ.get("RANK", 0)) == 0:
            print(e, file=sys.stderr)
        sys.exit(130)
