"""sid_flow.py -- Score identity Distillation (SiD) of flow-matching models, in one file.

Read it top to bottom beside derivation.md (labels (D1)...(D19)). PART I, the method, is all the 2-D toy needs: 1 path
algebra (Bayes' rule), 2 times, weights, guidance, 3 losses, 4 the few-step generator, 5 the teacher interface, 6 one
SiD iteration (every draw, backward and step), 7 the loop. PART II scales it through Part I's interfaces (Backbone,
Runtime), each section using only what came before: 8 checkpoints, 9 config and presets, 10 LoRA, 11 torchrun and
FSDP2, 12 diffusers teachers (SANA, SD3, FLUX), 13 real images, 14 the quality number, 15 loading, the memory plan,
export and the command line.
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
#   CFG        v = v_uncond + kappa (v_cond - v_uncond), the empty prompt as uncond; kappa = 1: "conditional only"

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


# --- 2. Times, weights and guidance used during distillation (D14), (D18) -----------------------------------------


def sample_t(n, rng):
    """Times for both updates, (n,): logit-normal as the official code, t = sigmoid(N(ln 2, 1.6^2)), median 2/3, skewed
    to high noise. In float32 it never reaches 0 or 1 (that would take a draw 10 standard deviations out)."""
    return torch.sigmoid(torch.randn(n, generator=rng, device=rng.device) * 1.6 + math.log(2.0))


# w(t) of the generator loss, per sample: the seven weightings of the official code; 'inv-l1' is original SiD's
# 1 / mean|x_g - x0_teacher|. A weight written 1 / d has its denominator d clipped at 1e-5, as officially (a bound
# the logit-normal t never reaches in practice). Stop-gradient: a weight scales the step, it is not part of the
# objective.                                                                                                     (D14)
WEIGHT_FLOOR = 1e-5
WEIGHTS = {
    "1-t": lambda t, l1: 1 - t,
    "(1-t)^2": lambda t, l1: (1 - t) ** 2,
    "inv-l1": lambda t, l1: 1 / l1.clamp_min(WEIGHT_FLOOR),
    "(1-t)/t": lambda t, l1: 1 / (t / (1 - t)).clamp_min(WEIGHT_FLOOR),
    "((1-t)/t)^2": lambda t, l1: 1 / ((t / (1 - t)) ** 2).clamp_min(WEIGHT_FLOOR),
    "1/t": lambda t, l1: 1 / t.clamp_min(WEIGHT_FLOOR),
    "1/t^2": lambda t, l1: 1 / (t**2).clamp_min(WEIGHT_FLOOR),
}


def sid_weight(name, t, x_g, x0_teacher):
    """Per-sample weight w (B,), computed without gradient."""
    if name not in WEIGHTS:
        raise ValueError(f"unknown weighting {name!r}; choose from {', '.join(WEIGHTS)}")
    l1 = (x_g - x0_teacher).detach().abs().flatten(1).mean(1)  # (B,)
    return WEIGHTS[name](t.detach(), l1)


# Classifier-free guidance inside the losses (D18): a call with scale kappa evaluates v_u + kappa (v_c - v_u) (the
# empty prompt's velocity v_u, the prompt's v_c); kappa = 1 is v_c alone, kappa = 0 v_u alone (Zero-CFG), kappa < 0
# pushes away from the prompt (Anti-CFG). Outside the guidance interval [guidance_t_min, guidance_t_max] of noise
# levels every call uses kappa = 1.


def guidance_scale(kappa, t, t_min=0.0, t_max=1.0, features=False):
    """The CFG scale of one network call at times t (B,): `kappa` inside the guidance interval, 1 outside (D18). A
    float when it is one scale for the batch (no interval, or kappa = 1), else a per-sample (B,) tensor. `features`:
    the call's hidden states also feed the discriminator (D17), which reads the prompt's branch, as the official code
    does -- so a batch-wide kappa = 0 then runs both branches (a tensor) rather than the empty prompt's alone."""
    if (kappa == 1 or (t_min <= 0.0 and t_max >= 1.0)) and not (features and kappa == 0):
        return float(kappa)
    inside = (t >= t_min) & (t <= t_max)
    return torch.where(inside, torch.full_like(t, float(kappa)), torch.ones_like(t)).detach()  # (B,)


# --- 3. Losses: pure functions of tensors, each returning a per-sample (B,) tensor --------------------------------


def _sum_pixels(x):  # (B, *D) -> (B,)
    return x.flatten(1).sum(1)


def flow_matching_loss(v_pred, x0, eps, t, path=FLOW):
    """|v_pred - (a' x0 + s' eps)|^2 summed over pixels: trains the teacher on data and the fake network on
    generator samples (then x0 = x_g, detached by the caller). Its minimiser is E[v | x_t].                 (D8)"""
    return _sum_pixels((v_pred - velocity_target(x0, eps, t, path)) ** 2)  # (B,)


def sid_generator_loss(x_g, x0_teacher, x0_fake, alpha, weight):
    """The SiD generator loss, per sample (B,):                                                            (D13)
        w(t) < x0_teacher - x0_fake , (x0_teacher - x_g) - alpha (x0_teacher - x0_fake) >
      = w [ (1 - alpha) |x0_teacher - x0_fake|^2 + < x0_teacher - x0_fake , x0_fake - x_g > ].
    A surrogate: its value can be negative, only its gradient means something. The caller keeps every path
    differentiable -- x_g directly, and x_t = (1-t) x_g + t eps into BOTH networks' inputs -- and steps only the
    generator's weights. `weight` (B,) must carry no gradient."""
    gap = x0_teacher - x0_fake  # (B, *D)  teacher-minus-fake posterior means: the score difference in x0 units
    return weight * _sum_pixels(gap * ((x0_teacher - x_g) - alpha * gap))  # (B,)


def dmd_generator_loss(x_g, x0_teacher, x0_fake, weight):
    """DMD for contrast: the gradient w (x0_fake - x0_teacher) is applied to x_g alone, no gradient through
    the networks' inputs. Written 0.5 |x_g - sg(x_g - grad)|^2 so d loss / d x_g = grad.                    (D16)"""
    grad = _per_sample(weight, x_g) * (x0_fake - x0_teacher).detach()  # (B, *D) stop-gradient: a fixed direction
    return 0.5 * _sum_pixels((x_g - (x_g - grad).detach()) ** 2)  # (B,)


def _bce(logits, target):  # BCE of C logits per sample (B, C) against 1 (real) or 0 (fake), clamped: (B,)
    return F.binary_cross_entropy_with_logits(
        logits.clamp(-10, 10), torch.full_like(logits, float(target)), reduction="none"
    ).mean(1)


def discriminator_loss(logits_real, logits_fake, dims):
    """Data-aided: the fake network's pooled features (B, C) are C logits per sample; real -> 1, fake -> 0. The mean
    of the two BCEs is scaled by dims = C*H*W, the number of terms the flow-matching loss it joins sums over: the
    official balance.                                                                                          (D17)"""
    return (_bce(logits_real, 1) + _bce(logits_fake, 0)) / 2 * dims  # (B,)


def gan_generator_loss(logits_fake, weight, dims):
    """The generator's adversarial term w(t) BCE(D(x_t of x_g) -> real) dims, (B,), dims = C*H*W as above. Its gradient
    reaches x_g through the fake network's input, as SiD's does.                                               (D17)"""
    return weight * _bce(logits_fake, 1) * dims  # (B,)


# --- 4. The few-step generator (D15) -------------------------------------------------------------------------------


def generator_times(K):
    """t_k = 1 - (k - 1)/K for steps k = 1..K: (1, .75, .5, .25) for K = 4, (1,) for K = 1."""
    return [1.0 - k / K for k in range(K)]


def generator_rollout(velocity_fn, noises, k, mode):
    """Run the first k-1 of the generator's K steps WITHOUT gradient and return the input of step k: (x_t (B, *D),
    t (B,)). `velocity_fn(x_t, t) -> v`; noises (B, K, *D): the initial noise z = noises[:, 0], then one draw per
    later step. Step j's input re-noises the previous step's output x0 to t_j: x_t = (1 - t_j) x0 + t_j n, with n
    'fresh': that step's draw (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)), 'fixed': z again, or
    'ddim': the noise the previous input implies, E[eps | x_t] (D4) (stochastic_sampling=False: a plain Euler step).
    Backward simulation: earlier outputs are detached, so only step k will carry gradient into the generator."""
    times = generator_times(noises.shape[1])
    z = noises[:, 0]  # (B, *D) the initial noise: step 1's input
    x_t = z
    t = torch.full((len(z),), times[0], device=z.device, dtype=z.dtype)  # (B,)
    with torch.no_grad():  # stop-gradient: steps 1..k-1 are simulation, not training signal
        for j in range(1, k):
            v = velocity_fn(x_t, t)  # (B, *D)
            n = {"fresh": noises[:, j], "fixed": z, "ddim": velocity_to_eps(x_t, t, v)}[mode]
            x0 = velocity_to_x0(x_t, t, v)  # (B, *D) step j's output
            t = torch.full_like(t, times[j])
            x_t = add_noise(x0, n, t)  # (B, *D)
    return x_t, t


def generator_step(velocity_fn, x_t, t):
    """One generator step, x0 = x_t - t G(x_t, t) (D4): the sample x_g of the step being trained."""
    return velocity_to_x0(x_t, t, velocity_fn(x_t, t))  # (B, *D)


def generate(velocity_fn, noises, mode="fresh"):
    """The generator's K-step sample from noises (B, K, *D) (see generator_rollout), no gradient: (B, *D)."""
    x_t, t = generator_rollout(velocity_fn, noises, noises.shape[1], mode)
    with torch.no_grad():
        return generator_step(velocity_fn, x_t, t)


# --- 5. The teacher interface: every family quirk lives behind it (D8) ----------------------------------------------


class UserError(Exception):
    """Bad input from the user: main() prints the message on one line and exits with status 2."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C stopped the run after checkpointing its current iteration: main() says so in one line."""


def velocity_and_features(velocity_fn, net, x_t, t, cond, guidance):
    """One velocity call, velocity_fn(net, ...) (B, *D) (a Backbone's velocity or prompt_velocity), and the hidden
    states that this call -- and no other -- fed to the network's output projection (`head` of the toy MLP, `proj_out`
    of every diffusers DiT: its last hidden states, (B, C), (B, N, C), or 2B rows when CFG ran two branches). The
    features of data-aided SiD (D17) and of the quality number. Read from this call alone, not from a list of every
    call of a hooked layer: in LoRA mode the generator, the fake network and the teacher are views of ONE base, and
    share its output projection."""
    head = net.head if hasattr(net, "head") else net.proj_out
    seen = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        v = velocity_fn(net, x_t, t, cond, guidance)
    finally:
        handle.remove()
    assert len(seen) == 1, f"one velocity call ran the output projection {len(seen)} times"
    return v, seen[0]


def pooled_logits(hidden, B):
    """Discriminator logits (B, C) from one call's hidden states: the last B rows (the prompt's branch when CFG
    doubled the batch), mean-pooled over tokens when there are tokens ((B, N, C) -> (B, C))."""
    h = hidden[-B:]
    return (h.mean(1) if h.dim() == 3 else h).float()


class Backbone:
    """The loop sees a Backbone and three plain nn.Modules (teacher, fake, generator), never the model family. The toy
    (network: run_toy.py) is one; SANA, SD3, FLUX are Part II's. It sets teacher, device, sample_shape D; supplies
        velocity(net, x_t, t, cond, guidance) -> v (B, *D)   CFG, timestep scale and latent packing inside
        sample_batch(n, rng) -> {name: (n, ...) tensor}       what a batch draws besides noise: prompts, real data
        condition(draws) -> (cond, x0_real, cond_real)        a micro-batch's conditioning and real data (or None)
    and inherits prompt_velocity(), the prompt's branch alone, students(), the trainable copies, and noise() /
    noises(), the N(0, I) draws. `real`: the data of data-aided SiD (D17), or None."""

    uncond = None  # the empty prompt's conditioning (CFG's unconditional branch)
    prompts = ()  # the prompts (none: an unconditional teacher)
    real = None  # the real data of data-aided SiD
    student_guidance = 1.0  # the guidance the generator is called with: none (FLUX: an embedded scale)

    def prompt_velocity(self, net, x_t, t, cond, guidance):
        """The prompt's branch alone, no two-branch CFG (data-aided SiD's real samples, D17): v_c, the velocity at
        scale 1 -- a guidance-distilled teacher (FLUX.1-dev) overrides it to take kappa as its embedded guidance."""
        return self.velocity(net, x_t, t, cond, 1.0)

    def trainable_copy(self, dtype):  # (no cast that changes nothing: diffusers would warn)
        net = copy.deepcopy(self.teacher)
        return (net if next(net.parameters()).dtype == dtype else net.to(dtype)).requires_grad_(True).train()

    def students(self, config, runtime):
        """(generator, fake, ema), all starting as the teacher (D15): full copies on one process, trainable weights in
        float32 (bf16 with --precision bf16); ema None when --ema-decay is 0. Part II adds LoRA and FSDP2 sharding."""
        if config.mode != "full" or runtime.world > 1:
            raise UserError("the toy MLP trains in full mode on one process (LoRA and FSDP2 need a diffusers teacher)")
        generator = self.trainable_copy(trainable_dtype(config))
        fake = self.trainable_copy(trainable_dtype(config))
        return generator, fake, copy.deepcopy(generator).requires_grad_(False).eval() if config.ema_decay else None

    def noise(self, shape, rng):
        """N(0, I) in the sample layout (B, *D), drawn from `rng` as the stock pipeline draws its initial noise."""
        return torch.randn(shape, generator=rng, device=self.device)

    def step_noise(self, shape, rng):
        """The re-noising draw between generator steps, in the layout the stock scheduler draws it (B, *D)."""
        return self.noise(shape, rng)

    def noises(self, n, K, rng):
        """The noises of n K-step generator samples, drawn in the stock pipeline's order: (n, K, *D) (D15)."""
        shape = (n, *self.sample_shape)
        return torch.stack([self.noise(shape, rng)] + [self.step_noise(shape, rng) for _ in range(K - 1)], 1)


class ToyBackbone(Backbone):
    """The 2-D teacher: unconditional, no CFG, no latents. `real(n, rng)`, when given, draws true data (D17)."""

    def __init__(self, teacher, real=None):
        self.teacher = teacher.requires_grad_(False).eval()  # frozen for the whole run
        self.device = teacher.head.weight.device
        self.sample_shape = (teacher.config["dim"],)
        self.real = real

    def velocity(self, net, x_t, t, cond, guidance):
        return net(x_t, t)  # (B, 2)

    def sample_batch(self, n, rng):
        return {"x0_real": self.real(n, rng)} if self.real else {}

    def condition(self, draws):
        return None, draws.get("x0_real"), None


# --- 6. One SiD iteration: a fake-network update, then a generator update, each on fresh draws (D9)-(D17) ----------
# What the two updates share -- the run's config, the Backbone, the networks and optimizers, the rng, the Runtime --
# is one small object, as minRF's RF holds its model. Every draw is made for the GLOBAL batch (batch_size x grad_accum
# x processes) from the one rng that all processes share, then split into this process's micro-batches: processes and
# micro-batches see different samples, and one process with the same global batch computes the same update.

SID_LOSS_SCALE = 100  # the official generator loss is 100 x (D13) (loss_scaling_G): Adam only notices it through eps
MAX_NONFINITE = 3  # a run stops after 3 iterations in a row with a non-finite loss
LOG_EVERY = 10  # a line of OUT/log.jsonl every 10 iterations
GAN_FREEZE_IMAGES = 20_000  # data-aided (D17): the generator waits until more images than this have been generated,
GAN_START_IMAGES = 40_000  # and the adversarial term joins once more than this have been
GAN_WEIGHT = 0.5  # data-aided (D17): the adversarial term's share of the generator loss from then on (official)


def trainable_dtype(config):
    """The generator's and fake network's weights: float32 masters, or bf16 with --precision bf16 (pure bf16)."""
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def autocast(config, device):
    """bf16 autocast (--precision bf16-autocast, bf16), on the CPU as on CUDA: the CPU tests run the GPU's path."""
    return (
        contextlib.nullcontext() if config.precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)
    )


def make_optimizers(config, generator, fake):
    """{'generator': Adam, 'fake': Adam}, betas (0, 0.999) as the official code (no momentum); eps 1e-4 in pure
    bf16 (--precision bf16), as the official SD3 and FLUX scripts."""
    # foreach=False: the default multi-tensor step allocates temporaries the size of every gradient at once (on a
    # GPU, tens of GB for a full DiT copy: the peak of a checkpointed run); one tensor at a time costs ~nothing
    adam = dict(betas=(0.0, 0.999), eps=1e-4 if config.precision == "bf16" else 1e-8, foreach=False)
    trainable = {"generator": (generator, config.lr_gen), "fake": (fake, config.lr_fake)}
    return {
        name: torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr, **adam)
        for name, (net, lr) in trainable.items()
    }


@torch.no_grad()
def ema_update(ema, net, decay, warmup, step):
    """EMA with warm-up: the effective decay min(decay, (1 + step) / (warmup + step)) lets the average follow the fast
    early moves away from the teacher and average only once training settles. While the warm-up binds, the average
    spans about the last step / (warmup - 1) iterations: a tenth of the run so far for warmup 10, a quarter for the
    toy's 5."""
    decay = min(decay, (1 + step) / (warmup + step))
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


class SiD:
    """The state of a distillation and its one iteration. iteration(step) -> diagnostics runs config.fake_updates
    fake_update()s, then one generator_update(), each on its own draws (micro_batches()) and with its own backward.
    The networks and optimizers start as students() makes them: the teacher's copies."""

    def __init__(self, config, backbone, runtime):
        self.config = config
        self.backbone = backbone
        self.runtime = runtime
        torch.manual_seed(config.seed)  # identical initial weights on every rank (FSDP2 broadcasts nothing)
        self.generator, self.fake, self.ema = backbone.students(config, runtime)
        self.optimizers = make_optimizers(config, self.generator, self.fake)  # {"generator": Adam, "fake": Adam}
        # the only source of randomness, the same on every rank; the global RNGs are never drawn from, so this state is
        # all a checkpoint needs to resume exactly
        self.rng = torch.Generator(runtime.device or backbone.device).manual_seed(config.seed)

    def student(self, cond):
        """The generator's velocity function (x_t, t) -> v given the prompts' conditioning: no two-branch CFG (FLUX:
        its embedded guidance)."""

        def velocity(x_t, t):
            return self.backbone.velocity(self.generator, x_t, t, cond, self.backbone.student_guidance)

        return velocity

    def micro_batches(self):
        """Fresh draws for one update, this process's micro-batches of them: dicts of (B, ...) tensors -- noises
        (B, K, *D), t (B,), eps (B, *D), what backbone.sample_batch draws -- and 'cond', 'x0_real', 'cond_real'."""
        config = self.config
        backbone = self.backbone
        n = config.batch_size * config.grad_accum * self.runtime.world  # the global batch
        draws = dict(noises=backbone.noises(n, config.steps, self.rng))  # (n, K, *D)
        draws["t"] = sample_t(n, self.rng)  # (n,)
        draws["eps"] = backbone.noise((n, *backbone.sample_shape), self.rng)  # (n, *D)
        draws.update(backbone.sample_batch(n, self.rng))  # prompts, real data
        for j in range(config.grad_accum):
            rows = {name: v[self.runtime.rows(config.batch_size, j)] for name, v in draws.items()}
            rows["cond"], rows["x0_real"], rows["cond_real"] = backbone.condition(rows)
            yield rows

    def fake_loss(self, draws, k):
        """Flow matching of the fake network on the generator's samples x_g, detached (D9); with real data it is also
        the discriminator (D17): BCE on its pooled features of real and generated samples, noised alike -- each read
        from the one call that makes it. Returns (loss, diagnostics)."""
        config, backbone = self.config, self.backbone
        t, eps, cond = draws["t"], draws["eps"], draws["cond"]
        data_aided = draws["x0_real"] is not None
        student = self.student(cond)
        with autocast(config, backbone.device):
            with torch.no_grad():  # stop-gradient: the fake network fits the generator's samples, it must not move G
                x_g = generator_step(student, *generator_rollout(student, draws["noises"], k, config.noise)).float()
            kappa = guidance_scale(
                config.guidance_train_fake, t, config.guidance_t_min, config.guidance_t_max, data_aided
            )
            x_t = add_noise(x_g, eps, t)  # (B, *D)
            v, hidden_fake = velocity_and_features(backbone.velocity, self.fake, x_t, t, cond, kappa)  # (D18)
            loss = flow_matching_loss(v.float(), x_g, eps, t).mean()  # (B, *D) -> ()
            stats = dict(loss_fake=loss.item())
            if data_aided:  # real samples with their own captions, through the prompt's branch alone (at the
                # same scale kappa, which only a guidance-distilled teacher sees: FLUX.1-dev, as its embedded guidance)
                x_t_real = add_noise(draws["x0_real"], eps, t)  # (B, *D) the same eps and t as the fakes
                velocity = backbone.prompt_velocity
                _, hidden_real = velocity_and_features(velocity, self.fake, x_t_real, t, draws["cond_real"], kappa)
                logits_fake = pooled_logits(hidden_fake, len(t))  # (B, C), with the fake network's gradient
                logits_real = pooled_logits(hidden_real, len(t))
                loss_d = discriminator_loss(logits_real, logits_fake, x_g[0].numel()).mean()
                stats["loss_d"] = loss_d.item()
                loss = loss + loss_d
        return loss, stats

    def generator_loss(self, draws, k, gan_weight):
        """SiD's generator loss (D13) through step k, DMD's (D16) for contrast; data-aided, the adversarial term joins
        with weight gan_weight (D17). Returns (loss, x_g -- where its gradient is routed, see generator_update --,
        diagnostics)."""
        config, backbone = self.config, self.backbone
        t, eps, cond = draws["t"], draws["eps"], draws["cond"]
        kappa_real = guidance_scale(config.guidance_eval_real, t, config.guidance_t_min, config.guidance_t_max)
        kappa_fake = guidance_scale(
            config.guidance_eval_fake, t, config.guidance_t_min, config.guidance_t_max, gan_weight > 0
        )  # (D18)
        student = self.student(cond)
        with autocast(config, backbone.device):
            x_g = generator_step(student, *generator_rollout(student, draws["noises"], k, config.noise)).float()
            x_t = add_noise(x_g, eps, t)  # (B, *D) differentiable in x_g: SiD's gradient also flows through here
            # DMD: no gradient through the networks' inputs (D16)
            critic = torch.no_grad() if config.loss == "dmd" else contextlib.nullcontext()
            with critic:
                v_teacher = backbone.velocity(backbone.teacher, x_t, t, cond, kappa_real)
                v_fake, hidden_fake = velocity_and_features(backbone.velocity, self.fake, x_t, t, cond, kappa_fake)
                x0_teacher = velocity_to_x0(x_t, t, v_teacher.float())  # (B, *D)
                x0_fake = velocity_to_x0(x_t, t, v_fake.float())  # (B, *D)
        weight = sid_weight(config.weighting, t, x_g, x0_teacher)  # (B,) no gradient
        if config.loss == "sid":
            loss = sid_generator_loss(x_g, x0_teacher, x0_fake, config.alpha, weight).mean()
        else:
            loss = dmd_generator_loss(x_g, x0_teacher, x0_fake, weight).mean()
        # the diagnostic that means something: how far the fake network's posterior mean is from the teacher's
        score_gap = _sum_pixels((x0_teacher - x0_fake).detach() ** 2).mean()
        stats = dict(score_gap=score_gap.item(), loss_gen=loss.item())
        loss = SID_LOSS_SCALE * loss
        if gan_weight:  # the fake network's features of the generator's x_t, from its call just made
            logits = pooled_logits(hidden_fake, len(t))  # (B, C)
            loss_gan = gan_generator_loss(logits, weight, x_g[0].numel()).mean()
            stats["loss_gan"] = loss_gan.item()
            loss = (1 - gan_weight) * loss + gan_weight * loss_gan
        return loss, x_g, stats

    def fake_update(self, k):
        """One optimizer step of the fake network on fresh draws: every micro-batch's loss backpropagated with weight
        1/N (N = grad_accum: N micro-batches of B give the gradient of one batch of N B), gradients averaged over
        processes, one step. Returns (diagnostics averaged over micro-batches, whether every loss was finite: if
        not, the step is skipped)."""
        N = self.config.grad_accum
        self.optimizers["fake"].zero_grad(set_to_none=True)
        stats = {}
        for draws in self.micro_batches():
            loss, micro_stats = self.fake_loss(draws, k)
            add_share(stats, micro_stats, N)
            if self.runtime.any_rank(not torch.isfinite(loss).item()):  # (every rank skips: a backward is collective)
                return stats, False
            # the fake network's weights are the only trainable tensors in this graph (x_g: no_grad; teacher: frozen)
            (loss / N).backward()
        self.step("fake")
        return stats, True

    def generator_update(self, k, gan_weight):
        """One optimizer step of the generator on fresh draws, as fake_update, with SiD's two-stage backward."""
        N = self.config.grad_accum
        self.optimizers["generator"].zero_grad(set_to_none=True)
        stats = {}
        for draws in self.micro_batches():
            loss, x_g, micro_stats = self.generator_loss(draws, k, gan_weight)
            add_share(stats, micro_stats, N)
            if self.runtime.any_rank(not torch.isfinite(loss).item()):
                return stats, False
            # The generator's gradient, routed in two stages. (1) d loss / d x_g: through x_g itself and through x_t
            # into BOTH networks' inputs; autograd.grad accumulates into no weight, so neither the fake network nor
            # the teacher gets a gradient from this loss. (2) That gradient pushed back through the generator's step
            # alone. (Both are plain backward passes of the graph as built, which is what FSDP2's sharded weights
            # need: section 11.) This is the pathwise gradient (D12) of the Fisher divergence (D10): both networks as
            # fixed functions, their inputs differentiable.
            (grad_x_g,) = torch.autograd.grad(loss / N, x_g)  # (B, *D)
            x_g.backward(grad_x_g)
        self.step("generator")
        return stats, True

    def step(self, name):  # network `name`'s gradients averaged over the processes (one: nothing to do), one step
        self.runtime.average_grads(getattr(self, name))
        self.optimizers[name].step()

    def iteration(self, step):
        """Iteration `step` (derivation.md, section 4): the learning rates, config.fake_updates fake-network
        updates, then one generator update, each on fresh draws, then the EMA. Returns the diagnostics; an update
        whose loss was not finite skipped its optimizer step and is named under 'nonfinite' (the loop decides when
        to stop)."""
        config = self.config
        images_seen = step * config.batch_size * config.grad_accum * self.runtime.world
        # the learning rates: constant (official) or a cosine from 1 to 0 over the run
        scale = 1.0
        if config.lr_schedule == "cosine":
            scale = 0.5 * (1 + math.cos(math.pi * step / config.iters))
        for optimizer in self.optimizers.values():
            optimizer.param_groups[0]["lr"] = optimizer.defaults["lr"] * scale
        # the trained step k, the same for both updates: uniform in {1..K} (the paper's mixture) or always K (D15)
        k = config.steps
        if config.train_step == "uniform":
            k = int(torch.randint(1, config.steps + 1, (1,), generator=self.rng, device=self.rng.device))
        metrics = dict(k=k, nonfinite=[])
        for _ in range(config.fake_updates):
            stats, finite = self.fake_update(k)
            metrics.update(stats)
            if not finite:
                metrics["nonfinite"].append("fake")
        # data-aided (D17), counted in images seen as officially: the generator waits, then the GAN term joins
        data_aided = self.backbone.real is not None
        if not data_aided or images_seen > GAN_FREEZE_IMAGES:
            gan_weight = GAN_WEIGHT if data_aided and images_seen > GAN_START_IMAGES else 0.0
            stats, finite = self.generator_update(k, gan_weight)
            metrics.update(stats)
            if not finite:
                metrics["nonfinite"].append("generator")
        if self.ema is not None:
            ema_update(self.ema, self.generator, config.ema_decay, config.ema_warmup, step + 1)
        return metrics


def add_share(totals, stats, N):  # totals += stats / N, key by key: the mean of N micro-batches' diagnostics
    for key, value in stats.items():
        totals[key] = totals.get(key, 0.0) + value / N


# --- 7. The loop: distill(), with the runtime's one-process defaults --------------------------------------------


class Runtime:
    """Where the ranks and the checkpoints live, so that the method never sees them. This one: one process (rank 0 of
    1), the run in memory (nothing resumed, nothing saved), all the toy needs. Part II's Checkpoints writes config.out
    and resumes from it; Distributed runs under torchrun."""

    rank = 0
    world = 1

    def __init__(self, device=None):
        self.device = device

    def rows(self, B, j):  # this rank's rows of micro-batch j in a draw made for the global batch: (j, rank, B)
        i = j * self.world + self.rank
        return slice(i * B, (i + 1) * B)

    def any_rank(self, value):  # under torchrun: true on some rank, so that all ranks skip or stop alike
        return value

    def average_grads(self, net):  # after a backward, make net's gradients the global batch's (here they are)
        pass

    def resume(self, config, sid):  # -> (step, skipped) of the checkpoint it restored sid from
        return 0, 0

    def save(self, config, sid, step, skipped):  # a checkpoint of iteration `step`
        pass


def log(config, bar, metrics):
    """The progress bar's numbers, and a line of OUT/log.jsonl."""
    shown = ("loss_fake", "score_gap", "loss_gen", "loss_d")
    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics})
    if config.out:
        with open(os.path.join(config.out, "log.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in metrics.items() if k != "nonfinite" and v is not None}) + "\n")


@contextlib.contextmanager
def stop_requests():
    """Inside the block, SIGTERM (a preempted job) and Ctrl-C are recorded in the yielded list instead of stopping
    the process, so that the loop can finish its iteration and checkpoint it."""
    stop = []
    handlers = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def distill(config, backbone, on_eval=None, runtime=None):
    """Distil `backbone.teacher` into a K-step generator, resuming from config.out's checkpoint when there is one.
    `on_eval(step, generator, ema)` is called (on every rank) every config.eval_every iterations and at the end (ema:
    None without one). `runtime`: Runtime() (one process, in memory) unless given -- Checkpoints() to write and
    resume config.out. Returns dict(generator=, ema=, fake=, step=, skipped=, sid=)."""
    sid = SiD(config, backbone, runtime or Runtime())
    step, skipped = sid.runtime.resume(config, sid)  # 0, 0 for a new run
    rank = sid.runtime.rank
    in_a_row = 0  # iterations in a row with a non-finite loss
    t0 = time.time()
    bar = tqdm(
        total=config.iters,
        initial=step,
        desc=config.loss.upper(),
        dynamic_ncols=True,
        disable=True if rank or step >= config.iters else None,
    )  # None: a bar only on a terminal
    with bar, stop_requests() as stop:
        while step < config.iters:
            metrics = sid.iteration(step)
            step += 1
            if metrics["nonfinite"]:
                skipped += 1
                in_a_row += 1
            else:
                in_a_row = 0
            if in_a_row >= MAX_NONFINITE:
                phases = " and ".join(metrics["nonfinite"])
                raise FloatingPointError(
                    f"non-finite {phases} loss at iteration {step} ({in_a_row} in a row, {skipped} skipped); the "
                    "last good checkpoint is kept"
                )
            if on_eval and config.eval_every and (step % config.eval_every == 0 or step == config.iters):
                metrics["eval"] = on_eval(step, sid.generator, sid.ema)  # e.g. a quality number, logged
            if rank == 0 and (step % LOG_EVERY == 0 or step == config.iters or "eval" in metrics):
                log(config, bar, dict(step=step, time=round(time.time() - t0, 3), skipped=skipped, **metrics))
            stopping = sid.runtime.any_rank(bool(stop)) and step < config.iters  # SIGTERM or Ctrl-C on some rank
            if stopping or (config.save_every and step % config.save_every == 0 and step < config.iters):
                sid.runtime.save(config, sid, step, skipped)
            bar.update(1)
            if stopping:
                where = f"; {config.out} holds it: run the same command to continue" if config.out else ""
                raise Interrupted(f"stopped at iteration {step} of {config.iters}{where}")
    sid.runtime.save(config, sid, step, skipped)
    return dict(generator=sid.generator, ema=sid.ema, fake=sid.fake, step=step, skipped=skipped, sid=sid)


# ============================= PART II -- THE MACHINERY THAT SCALES IT (a first reading may stop here) =============

import argparse
import inspect
import re
import shutil
import socket
import statistics
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

HERE = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def expected(warning):
    """Inside the block, a warning whose message matches `warning` (a regex) says what is meant and is not shown; the
    process's warning filters are left as they were."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=warning)
        yield


ONE_PROCESS = "torch.distributed is disabled"  # torch.distributed.checkpoint noting that one process saves alone


# --- 8. Runs on disk: checkpoints, resume ---------------------------------------------------------------------


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a corrupt `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def changeable_on_resume(config):  # the fields a resumed run may change: --iters too, unless a cosine spans it
    return ("out", "save_every", "eval_every", "device") + (("iters",) if config.lr_schedule == "constant" else ())


def checkpoint_path(out):  # a run's checkpoint: a torch.distributed.checkpoint folder, with its meta.pt
    return os.path.join(out, "checkpoint")


def read_meta(path):  # a checkpoint's step, rng, skipped count and config (no weight is read)
    return torch.load(os.path.join(path, "meta.pt"), weights_only=False)


def saved_state(sid):
    """What a checkpoint holds: {name: {"model": state dict, "optim": state dict}} of every network and optimizer --
    their tensors themselves (under FSDP2, this process's shards): torch.distributed.checkpoint saves them, or loads
    into them in place."""
    state = {
        name: dict(model=getattr(sid, name).state_dict(), optim=opt.state_dict())
        for name, opt in sid.optimizers.items()
    }
    if sid.ema is not None:
        state["ema"] = dict(model=sid.ema.state_dict())
    return state


class Checkpoints(Runtime):
    """Part I's Runtime, with the run kept in config.out: OUT/checkpoint, one torch.distributed.checkpoint folder for
    one process or several (each writes its own shards), holding every network, optimizer and the rng, written beside
    and renamed into place: a resume is exact, and a crash mid-write never leaves half a checkpoint."""

    def barrier(self):  # (under torchrun: every process waits here for the others)
        pass

    def save(self, config, sid, step, skipped):
        if not config.out:
            return
        path = checkpoint_path(config.out)
        if self.rank == 0:
            remove_path(f"{path}.tmp")
        self.barrier()
        with expected(ONE_PROCESS):
            dcp.save(saved_state(sid), checkpoint_id=f"{path}.tmp")
        if self.rank == 0:
            meta = dict(rng=sid.rng.get_state(), step=step, skipped=skipped, config=dataclasses.asdict(config))
            torch.save(meta, os.path.join(f"{path}.tmp", "meta.pt"))
            replace_path(f"{path}.tmp", path)
        self.barrier()

    def resume(self, config, sid):
        """Restore the networks, optimizers and rng from config.out's checkpoint if there is one: (step, skipped)."""
        if not config.out:
            return 0, 0
        os.makedirs(config.out, exist_ok=True)
        path = checkpoint_path(config.out)
        if not os.path.exists(path) and os.path.exists(f"{path}.old"):  # stopped between replace_path's two renames
            os.replace(f"{path}.old", path)
        if not os.path.exists(path):
            return 0, 0
        meta = read_meta(path)
        changed = [
            k for k, v in meta["config"].items() if k not in changeable_on_resume(config) and getattr(config, k) != v
        ]
        if changed:
            was = ", ".join(f"{k}: {meta['config'][k]} -> {getattr(config, k)}" for k in changed)
            raise UserError(
                f"{path} was written with a different config ({was}); use another --out or the same settings"
            )
        if meta["step"] > config.iters:
            raise UserError(f"{path} is at iteration {meta['step']}, beyond --iters {config.iters}; use another --out")
        for optimizer in sid.optimizers.values():  # Adam makes its state on its first step: one at learning rate 0,
            for p in optimizer.param_groups[0]["params"]:  # on zero gradients, makes the tensors the load fills
                p.grad = torch.zeros_like(p)
            optimizer.param_groups[0]["lr"] = 0.0  # (iteration() sets the learning rates anew)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state = saved_state(sid)
        # every network weight must be in the checkpoint: a missing one would silently keep the teacher's value.
        # (Only Adam's state may be missing: a weight that never had a gradient has none, and keeps the zeros.)
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata  # {"generator.model.<name>": ...}
        for name, entry in state.items():
            missing = [key for key in entry["model"] if f"{name}.model.{key}" not in saved]
            if missing:
                raise UserError(f"{path} lacks the {name} network's weight {missing[0]}: it cannot resume this run")
        # the networks' and optimizers' own tensors, filled in place (Adam's settings come from the config)
        with expected(ONE_PROCESS):
            dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        sid.rng.set_state(meta["rng"])
        if self.rank == 0:
            print(f"resumed from {path} at iteration {meta['step']}")
            keep_log_until(os.path.join(config.out, "log.jsonl"), meta["step"])
        return meta["step"], meta["skipped"]


def keep_log_until(path, step):
    """Drop the lines of log.jsonl after iteration `step` (their iterations are redone), and a last line torn by a kill
    in mid-write (it has no newline)."""
    with open(path, "a+") as f:
        f.seek(0)
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        f.truncate(0)
        f.writelines(kept)


def remove_path(path):  # a folder (every path this file removes is one), if it is there
    shutil.rmtree(path, ignore_errors=True)


def replace_path(tmp, path):
    """Move a finished file or folder onto `path`: the old one renamed away first, removed last (never half a one)."""
    remove_path(f"{path}.old")
    if os.path.exists(path):
        os.replace(path, f"{path}.old")
    os.replace(tmp, path)
    remove_path(f"{path}.old")


# --- 9. Config: one typed place for every default; presets by name override a few fields -------------------------


def option(default, help, choices=None, const=None):
    """A Config field: its default, the help of its --flag, the values it allows, its value as a bare flag."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, const=const))


@dataclasses.dataclass
class Config:
    teacher: str = option("toy", "the teacher: a preset (listed below), a local diffusers pipeline folder or a hub id")
    loss: str = option("sid", "the generator loss: SiD's (D13), or DMD's for contrast (D16)", ("sid", "dmd"))
    alpha: float = option(1.0, "weight of the fake-score term in SiD's generator loss (D13); original SiD: 1.2")
    weighting: str = option("1-t", "the generator loss's weight w(t) over noise levels (D14)", WEIGHTS)
    steps: int = option(4, "K, the generator's number of steps, at t = 1, 1 - 1/K, ... (D15)")
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
    guidance_train_fake: float = option(1.0, "guidance scale of the fake network in its own update (1: none; D18)")
    guidance_eval_fake: float = option(1.0, "guidance scale of the fake network inside the generator loss (D18)")
    guidance_eval_real: float = option(1.0, "guidance scale of the teacher inside the generator loss (D18)")
    guidance_t_min: float = option(0.0, "the guidance scales apply only for noise levels t >= this (D18)")
    guidance_t_max: float = option(1.0, "the guidance scales apply only for noise levels t <= this (D18)")
    iters: int = option(1000, "generator updates in the run")
    batch_size: int = option(256, "generated samples per micro-batch, per process")
    grad_accum: int = option(
        1, "micro-batches per optimizer step: the global batch is batch-size x processes x this (the paper's is 256)"
    )
    lr_gen: float = option(5e-6, "the generator's Adam learning rate")
    lr_fake: float = option(5e-6, "the fake network's Adam learning rate")
    lr_schedule: str = option("constant", "learning rates constant (official) or cosine to 0", ("constant", "cosine"))
    ema_decay: float = option(
        0.0,
        "decay of a moving average of the generator, the student a run then keeps (0: none, "
        "the generator is the student, as the official code)",
    )
    ema_warmup: int = option(
        10,
        "the EMA's warm-up G: its decay at iteration s is at most (1 + s) / (G + s), an average over about the last "
        "s / (G - 1) iterations",
    )
    seed: int = option(0, "seed of every random draw of the run")
    resolution: int = option(0, "image side in pixels (0: the teacher's native size)")
    prompts: str = option("", "a text file of prompts, one per line (none: a built-in list of 16)")
    data: str = option("", "real images for data-aided SiD (D17): a folder of images, x.png with its caption x.txt")
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
    embedded_guidance_only: bool = option(
        False,
        "FLUX.1-dev: each CFG scale as embedded guidance alone, one branch, "
        "the student at the teacher's scale (official: the embedding and two-branch "
        "CFG, the student at 1)",
    )


# Presets change only what differs from the Config defaults. The DiT presets are the official SiD-DiT settings
# (Adam(0, 0.999), lr 5e-6, CFG 4.5 for all three scales as SANA's runs, bf16 autocast, no EMA, a global batch of 256
# -- here on one GPU: batch per micro-batch x --grad-accum --, about 1 M generated images) but for one change, from the
# guidance study (experiments/README.md): guidance only for t in [0.2, 0.6] (D18). FLUX's scale, 3.5 (its pipeline's),
# is untuned: the official code publishes none. Micro-batch and checkpointed share fill one 80 GB GPU (at most 69 GiB
# by the memory plan): larger teachers train LoRA there, on several GPUs full (FSDP2). The toy and the digits depart
# further, each choice measured in experiments/README.md: the last step trained, a cosine, an EMA, ...
_INTERVAL = dict(guidance_t_min=0.2, guidance_t_max=0.6)
_SMALL = dict(train_step="last", weighting="inv-l1", ema_decay=0.99, save_every=0)  # toy and digits


def _guided(w):  # one CFG scale for all three
    return dict(guidance_train_fake=w, guidance_eval_fake=w, guidance_eval_real=w)


GLOBAL_BATCH = 256  # the paper's, every DiT preset's: micro-batch x --grad-accum on one GPU


def _dit(hub, resolution, batch_size, **kw):  # a DiT preset: hub id, side, micro-batch
    fields = dict(
        _guided(4.5), teacher=hub, resolution=resolution, batch_size=batch_size, grad_accum=GLOBAL_BATCH // batch_size
    )
    return fields | dict(precision="bf16-autocast", iters=4000, save_every=50, eval_every=200, **_INTERVAL) | kw


PRESETS = {
    "toy": dict(_SMALL, teacher="toy", iters=2200, batch_size=1024, lr_gen=1.2e-3, lr_fake=3.6e-3, fake_updates=3)
    | dict(weighting="1/t", noise="fixed", lr_schedule="cosine", ema_decay=0.999, ema_warmup=5, out="out/toy"),
    # experiments/digits.py: a 3-block SANA DiT on 8x8 digits, the class as a one-token caption, guided at CFG 2
    "digits": dict(_SMALL, **_guided(2.0), **_INTERVAL, teacher="digits", iters=300, batch_size=128, lr_gen=1e-4)
    | dict(lr_fake=3e-4, out="out/digits"),
    "sana-0.6b-512": _dit("Efficient-Large-Model/Sana_600M_512px_diffusers", 512, 32, grad_checkpointing=0.75),
    "sana-1.6b-1024": _dit("Efficient-Large-Model/Sana_1600M_1024px_diffusers", 1024, 4, grad_checkpointing=1.0),
    "sd3-medium": _dit(
        "stabilityai/stable-diffusion-3-medium-diffusers", 1024, 4, mode="lora", grad_checkpointing=0.2
    ),
    "sd3.5-medium": _dit("stabilityai/stable-diffusion-3.5-medium", 1024, 4, mode="lora", grad_checkpointing=0.2),
    "sd3.5-large": _dit("stabilityai/stable-diffusion-3.5-large", 1024, 4, mode="lora", grad_checkpointing=0.85),
    "flux-dev": _dit("black-forest-labs/FLUX.1-dev", 1024, 2, **_guided(3.5), mode="lora", grad_checkpointing=1.0),
}
# the image teachers': those whose teacher is a hub id
HUB_IDS = {name: preset["teacher"] for name, preset in PRESETS.items() if "/" in preset["teacher"]}


def flag(name):  # a Config field's command-line flag
    return "--" + name.replace("_", "-")


def check_config(config):  # fail loudly, with one line, on values the algorithm cannot use
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise UserError(f"{flag(f.name)} {value!r} is not one of: {', '.join(choices)}")
        if f.type is float and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} must be finite, got {value}")
    rules = (
        (
            ("steps", "iters", "batch_size", "grad_accum", "fake_updates", "lora_rank", "ema_warmup"),
            lambda v: v >= 1,
            "be at least 1",
        ),
        (("lr_gen", "lr_fake"), lambda v: v > 0, "be positive"),
        (("resolution", "save_every", "eval_every"), lambda v: v >= 0, "not be negative"),
        (("ema_decay",), lambda v: 0 <= v < 1, "be in [0, 1)"),
        (("grad_checkpointing",), lambda v: 0 <= v <= 1, "be in [0, 1]"),
    )
    for names, ok, rule in rules:
        for name in names:
            if not ok(getattr(config, name)):
                raise UserError(f"{flag(name)} must {rule}, got {getattr(config, name)}")
    if not 0.0 <= config.guidance_t_min < config.guidance_t_max <= 1.0:
        raise UserError(
            "the guidance interval needs 0 <= --guidance-t-min < --guidance-t-max <= 1, "
            f"not {config.guidance_t_min} and {config.guidance_t_max}"
        )
    return config


def make_config(preset=None, **overrides):  # Config defaults <- preset <- overrides (None ignored), then checked
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    return check_config(Config(**PRESETS.get(preset, {}) | {k: v for k, v in overrides.items() if v is not None}))


def add_config_flags(parser, skip, presets):
    """A --flag per Config field (default None: the preset fills it), its help the defaults of presets {label: name}"""
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        values = {label: PRESETS.get(name, {}).get(f.name, f.default) for label, name in presets.items()}
        common = statistics.mode(values.values())  # the value most presets share (the first, if tied)
        rest = "; ".join(f"{label}: {v}" for label, v in values.items() if v != common)
        help = f"{f.metadata['help']} [default: {common if common != '' else 'none'}{f' ({rest})' if rest else ''}]"
        kw = (
            dict(action=argparse.BooleanOptionalAction)
            if f.type is bool
            else dict(type=f.type, choices=f.metadata["choices"])
        )
        if f.metadata["const"] is not None:
            kw.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(flag(f.name), default=None, help=help, **kw)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2, negative numbers (-1e-4 too) as values, text as written."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):  # the one error path: main's caller prints it, exits 2
        raise UserError(message)


def resolve_device(name):  # 'auto': CUDA if there is one
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this machine has no CUDA device")
    try:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows") from None


def teacher_dtype(config):  # the frozen teacher's (and every pipeline component's) dtype: bf16 unless the run is fp32
    return torch.float32 if config.precision == "fp32" else torch.bfloat16


MAX_RESOLUTION = 4096  # pixels: twice the largest side any supported teacher was trained at


def check_resolution(resolution, factor, patch):  # a whole number of latent patches, at most MAX_RESOLUTION
    if not 0 < resolution <= MAX_RESOLUTION or resolution % (factor * patch):
        raise UserError(
            f"--resolution {resolution}: must be a positive multiple of {factor * patch} for this teacher "
            f"(VAE factor {factor} x patch {patch}), at most {MAX_RESOLUTION}"
        )


# --- 10. LoRA mode: one frozen base transformer, adapters "generator", "fake" and "ema"; the teacher is the base -----
# Two peft pitfalls, handled here once: (1) set_adapter() makes ONLY the active adapter trainable: after each switch
# the requires_grad flags are put back (generator and fake train, ema does not), or a backward pass after a switch
# would silently skip the other adapter; (2) gradient checkpointing recomputes a block in backward, when another
# adapter may be active: the checkpoint function records the forward pass's adapter and replays it on that block's
# LoRA layers.

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of every diffusers DiT family
LORA_ADAPTERS = ("generator", "fake", "ema")  # lora_students' order
LORA_TRAINABLE = ("generator", "fake")


def _tuner_layers(module):  # [(peft LoRA layer, [(lora parameter, trains?)])] in `module`, found once, cached on it
    if not hasattr(module, "_sid_tuner_layers"):
        module._sid_tuner_layers = [
            (m, [(p, n.split(".")[1] in LORA_TRAINABLE) for n, p in m.named_parameters() if n.startswith("lora_")])
            for m in module.modules()
            if isinstance(m, BaseTunerLayer)
        ]
    return module._sid_tuner_layers


def _adapter_state(module):  # the adapter a forward pass of `module` runs with now: its name, or None (adapters off)
    layer = next((layer for layer, _ in _tuner_layers(module)), None)
    return None if layer is None or layer.disable_adapters else layer.active_adapters[0]


def _set_adapter_state(module, name):
    if _adapter_state(module) == name:
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


def recompute_blocks(net, share):
    """Checkpoint a `share` of net's blocks, spread evenly (0.5: every second), replaying the forward's adapter."""
    chosen = {b for i, b in enumerate(blocks(net)) if math.floor((i + 1) * share) > math.floor(i * share)}

    def checkpoint(block, *args):  # diffusers calls it for every block when checkpointing is enabled
        if block not in chosen:
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


class AdapterView(nn.Module):
    """The shared base seen through one adapter (None: the teacher, adapters off). Not a submodule: parameters()
    and state_dict() are the adapter's (the teacher's: the frozen base's): optimizers, EMA, checkpoints hold MBs."""

    def __init__(self, base, adapter):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.adapter = adapter

    # what the families read of a network, the base's: its config, its output projection (the features, D17), and
    # its dtype (the dtype to feed it; the adapters' float32 is not)
    config = property(lambda self: self.base.config)
    proj_out = property(lambda self: self.base.proj_out)
    dtype = property(lambda self: self.base.dtype)

    def named_parameters(self, **kwargs):  # (parameters() passes recurse=)
        for n, p in self.base.named_parameters():
            if (self.adapter is None and "lora_" not in n) or (self.adapter and f".{self.adapter}." in n):
                yield n, p

    def _key(self, name):  # adapter-agnostic names, so generator and ema states are interchangeable
        return name.replace(f".{self.adapter}.", ".")  # (the teacher's, adapter None: unchanged)

    def state_dict(self):
        return {self._key(n): p.detach() for n, p in self.named_parameters()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(state[self._key(n)])

    def forward(self, *args, **kwargs):
        with use_adapter(self.base, self.adapter):
            return self.base(*args, **kwargs)


def lora_students(backbone, rank):
    """(generator, fake, ema) adapter views on the teacher, all starting as it (LoRA B = 0); teacher: adapters off."""
    base = backbone.teacher
    for name in LORA_ADAPTERS:
        with expected("Already found a `peft_config`"):  # (one model, several adapters: as meant)
            base.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name=name)
    views = [AdapterView(base, name) for name in LORA_ADAPTERS]
    for view in views:  # trainable adapter weights in float32 even on a bf16 base (bf16 compute comes from autocast)
        for p in view.parameters():
            p.data = p.data.float()
    views[2].load_state_dict(views[0].state_dict())  # the EMA starts as the generator
    _set_adapter_state(base, None)  # (add_adapter left "ema" active: every layer switched off, what trains set)
    backbone.teacher = AdapterView(base, None)
    return views


# --- 11. torchrun: Part I's Runtime for several processes -- FSDP2 sharding, gradient averaging, a barrier -----------


class Distributed(Checkpoints):
    """Several processes under torchrun. Full mode (`sharded`): FSDP2 shards every network and averages gradients
    in backward; each process writes its own shards of the checkpoint. LoRA mode: replicated adapters, gradients
    all-reduced by hand (DDP expects a backward into the weights after every forward; SiD runs the fake network
    forward alone)."""

    def __init__(self, rank, world, device, sharded):
        super().__init__(device)
        self.rank = rank
        self.world = world
        self.sharded = sharded

    def any_rank(self, value):
        votes = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return bool(votes.item())

    def average_grads(self, net):
        if not self.sharded:  # (FSDP2 averaged them in backward)
            for p in net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)  # the mean over ranks: the gradient of the global batch's mean loss

    def barrier(self):
        dist.barrier()


def setup_runtime(config):  # one process, or torchrun's process group (WORLD_SIZE, RANK, LOCAL_RANK; NCCL or gloo)
    device = resolve_device(config.device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        # cuDNN's fused attention, torch's first choice on Hopper GPUs, returned NaN in the backward pass through
        # FLUX's joint attention on an H200 (torch 2.11) where the flash, memory-efficient and math kernels stayed
        # finite: switched off for the run
        torch.backends.cuda.enable_cudnn_sdp(False)
    if world == 1:
        return Checkpoints(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(int(os.environ["RANK"]), world, device, sharded=config.mode == "full")


def shard(net, mp_policy=None, device_type=None, compiled=False):
    """FSDP2: each block a unit (compiled first with --compile), then the root, on a mesh of the net's device type."""
    mesh = init_device_mesh(device_type or next(net.parameters()).device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in blocks(net):
        if compiled:
            block.compile(**COMPILE)
        fully_shard(block, **kw)
    fully_shard(net, **kw)


# bf16 autocast over sharded float32 masters: FSDP2 all-gathers the weights in bf16, reduces gradients in float32, and
# leaves the inputs as they are given (by default it casts them to bf16: a student would see the timestep 700.3 as
# 700.0 while the teacher sees 700.3, and one process sees 700.3 everywhere)
STUDENTS_BF16 = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)


def sharded_copy(teacher, config, trainable):
    """A copy of the sharded teacher in the students' dtype: made on the meta device, sharded alike, each rank fills
    its own shards."""
    with torch.device("meta"):
        net = type(teacher).from_config(teacher.config).to(trainable_dtype(config))
    device = next(teacher.parameters()).device
    net.requires_grad_(trainable).train(trainable)
    bf16 = STUDENTS_BF16 if config.precision == "bf16-autocast" else None
    shard(net, bf16, device.type, config.compile)  # the module is still on the meta device: the teacher's mesh
    net.to_empty(device=device)
    with torch.no_grad():
        for (n, p), (m, q) in zip(net.named_parameters(), teacher.named_parameters(), strict=True):
            assert n == m, (n, m)  # the same module tree, in the same order
            p.to_local().copy_(q.to_local())  # the same FSDP2 layout: local shard to local shard
        for b, c in zip(net.buffers(), teacher.buffers(), strict=True):
            b.copy_(c)  # buffers are not sharded
    return net


def place_students(backbone, config, runtime):
    """The students of a diffusers teacher, placed: (generator, fake, ema) as LoRA adapters on the teacher itself
    (section 10), or full copies -- under torchrun sharded by FSDP2 --; ema None without one. Then the share
    --grad-checkpointing of every running network's blocks is recomputed in backward, and with --compile each block
    is compiled (in full mode under torchrun, before sharding)."""
    if config.compile:  # one graph per kind of block, batch size and LoRA adapter state
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if config.mode == "lora":
        generator, fake, ema = lora_students(backbone, config.lora_rank)  # (an EMA adapter costs MBs: made anyway)
        students = [generator, fake, ema if config.ema_decay else None]
    elif runtime.world == 1:
        students = Backbone.students(backbone, config, runtime)
    else:  # generator and fake train, the EMA (if any) does not
        shard(backbone.teacher, compiled=config.compile)
        students = [
            sharded_copy(backbone.teacher, config, trainable=True),  # the generator
            sharded_copy(backbone.teacher, config, trainable=True),  # the fake network
            sharded_copy(backbone.teacher, config, trainable=False) if config.ema_decay else None,  # the EMA
        ]
    # the networks that run: LoRA's one base, seen through its adapter states; else teacher, generator and fake
    running = [backbone.teacher.base] if config.mode == "lora" else [backbone.teacher, *students[:2]]
    for net in running:
        recompute_blocks(net, config.grad_checkpointing)
        if config.compile and (config.mode == "lora" or runtime.world == 1):  # (FSDP2's shard() compiled its own)
            for block in blocks(net):
                block.compile(**COMPILE)
    return students


# --- 12. Diffusers teachers: SANA, SD3 / SD3.5, FLUX behind the Backbone interface ---------------------------------

PROMPT_CACHE_BYTES = 8 << 30  # the rule: encode every prompt once and free the text encoders if the cache fits


def read_prompts(path):  # one prompt per line; blank lines dropped, duplicates kept once (first occurrence order)
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    if not prompts:
        raise UserError(f"--prompts {path}: the file has no prompts (one per line)")
    return prompts


DEFAULT_PROMPTS = read_prompts(os.path.join(HERE, "assets", "prompts.txt"))  # when no --prompts file is given


def guidance_branches(kappa, embedded_only=False, per_sample=False):
    """Batches of work of a velocity call at CFG scale kappa: 1 with embedded guidance alone, at kappa = 1 or a
    batch-wide kappa = 0; else 2 (the empty prompt's branch and the prompt's, in one call)."""
    return 1 if embedded_only or kappa == 1 or (kappa == 0 and not per_sample) else 2


FAMILIES = {}  # pipeline class name (model_index.json's _class_name) -> its DiTBackbone subclass, which registers here


def _cat(conds):  # conditioning dicts concatenated along the batch
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expanded(cond, n):  # a conditioning of one row (the empty prompt's) as n rows, no copy; None (the toy's) as None
    return None if cond is None else {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


class DiTBackbone(Backbone):
    """A diffusers pipeline as a Backbone (teacher: pipe.transformer): prompt cache, CFG in one call (D18), decoding. A
    family adds encode(prompts) -> cond, batch-first tensors, and forward(net, x_t, t, cond, guidance) -> v (D2), and
    states its facts below: its pipeline class, and what the memory plan needs (section 15)."""

    pipeline = ""  # the diffusers pipeline class it loads, as model_index.json names it
    embedded_guidance = False  # does the transformer take a guidance scale as an input (FLUX.1-dev)?
    packing = 1  # FLUX packs 2x2 latent patches into tokens before the transformer
    step_noise_from_generator = True  # does the stock pipeline draw its per-step noise from `generator`? (sampling)
    embedded_only = False  # every scale only as embedded guidance (FLUX with --embedded-guidance-only)
    prompt_cache = None  # the prompts' cached conditioning (set_prompts), if it fits
    # The memory plan's facts: text tokens; the VAE's factor; the text encoders' parameters (on the GPU while the
    # prompts are encoded); activations a block saves for backward, in elements per token and channel, when its weights
    # train and when they are frozen (only what the input's gradient needs: the teacher, LoRA's base); a checkpointed
    # block's inputs, alike; a text token's cost in a block, relative to an image token's. Measured with saved-tensor
    # hooks (experiments/bench.py); test_memory_plan_matches_measured_bytes checks them.
    text_tokens = 0
    vae_factor = 8
    text_encoder_params = 0.0
    saved_per_block = (0.0, 0.0)
    recomputed_inputs = (0.0, 0.0)
    text_in_blocks = 1.0

    def __init_subclass__(cls):  # a family is registered by being defined: a subclass naming its pipeline
        super().__init_subclass__()
        if "pipeline" in cls.__dict__:  # (a subclass of a family that keeps its pipeline, e.g. a study's, is not one)
            FAMILIES[cls.pipeline] = cls

    def __init__(self, pipe, config, device):
        c = pipe.transformer.config
        f = pipe.vae_scale_factor
        self.pipe = pipe
        self.device = device
        self.resolution = config.resolution or (c.get("sample_size") or 128) * f
        # every component on the device in the teacher's dtype, the text encoders too (a T5-XXL on a GPU machine's CPU
        # would take hours): set_prompts() frees them once the prompts are cached
        for name in ("transformer", "vae", *self.text_encoders()):
            getattr(pipe, name).to(device, teacher_dtype(config)).requires_grad_(False).eval()
        self.teacher = pipe.transformer
        check_resolution(self.resolution, f, c.patch_size * self.packing)
        self.sample_shape = (c.in_channels // self.packing**2, self.resolution // f, self.resolution // f)  # (C, h, w)

    def text_encoders(self):  # the names of the pipeline's text encoders still loaded (freed ones are None)
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.pipe, n, None)]

    def set_prompts(self, prompts):
        """Encode the prompts once, kept on the CPU, and free the text encoders -- if PROMPT_CACHE_BYTES holds them."""
        self.prompts = list(prompts)
        with torch.no_grad():
            self.uncond = self.encode([""])  # the CFG unconditional branch, on the device
            per_prompt = sum(v.numel() * v.element_size() for v in self.encode(self.prompts[:1]).values())
            if per_prompt * len(self.prompts) <= PROMPT_CACHE_BYTES:  # encoded 16 at a time, each chunk to the CPU
                chunks = [
                    {k: v.cpu() for k, v in self.encode(self.prompts[i : i + 16]).items()}
                    for i in range(0, len(self.prompts), 16)
                ]
                self.prompt_cache = _cat(chunks)
                for name in self.text_encoders():
                    setattr(self.pipe, name, None)  # freed: every embedding the run will need is cached
                torch.cuda.empty_cache()  # (nothing to do without CUDA)

    def cond_for(self, idx):  # conditioning for prompt indices idx ((B,) tensor or list of int), on the device
        if self.prompt_cache is not None:
            return {k: v[idx].to(self.device) for k, v in self.prompt_cache.items()}
        with torch.no_grad():
            return self.encode([self.prompts[i] for i in idx])

    def sample_batch(self, n, rng):
        """n prompt indices; data-aided, also n image-caption pairs, drawn apart from the prompts (as official)."""
        names = ("prompt", "real") if self.real is not None else ("prompt",)
        return {k: torch.randint(len(self.prompts), (n,), generator=rng, device=rng.device).cpu() for k in names}

    def condition(self, draws):  # the prompts' conditioning; data-aided, the pairs' latents and their captions' too
        cond = self.cond_for(draws["prompt"])
        if "real" not in draws:
            return cond, None, None
        x0_real = self.real[draws["real"]].to(self.device)  # (B, C, h, w)
        return cond, x0_real, self.cond_for(draws["real"])

    def prompt_velocity(self, net, x_t, t, cond, guidance):  # v_c alone; FLUX.1-dev: at embedded guidance kappa
        return self.forward(net, x_t, t, cond, guidance)

    def velocity(self, net, x_t, t, cond, guidance):
        """v_u + kappa (v_c - v_u) (D18), the empty prompt's v_u and the prompt's v_c in one call of 2B; kappa (the
        argument `guidance`) a float or a per-sample (B,) tensor. One branch at a batch-wide kappa = 1 (v_c) or 0
        (Zero-CFG), or with embedded guidance alone (guidance_branches). A guidance-distilled teacher (FLUX.1-dev) gets
        kappa as its embedded guidance too, in both branches as in the official code -- where a per-sample kappa of 0
        (a guidance interval, or a call whose features the discriminator reads) is the empty prompt's branch at
        embedded 0, not the prompt's as a batch-wide 0."""
        per_sample = torch.is_tensor(guidance)
        if self.embedded_only or (not per_sample and guidance == 1.0):
            return self.forward(net, x_t, t, cond, guidance)
        uncond = expanded(self.uncond, len(x_t))
        if not per_sample and guidance == 0.0:  # Zero-CFG: one branch
            # (a guidance-distilled teacher: the prompt at embedded 0, as the official code)
            return self.forward(net, x_t, t, cond if self.embedded_guidance else uncond, guidance)
        g = torch.cat([guidance, guidance]) if per_sample else guidance  # (2B,) or a float
        v_uncond, v_cond = self.forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), _cat([uncond, cond]), g).chunk(
            2
        )
        kappa = _per_sample(guidance, x_t) if per_sample else guidance  # (B, 1, 1, 1) or a float
        return v_uncond + kappa * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x):
        """Latents (B, C, h, w) -> images (B, H, W, 3) float in [0, 1], as the stock pipeline decodes them."""
        vae = self.pipe.vae
        latents = x / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="np")

    # students(config, runtime) is section 11's place_students(backbone, config, runtime), as a method: where the
    # students live (LoRA, FSDP2, checkpointing, compile) is not a family's business
    students = place_students


class SanaBackbone(DiTBackbone):
    """SANA: Gemma-2 embeddings and mask of the prompt behind the stock pipeline's complex human instruction (the
    empty prompt without it, as the pipeline's negative prompt and the official code); t * 1000 * timestep_scale."""

    pipeline = "SanaPipeline"
    text_tokens = 300
    vae_factor = 32
    text_encoder_params = 2.61e9
    saved_per_block = (41.0, 35.0)
    recomputed_inputs = (2.8, 1.1)
    text_in_blocks = 0.1  # text: cross-attention only
    instruction = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default

    def encode(self, prompts):
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            complex_human_instruction=self.instruction if prompts != [""] else None,
        )
        return {"embeds": embeds, "mask": mask}  # (B, L, C), (B, L)

    def forward(self, net, x_t, t, cond, guidance):
        dtype = net.dtype
        v = net(
            x_t.to(dtype),
            encoder_hidden_states=cond["embeds"].to(dtype),
            encoder_attention_mask=cond["mask"],
            timestep=t * 1000 * net.config.timestep_scale,
            return_dict=False,
        )[0]
        return v[:, : x_t.shape[1]]  # a learned-sigma head outputs 2C channels: the first C are the velocity


class SD3Backbone(DiTBackbone):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5 embeddings and pooled projections; the transformer takes t * 1000."""

    pipeline = "StableDiffusion3Pipeline"
    step_noise_from_generator = False
    text_tokens = 77 + 256
    text_encoder_params = 0.12e9 + 0.69e9 + 4.76e9
    saved_per_block = (18.0, 10.0)
    recomputed_inputs = (2.0, 1.35)

    def encode(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(  # every text encoder the same prompts, T5's 256 tokens
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.device,
            do_classifier_free_guidance=False,
        )
        return {"embeds": embeds, "pooled": pooled}  # (B, L, C), (B, P)

    def forward(self, net, x_t, t, cond, guidance):
        dtype = net.dtype
        return net(
            hidden_states=x_t.to(dtype),
            timestep=t * 1000,
            encoder_hidden_states=cond["embeds"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype),
            return_dict=False,
        )[0]


class FluxBackbone(DiTBackbone):
    """FLUX.1: T5 embeddings, pooled CLIP, 2-D position ids, latents packed 2x2 into tokens, t in [0, 1]. FLUX.1-dev is
    guidance-distilled: as the official code, every CFG scale kappa is fed to its guidance embedding AND, for kappa
    outside {0, 1}, the two-branch CFG with the empty prompt runs too; kappa = 0 is the prompt at embedded 0; the
    student is called at embedded guidance 1. --embedded-guidance-only: the embedding alone, one branch, and the
    student at the teacher's scale (the stock FluxPipeline's guidance_scale samples it at the same)."""

    pipeline = "FluxPipeline"
    embedded_guidance = True
    packing = 2
    step_noise_from_generator = False
    text_tokens = 512
    text_encoder_params = 0.12e9 + 4.76e9
    saved_per_block = (24.0, 12.0)
    recomputed_inputs = (2.15, 1.6)

    def __init__(self, pipe, config, device):
        super().__init__(pipe, config, device)
        self.embedded_only = config.embedded_guidance_only
        self.student_guidance = config.guidance_eval_real if self.embedded_only else 1.0

    def encode(self, prompts):
        # the same prompts for both text encoders (prompt_2's default), T5's 512 tokens (the stock pipeline's default)
        embeds, pooled, self.txt_ids = self.pipe.encode_prompt(prompts, device=self.device)  # txt_ids (L, 3), shared
        return {"embeds": embeds, "pooled": pooled}  # (B, L, C), (B, P)

    @staticmethod
    def pack(x):  # (B, C, h, w) -> (B, h/2 * w/2 tokens, 4C), a token's channels ordered (C, 2, 2) as FluxPipeline's
        return F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)

    @staticmethod
    def unpack(x, h, w):  # (B, tokens, 4C) -> (B, C, h, w)
        return F.pixel_shuffle(x.transpose(1, 2).reshape(len(x), -1, h // 2, w // 2), 2)

    def forward(self, net, x_t, t, cond, guidance):
        dtype = net.dtype  # the dtype to feed it
        _, h, w = self.sample_shape  # img_ids: (tokens, 3), each (0, row, column), as FluxPipeline's
        ids = torch.cartesian_prod(*(torch.arange(n, device=x_t.device).float() for n in (1, h // 2, w // 2)))
        g = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).expand(len(x_t))  # (B,) embedded
        v = net(
            hidden_states=self.pack(x_t).to(dtype),
            timestep=t,
            guidance=g if net.config.guidance_embeds else None,
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=cond["embeds"].to(dtype),
            txt_ids=self.txt_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        return self.unpack(v, h, w)

    def step_noise(self, shape, rng):
        B, C, h, w = shape  # FlowMatchEulerDiscreteScheduler draws in the packed layout the pipeline steps in
        return self.unpack(torch.randn((B, h * w // 4, C * 4), generator=rng, device=self.device), h, w)


# --- 13. Real images for data-aided SiD (D17): read, resize + center-crop, encode once with the teacher's VAE ------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_captions(path):
    """[(image path, caption)] of a folder of images with same-name .txt captions, and how many images have none."""
    if not os.path.isdir(path):
        raise UserError(f"--data {path}: not a folder of images with same-name .txt captions")
    images = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_EXTENSIONS)]
    pairs = []
    for image in images:
        caption_file = os.path.splitext(image)[0] + ".txt"
        if not os.path.isfile(caption_file):
            continue
        with open(caption_file, encoding="utf-8") as f:
            caption = f.read().strip()
        if caption:  # (a blank caption counts as none)
            pairs.append((image, caption))
    return pairs, len(images) - len(pairs)


def encode_data(backbone, path, cache_path):
    """(latents (N, C, h, w) on the CPU, captions, skipped counts) of a data set, encoded once, cached in cache_path"""
    key = dict(path=os.path.abspath(path), resolution=backbone.resolution, teacher=backbone.source)
    cache = torch.load(cache_path, weights_only=False) if os.path.isfile(cache_path) else {}
    if cache.get("key") == key:
        return cache["latents"], cache["captions"], cache["skipped"]
    pairs, no_caption = read_image_captions(path)
    vae = backbone.pipe.vae
    R = backbone.resolution
    latents = []
    captions = []
    unreadable = 0
    for image_path, caption in pairs:
        try:  # resized (shorter side) and center-cropped to a square by the pipeline's own processor: (1, 3, R, R)
            x = backbone.pipe.image_processor.preprocess(
                diffusers.utils.load_image(image_path), R, R, resize_mode="crop"
            )
        except Exception:  # corrupt, truncated, missing, not an image: skip it, count it, go on
            unreadable += 1
            continue
        with torch.no_grad():
            enc = vae.encode(x.to(backbone.device, vae.dtype))
            # KL VAEs (SD3, FLUX) give a distribution: one draw of it, as the official pre-computation (seeded: the
            # cache is the same for the same images); SANA's DC-AE gives the latent directly
            draw = torch.Generator(backbone.device).manual_seed(len(latents))
            z = enc.latent_dist.sample(draw) if hasattr(enc, "latent_dist") else enc.latent
            z = (z.float() - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
        latents.append(z.cpu())
        captions.append(caption)
    if not latents:
        raise UserError(
            f"--data {path}: no usable image-caption pairs ({unreadable} unreadable, {no_caption} without caption)"
        )
    latents = torch.cat(latents)  # (N, C, h, w)
    skipped = dict(unreadable=unreadable, no_caption=no_caption)
    atomic_save(dict(key=key, latents=latents, captions=captions, skipped=skipped), cache_path)
    return latents, captions, skipped


# --- 14. A quality number for every run, with no extra download: the student's Frechet distance to the teacher ----
# At a run's start the teacher draws a reference set, QUALITY_SIZE samples (the run's prompts in turn, fixed seeds), by
# its own REFERENCE_STEPS-step Euler sampler guided as in the losses; each evaluation, the student (EMA) draws the same
# prompts and seeds. The teacher sees both given the empty prompt (the image, not its fit to a prompt): its last hidden
# states at t = QUALITY_T, averaged over a 4 x 4 grid of image regions, whitened on the reference's top QUALITY_DIMS
# principal directions (there the reference is N(0, I)), then FID's Frechet distance to N(0, I). Validated by
# experiments/digits.py --metric-study; the alternatives weighed by experiments/metric_variants.py.
QUALITY_SIZE = 512  # samples of the reference set and of each evaluation
QUALITY_T = 0.3  # the noise level at which the teacher sees them
QUALITY_DIMS = 8  # principal directions kept
REFERENCE_STEPS = 32  # the teacher's Euler steps for the reference set


def euler_sample(velocity_fn, x, steps):
    """The teacher's own sampler: Euler on dx/dt = v from the noise x at t = 1 to t = 0, uniform steps, no gradient."""
    ts = torch.linspace(1.0, 0.0, steps + 1, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        for i in range(steps):
            x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, ts[i].expand(len(x)))
    return x  # (B, *D)


def grid_features(hidden, B):  # (B, N, C) -> (B, C, side, side) -> 4 x 4 averages (B, 16 C); toy: (B, C)
    h = hidden[-B:].float()
    if h.dim() != 3:  # (B, C): the toy's
        return h
    side = math.isqrt(h.shape[1])  # N tokens: side x side
    return F.adaptive_avg_pool2d(h.reshape(B, side, side, -1).permute(0, 3, 1, 2), 4).flatten(1)


def frechet_to_standard(f):
    """FID's Frechet distance between a Gaussian fitted to f (n, d) and N(0, I): |mu|^2 + tr(C + I - 2 C^1/2), i.e.
    |mu|^2 + sum_i (sqrt(lambda_i) - 1)^2 over the eigenvalues lambda_i of f's covariance C."""
    lam = torch.linalg.eigvalsh(torch.cov(f.T)).clamp_min(0)  # (d,)
    return (f.mean(0).square().sum() + (lam.sqrt() - 1).square().sum()).item()


class Quality:
    """quality(net) -> the score of a generator's K-step samples, kept in .samples (the preview); lower is better;
    .lines: the teacher's own 4- and 8-step scores. `seed`: the samples' noises'; the features' noise's + 1."""

    def __init__(self, backbone, config, cache=None, seed=0):
        self.backbone = backbone
        self.config = config
        self.seed = seed
        n = QUALITY_SIZE
        # the prompts in turn, a dict of (n, ...) tensors; None: an unconditional teacher
        self.cond = backbone.cond_for([i % len(backbone.prompts) for i in range(n)]) if backbone.prompts else None
        self.noises = backbone.noises(
            n, config.steps, torch.Generator(backbone.device).manual_seed(seed)
        )  # (n, K, *D)
        # what the reference depends on: the prompts, the samples' shape and seed, the metric's settings, the guidance
        key = [list(backbone.prompts), backbone.sample_shape, seed, n, QUALITY_T, QUALITY_DIMS, REFERENCE_STEPS]
        key += [config.guidance_eval_real, config.guidance_t_min, config.guidance_t_max]
        saved = torch.load(cache, backbone.device, weights_only=False) if cache and os.path.isfile(cache) else {}
        if saved.get("key") == key:
            self.mean, self.basis, self.lines = saved["stats"]
            return
        with autocast(config, backbone.device):
            f = self.features(self.teacher_samples(REFERENCE_STEPS))  # (n, C), float64 (as all that follows)
            self.mean = f.mean(0)
            std = f.std(0) + 1e-6
            _, s, v = torch.linalg.svd((f - self.mean) / std, full_matrices=False)  # principal directions
            dims = min(QUALITY_DIMS, n - 1)  # directions kept (n - 1 at most: centred, the reference spans no more)
            self.basis = v[:dims].T * (n - 1) ** 0.5 / s[:dims] / std[:, None]  # (C, dims): the covariance -> I
            self.lines = {K: self.score(self.teacher_samples(K)) for K in (4, 8)}  # the plot's: same prompts, seeds
        if cache and int(os.environ.get("RANK", 0)) == 0:
            atomic_save(dict(key=key, stats=(self.mean, self.basis, self.lines)), cache)

    def chunked(self, fn, x):  # fn(rows, their conditioning) over 16 rows at a time: no batch larger than that
        out = []
        for i in range(0, len(x), 16):
            rows = slice(i, i + 16)
            cond = None if self.cond is None else {k: v[rows] for k, v in self.cond.items()}
            out.append(fn(x[rows], cond))
        return torch.cat(out)

    def teacher_samples(self, steps):  # the teacher's Euler sampler from the noises' z, guided as in the losses
        backbone = self.backbone
        config = self.config

        def sample(z, cond):
            def velocity(x, t):
                kappa = guidance_scale(config.guidance_eval_real, t, config.guidance_t_min, config.guidance_t_max)
                return backbone.velocity(backbone.teacher, x, t, cond, kappa)

            return euler_sample(velocity, z, steps)

        return self.chunked(sample, self.noises[:, 0])

    def features(self, x):
        """The teacher's grid-averaged last hidden states of x (N, *D) noised to QUALITY_T, prompt-free: (N, 16 C)."""
        backbone = self.backbone
        t = torch.full((len(x),), QUALITY_T, device=x.device)

        def pooled(x_t, _):  # (the rows' prompts unused: the empty prompt's conditioning, or None for the toy)
            empty = expanded(backbone.uncond, len(x_t))
            with torch.no_grad():
                _, hidden = velocity_and_features(backbone.velocity, backbone.teacher, x_t, t[: len(x_t)], empty, 1.0)
            return grid_features(hidden, len(x_t))

        eps = backbone.noise(
            x.shape, torch.Generator(backbone.device).manual_seed(self.seed + 1)
        )  # the same each time
        return self.chunked(pooled, add_noise(x, eps, t)).double()

    def score(self, x):  # whitened as the reference: (N, d)
        return frechet_to_standard((self.features(x) - self.mean) @ self.basis)

    def __call__(self, net):
        backbone = self.backbone

        def sample(noises, cond):  # K generator steps from the fixed noises
            def velocity(x, t):
                return backbone.velocity(net, x, t, cond, backbone.student_guidance)

            return generate(velocity, noises, self.config.noise)

        with autocast(self.config, backbone.device):
            self.samples = self.chunked(sample, self.noises)
            return self.score(self.samples)


def plot_quality(out, lines, now):
    """OUT/quality.png: the student's number over the run (OUT/log.jsonl's, and `now`), the teacher's as lines."""
    points = []  # (iteration, quality) of the evaluations logged before this one
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                metrics = json.loads(line)
                if "eval" in metrics and metrics["step"] < now[0]:
                    points.append((metrics["step"], metrics["eval"]["quality"]))
    points.append(now)
    ax = Figure(figsize=(6, 3.5)).subplots()
    ax.plot(*zip(*points, strict=True), "o-", label="student")
    for (K, q), ls in zip(lines.items(), ("--", ":"), strict=True):
        ax.axhline(q, color="gray", ls=ls, label=f"teacher, {K} Euler steps")
    ax.set(xlabel="iteration", ylabel="Frechet distance to the teacher (lower is better)", yscale="symlog")
    ax.legend()
    ax.figure.savefig(os.path.join(out, "quality.png"), dpi=90, bbox_inches="tight")


# --- 15. Teachers from disk or hub, the memory plan, export, and the command line ---------------------------------


def resolve_teacher(name, configs_only=False):
    """(source, its Backbone class, by the pipeline its model_index.json names) of a preset (its hub id;
    `configs_only`: its configs in assets/hf, offline and without a token for the gated ones), an existing folder, or
    a hub id 'owner/repo'."""
    src = HUB_IDS.get(name, name)
    if configs_only and name in HUB_IDS:
        src = os.path.join(HERE, "assets", "hf", "hub", f"models--{src.replace('/', '--')}", "snapshots", "0" * 40)
    if os.path.exists(src) and not os.path.isfile(os.path.join(src, "model_index.json")):
        raise UserError(f"--teacher {name}: {src} is not a diffusers pipeline folder (no model_index.json)")
    if not os.path.exists(src) and (src.count("/") != 1 or src.startswith((".", "/", "~"))):
        raise UserError(f"--teacher {name}: not a preset ({', '.join(HUB_IDS)}), a folder, or a hub id owner/repo")
    pipeline = _read_json(src, "model_index.json").get("_class_name", "?")
    if pipeline not in FAMILIES:
        raise UserError(f"--teacher {name}: pipeline class {pipeline} is not supported ({', '.join(FAMILIES)} are)")
    return src, FAMILIES[pipeline]


def _hub_file(repo, filename):
    """hf_hub_download of one file: the cache, else the hub after a 5-second probe (not half a minute of retries); or
    a line that says why not: offline, unreachable, gated, missing."""
    hub = huggingface_hub.constants
    where = f"--teacher {repo}: cannot read {repo}/{filename}"
    local = "; or give --teacher a local pipeline folder"
    url = urllib.parse.urlparse(hub.ENDPOINT)
    with contextlib.suppress(Exception):
        return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
    if hub.HF_HUB_OFFLINE:
        raise UserError(f"{where}: HF_HUB_OFFLINE is set and it is not in the hub cache ({hub.HF_HUB_CACHE}){local}")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:  # no route to the hub: say so now, not after the client's retries
        raise UserError(
            f"{where}: the hub ({url.hostname}) is unreachable ({e}); offline, set HF_HUB_OFFLINE=1{local}"
        ) from None
    try:
        return huggingface_hub.hf_hub_download(repo, filename)
    except GatedRepoError:
        why = f"the model is gated: accept its licence at https://huggingface.co/{repo}, log in (`hf auth login`)"
    except RepositoryNotFoundError:
        why = "no such model on the hub (or a private one: log in with `hf auth login`)"
    except Exception as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
    raise UserError(f"{where}: {why}{local}")


def load_backbone(config, device, src=None, family=None):
    """The teacher pipeline as a Backbone, at config.resolution (0: the transformer's native size)."""
    for lib in (diffusers, transformers, huggingface_hub):  # their notes are noise; failures raise
        lib.utils.logging.set_verbosity(lib.utils.logging.CRITICAL)
    for lib in (diffusers, transformers):  # and so are their progress bars
        lib.utils.logging.disable_progress_bar()
    if src is None:
        src, family = resolve_teacher(config.teacher)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(src, dtype=teacher_dtype(config))
    except (OSError, ValueError) as e:  # missing weights (a configs-only cache or folder), a broken pipeline
        raise UserError(
            f"cannot load the pipeline {src}: {' '.join(str(e).split())} (a cache or folder holding only "
            "configs, such as assets/hf, serves --dry-run alone)"
        ) from None
    backbone = family(pipe, config, device)
    backbone.source = src
    return backbone


def _read_json(src, name):  # a file of a pipeline folder, or of a hub id (from the hub cache when it is there)
    with open(os.path.join(src, name) if os.path.isdir(src) else _hub_file(src, name)) as f:
        return json.load(f)


def meta_transformer(src):  # the teacher's transformer on the meta device from its config.json: shapes, no weights
    index = _read_json(src, "model_index.json")
    config = _read_json(src, "transformer/config.json")
    with torch.device("meta"):
        return getattr(diffusers, index["transformer"][1]).from_config(config)


def vae_factor(src, family):
    """The VAE's spatial factor: 2^(blocks - 1) by the pipeline's vae/config.json (as diffusers), else the family's."""
    c = _read_json(src, "vae/config.json") if os.path.isfile(os.path.join(src, "vae/config.json")) else {}
    channels = c.get("encoder_block_out_channels") or c.get("block_out_channels")  # one entry a block
    return 2 ** (len(channels) - 1) if channels else family.vae_factor


def memory_plan(config, net, family, world_size=1, factor=None):
    """Bytes per GPU of weights, gradients, Adam's moments and activations for config on `world_size` GPUs (`net` on
    the meta device, `family` its Backbone class). full: teacher, generator, fake (and EMA), sharded by FSDP2; lora: a
    frozen base + three float32 adapters. Activations: one micro-batch's (--grad-accum adds none), at their peak in
    the generator update: the generator's graph (batch B), the teacher's and fake's (2B with two-branch CFG), and on
    one GPU bf16 copies of trainable weights. A run needs max('total', 'startup')."""
    c = net.config
    P = sum(p.numel() for p in net.parameters())  # the transformer's parameters
    base_bytes = teacher_dtype(config).itemsize  # per frozen weight and per activation
    # full: teacher, generator, fake (, EMA), FSDP2 shards each over the GPUs; lora: one frozen base, three float32
    # adapters, replicated on every GPU
    full = config.mode == "full"
    shards = world_size if full else 1
    grad_bytes = trainable_dtype(config).itemsize if full else 4
    trainable = 2 * P  # the generator's and the fake network's weights, or adapters:
    # full mode on one GPU under autocast: bf16 copies of the two trainable networks' weights, 2 bytes each
    copies = 2 * P * 2 if full and config.precision == "bf16-autocast" and world_size == 1 else 0
    weights = P * base_bytes + (3 if config.ema_decay else 2) * P * grad_bytes
    if not full:
        targets = [m for name, m in net.named_modules() if name.endswith(LORA_TARGETS)]
        lora = sum(config.lora_rank * (m.in_features + m.out_features) for m in targets)
        trainable = 2 * lora
        weights = P * base_bytes + 3 * lora * 4
    width = c.num_attention_heads * c.attention_head_dim
    layers = len(blocks(net))
    image_tokens = (
        config.resolution // (factor or family.vae_factor) // (c.get("patch_size", 1) * family.packing)
    ) ** 2
    tokens = image_tokens + family.text_tokens * family.text_in_blocks
    per_sample = config.guidance_t_min > 0 or config.guidance_t_max < 1  # a guidance interval: per-sample scales (D18)
    # generator, teacher, fake: their batches, whether their weights take gradients in the generator update
    batches = [
        config.batch_size * guidance_branches(w, config.embedded_guidance_only, per_sample)
        for w in (1.0, config.guidance_eval_real, config.guidance_eval_fake)
    ]
    trains = (full, False, full)
    unit = tokens * width * base_bytes  # one element per token-channel, in bytes
    per_block = [b * family.saved_per_block[0 if t else 1] * unit for b, t in zip(batches, trains, strict=True)]
    # a checkpointed block keeps its inputs (text tokens in full: they are inputs) and is recomputed one at a time
    recomputed = math.floor(layers * config.grad_checkpointing)  # as many as recompute_blocks chooses
    unit_in = (image_tokens + family.text_tokens) * width * base_bytes
    inputs = sum(b * family.recomputed_inputs[0 if t else 1] * unit_in for b, t in zip(batches, trains, strict=True))
    stored = recomputed * inputs + (layers - recomputed) * sum(per_block)
    recompute = max(per_block) if recomputed else 0  # one block's activations, rebuilt in backward
    grads = trainable * grad_bytes / shards
    plan = dict(parameters=P, trainable=trainable, weights=weights / shards, gradients=grads, optimizer=2 * grads)
    plan.update(activations=stored + recompute + copies, recompute=recompute)
    plan["total"] = plan["weights"] + plan["gradients"] + plan["optimizer"] + plan["activations"]
    plan["startup"] = (P + family.text_encoder_params) * base_bytes
    return plan


def check_inputs(config, configs_only=False):
    """What inputs and configs tell before any weights load: (config at its resolution, prompts, src, family,
    meta-device net, VAE factor). Resolution 0 becomes the transformer's native side, as DiTBackbone takes it."""
    if config.data and config.prompts:
        raise UserError("--data and --prompts: with a data set its captions are the prompts; give one of them")
    if config.data and not os.path.isdir(config.data):  # (its files are read once, when encoded, unless cached)
        raise UserError(f"--data {config.data}: no such folder")
    prompts = read_prompts(config.prompts) if config.prompts else DEFAULT_PROMPTS
    src, family = resolve_teacher(config.teacher, configs_only)
    net = meta_transformer(src)
    factor = vae_factor(src, family)
    config = dataclasses.replace(
        config, resolution=config.resolution or (net.config.get("sample_size") or 128) * factor
    )
    check_resolution(config.resolution, factor, net.config.patch_size * family.packing)
    if config.embedded_guidance_only and not family.embedded_guidance:
        raise UserError(f"--embedded-guidance-only: {config.teacher} takes no embedded guidance (FLUX.1-dev does)")
    return config, prompts, src, family, net, factor


def cmd_dry_run(config, world_size):  # the memory plan per GPU from the configs, after the checks a run makes first
    config, _, _, family, net, factor = check_inputs(config, configs_only=True)
    plan = memory_plan(config, net, family, world_size, factor)
    print(
        f"memory plan per GPU: {config.teacher} ({type(net).__name__}, {plan['parameters'] / 1e9:.2f} B parameters), "
        f"mode {config.mode}, precision {config.precision}, {world_size} GPU(s), "
        f"micro-batches of {config.batch_size}/GPU at "
        f"{config.resolution} px (global batch {config.batch_size} x {world_size} GPU(s) x {config.grad_accum} = "
        f"{config.batch_size * world_size * config.grad_accum}), "
        f"{config.grad_checkpointing:.0%} of the blocks checkpointed"
    )
    print(f"  trainable parameters  {plan['trainable'] / 1e6:12.1f} M")
    for key in ("weights", "gradients", "optimizer", "activations", "total", "startup"):
        print(f"  {key:<20}  {plan[key] / 2**30:12.1f} GiB" + ("  (teacher + text encoders)" * (key == "startup")))
    if torch.cuda.is_available():  # on a GPU machine: does it fit this GPU's free memory, and if not, what would
        free = torch.cuda.mem_get_info()[0]
        advice = fit_advice(config, net, family, factor, world_size, free)
        print(advice or f"  fits the {free / 2**30:.1f} GiB free on this GPU")
    return plan


STUDENT_META = "sid_flow.json"  # written into the exported pipeline folder: how to sample it


def export_student(backbone, net, config, out):
    """The run folder `out`'s student/, a diffusers pipeline folder written under a temporary name and renamed into
    place: the teacher's components, `net` (LoRA fused) and FlowMatchEulerDiscreteScheduler(stochastic_sampling=True,
    no shift): with sigmas generator_times(K), (D15). Returns its path."""
    folder = os.path.join(out, "student")
    tmp = f"{folder}.tmp{os.getpid()}"
    remove_path(tmp)  # (a crashed export's leftovers: a process id comes back)
    if isinstance(net, AdapterView):  # the adapter alone too (load_lora_adapter()), then fused into the base in place:
        # W + delta summed in float32 and rounded once to W's dtype (a bf16 sum would drop a delta < 2^-9 |W|). The
        # teacher is not used again: an export is a run's last step.
        net.base.save_lora_adapter(os.path.join(tmp, "lora"), adapter_name=net.adapter)
        net.base.fuse_lora(adapter_names=[net.adapter])
        net.base.unload_lora()  # (the LoRA layers replaced by their base layers, fused weights kept)
        net = net.base
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        backbone.source,
        transformer=net,
        dtype=teacher_dtype(config),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True
        ),
    )
    pipe.save_pretrained(tmp)
    meta = dict(
        family=backbone.pipeline,
        teacher=backbone.source,
        resolution=backbone.resolution,
        steps=config.steps,
        sigmas=generator_times(config.steps),
        guidance_scale=backbone.student_guidance,
        precision=config.precision,
        global_rng_step_noise=not backbone.step_noise_from_generator,
    )
    with open(os.path.join(tmp, STUDENT_META), "w") as f:
        json.dump(meta, f, indent=1)
    replace_path(tmp, folder)
    return folder


def cmd_distill(config):
    # bad input fails here, before any weights load
    config, prompts, src, family, shapes, factor = check_inputs(config)
    runtime = setup_runtime(config)
    global_batch = config.batch_size * runtime.world * config.grad_accum
    if global_batch != GLOBAL_BATCH and runtime.rank == 0:
        print(f"global batch {global_batch} (--batch-size x processes x --grad-accum), not the paper's {GLOBAL_BATCH}")
    # on CUDA, before any weights load: one line if the memory plan exceeds free memory (fit_advice: what would fit)
    if runtime.device.type == "cuda":
        free = torch.cuda.mem_get_info(runtime.device)[0]
        advice = fit_advice(config, shapes, family, factor, runtime.world, free)
        if advice:
            raise UserError(advice)
    backbone = load_backbone(config, runtime.device, src, family)
    os.makedirs(config.out, exist_ok=True)
    if config.data:  # data-aided SiD: captions become the prompt set, latents the real samples (row for row)
        backbone.real, prompts, skipped = encode_data(backbone, config.data, os.path.join(config.out, "data_cache.pt"))
        if runtime.rank == 0:
            print(
                f"data: {len(prompts)} image-caption pairs; skipped {skipped['unreadable']} unreadable images and "
                f"{skipped['no_caption']} without caption"
            )
    backbone.set_prompts(prompts)
    quality = None  # built at the first evaluation: a run without evaluations draws no reference set

    def on_eval(step, generator, ema):  # every rank draws (a sharded forward is collective), rank 0 writes
        nonlocal quality
        quality = quality or Quality(backbone, config, os.path.join(config.out, "reference.pt"))
        q = quality(generator if ema is None else ema)
        if runtime.rank == 0:  # the preview, one PNG row: the first 4 samples it scored (the run's first 4 prompts)
            row = diffusers.utils.numpy_to_pil(backbone.decode(quality.samples[:4].float()))  # 4 images, one row
            diffusers.utils.make_image_grid(row, 1, 4).save(os.path.join(config.out, f"preview_{step:07d}.png"))
            plot_quality(config.out, quality.lines, (step, q))
        return dict(quality=q)

    res = distill(config, backbone, on_eval=on_eval, runtime=runtime)
    which = "ema" if config.ema_decay else "generator"  # the student a run keeps
    if runtime.rank == 0:  # (full mode: rank 0 reads the student alone from the checkpoint, into a plain copy)
        net = (
            res[which]
            if config.mode == "lora"
            else saved_network(checkpoint_path(config.out), which, backbone, config)
        )
        folder = export_student(backbone, net, config, config.out)
        print(
            f"student pipeline: {folder} ({res['skipped']} non-finite iterations skipped, {runtime.world} processes)"
        )
    if runtime.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def lighter_settings(config):
    """Settings that lower a run's planned memory per GPU, lightest change first, each at the same global batch: every
    block checkpointed; then smaller micro-batches, with --grad-accum raised to match; in full mode then LoRA."""
    settings = [dict(grad_checkpointing=1.0)]
    global_batch = config.batch_size * config.grad_accum
    for batch_size in range(config.batch_size - 1, 0, -1):
        if config.batch_size % batch_size == 0:
            settings.append(dict(grad_checkpointing=1.0, batch_size=batch_size, grad_accum=global_batch // batch_size))
    if config.mode == "full":
        settings += [dict(setting, mode="lora") for setting in settings]
    return settings


def fit_advice(config, net, family, factor, world, free):
    """None if config's memory plan fits `free` bytes per GPU on `world` GPUs; else one line that says so and names the
    lightest change of settings (lighter_settings) whose own plan fits, at the same global batch."""

    def need(**change):  # bytes per GPU of the run with these fields changed
        plan = memory_plan(dataclasses.replace(config, **change), net, family, world, factor)
        return max(plan["total"], plan["startup"])

    if need() <= free:
        return None
    fits = [setting for setting in lighter_settings(config) if need(**setting) <= free]
    if fits:
        hint = "try " + " ".join(f"{flag(k)} {v}" for k, v in fits[0].items())
    elif config.mode == "full":  # FSDP2 shards full mode's weights, gradients and Adam's state over the GPUs
        hint = "more GPUs (torchrun) or a GPU with more memory"
    else:  # LoRA mode is replicated on every GPU: more GPUs lower no GPU's memory
        hint = "a GPU with more memory"
    return (
        f"the memory plan needs {need() / 2**30:.1f} GiB per GPU ({config.mode} mode, micro-batch {config.batch_size} "
        f"at {config.resolution} px), {free / 2**30:.1f} GiB are free: {hint} (--dry-run prints the plan)"
    )


def saved_network(path, which, backbone, config):
    """Network `which` of a checkpoint, reading only its tensors, in this process alone: an adapter view on the
    teacher's base (LoRA), or a plain transformer on the CPU in the teacher's dtype (full mode)."""
    if config.mode == "lora":
        net = lora_students(backbone, config.lora_rank)[LORA_ADAPTERS.index(which)]
    else:
        net = meta_transformer(backbone.source).to(teacher_dtype(config)).to_empty(device="cpu")
    state = {which: {"model": net.state_dict()}}  # in place: DCP reads into these tensors, casting to their dtype
    with expected(ONE_PROCESS):
        dcp.load(state, checkpoint_id=path, no_dist=True)  # this process alone, even inside a process group
    return net


def cmd_export(out, weights, device):
    """OUT/student from a run's checkpoint, finished or not; full mode loads it into the teacher's own transformer."""
    path = checkpoint_path(out)
    if not os.path.isdir(path):
        raise UserError(f"--out {out}: no checkpoint there (export reads the run folder of sid_flow.py)")
    meta = read_meta(path)
    config = Config(**meta["config"] | dict(device=device))
    weights = weights or ("ema" if config.ema_decay else "generator")  # the student the run keeps
    if weights == "ema" and not config.ema_decay:
        raise UserError(f"--out {out}: the run kept no EMA (--ema-decay 0); export --weights generator")
    if config.teacher in ("toy", "digits"):
        raise UserError(
            f"--out {out}: a run of the {config.teacher} teacher; export writes diffusers "
            f"pipelines of image teachers, and this student's weights are already in {out}/checkpoint "
            "(torch.distributed.checkpoint.format_utils.dcp_to_torch_save makes it one file for torch.load)"
        )
    backbone = load_backbone(config, resolve_device(config.device))
    net = saved_network(path, weights, backbone, config)
    print(
        f"student pipeline ({weights}, iteration {meta['step']}):",
        export_student(backbone, net, config, out),
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
        p.add_argument(
            "--weights", choices=("ema", "generator"), help="the student's [default: ema if the run kept one]"
        )
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
    teacher = a["teacher"]
    if teacher is None:
        raise UserError(f"--teacher is required: a preset ({', '.join(HUB_IDS)}), a pipeline folder or a hub id")
    if teacher in PRESETS and teacher not in HUB_IDS:
        where = "python experiments/digits.py" if teacher == "digits" else "python run_toy.py"
        raise UserError(f"--teacher {teacher}: that teacher is trained by {where.split()[1]}: run `{where}`")
    a["out"] = a["out"] or f"out/{slug(teacher)}"
    preset = known_preset(teacher)
    if preset not in (None, teacher):
        print(f"--teacher {teacher}: {preset}'s model, so {preset}'s preset (override any field by its flag)")
    config = make_config(preset, **a)
    return cmd_dry_run(config, int(os.environ.get("WORLD_SIZE", 1))) if dry_run else cmd_distill(config)


def known_preset(teacher):
    """The preset whose model `teacher` is: an image preset's name, its hub id, or a pipeline folder whose transformer
    config is the preset's (a local copy of the model); None for any other teacher."""
    config = os.path.join(teacher, "transformer/config.json")
    for name, hub in HUB_IDS.items():
        ours = os.path.join(resolve_teacher(name, configs_only=True)[0], "transformer/config.json")
        if teacher in (name, hub) or os.path.isfile(config) and _public(config) == _public(ours):
            return name
    return None  # (the toy and digits presets are refused before: they are not pipelines)


def _public(path):  # a config.json's entries, without diffusers' bookkeeping ('_class_name', '_name_or_path', ...)
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def slug(name):
    """A folder name (letters, digits, '.-_'; never '' or a dot name) from the last part of a name, path or hub id."""
    base = os.path.basename(os.path.abspath(name))  # (abspath drops a trailing '/': a hub id's repo name, too)
    return re.sub(r"[^\w.-]", "_", base).strip(".") or "run"


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
