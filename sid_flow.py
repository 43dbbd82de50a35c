"""sid_flow.py -- Score identity Distillation (SiD) of flow-matching models, in one file.

Read it top to bottom, beside derivation.md (equation labels (D1)...(D16) are cited in the comments):

    CONVENTIONS -> 1 path algebra (Bayes' rule) -> 2 times and weights -> 3 losses -> 4 few-step generator
    -> 5 backbones (the toy MLP; SANA, SD3, FLUX; LoRA views; image data) -> 6 one SiD iteration
    -> 7 the loop (EMA, checkpoints, logs) -> 7b runtime (device, ranks, FSDP2) -> 8 config, presets
    -> 9 loading, export, memory plan, command line

Commands, by hardware:
    laptop (CPU, ~2 min):  python run_toy.py                       # 2-D checkerboard: out/toy/checkerboard/
    one or more GPUs:      python sid_flow.py --teacher sana-0.6b-512        # presets: see PRESETS (section 8)
                           python sid_flow.py --teacher flux-dev --prompts my_prompts.txt --iters 5000
                           python sid_flow.py --teacher ./my_pipeline_folder --resolution 512
    sample the student:    python sid_flow.py sample --student out/flux-dev/student --prompt "a fox" --seed 0 --out fox.png
    export a checkpoint:   python sid_flow.py export --out out/flux-dev
    data-aided (D16):      python sid_flow.py --teacher sana-0.6b-512 --data my_images/   # x.png + x.txt captions
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


def gaussian(generator=None):
    """draw(x) -> fresh N(0, I) noise shaped like x, from `generator` (None: torch's global RNG)."""
    return lambda x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


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
# 5. Backbones: every family quirk lives behind one interface                                      (D8)
#
# The loop sees a Backbone and three plain nn.Modules (teacher, fake, generator). It calls
#     backbone.velocity(net, x_t, t, cond, guidance) -> v      (B, *D) -- CFG, timestep scale, packing inside
#     backbone.sample_batch(n, generator) -> (cond, x0_real)   conditioning (None for the toy); real data or None
#     backbone.trainable_copy() -> nn.Module                   a float32 copy of the teacher (generator, fake)
#     backbone.noise(shape, g), backbone.step_noise(x, g)      N(0, I) draws, laid out as the stock pipeline draws them
#     backbone.sample_shape                                    D, the shape of one sample
# and never branches on the model family. (In LoRA mode the three modules are views of one base: see below.)
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
    step_noise_from_generator = True  # does the stock pipeline draw its per-step noise from `generator`?

    def trainable_copy(self, dtype=torch.float32):
        return copy.deepcopy(self.teacher).to(dtype).requires_grad_(True).train()

    def noise(self, shape, generator):
        """N(0, I) in the sample layout (B, *D), drawn as the stock pipeline draws it."""
        return torch.randn(shape, generator=generator, device=self.device)

    def step_noise(self, x, generator):
        """The re-noising draw between generator steps, as the stock scheduler draws it (same layout, same RNG)."""
        return self.noise(x.shape, generator if self.step_noise_from_generator else None)


class ToyBackbone(Backbone):
    """The 2-D teacher behind the Backbone interface: unconditional, no CFG, no latents. `real(n, generator)`,
    when given, draws true data for data-aided SiD."""

    def __init__(self, teacher, real=None):
        self.teacher = teacher.requires_grad_(False).eval()  # frozen for the whole run
        self.device = teacher.head.weight.device
        self.sample_shape = (teacher.config["dim"],)
        self.real = real

    def velocity(self, net, x_t, t, cond, guidance):
        return net(x_t, t)  # (B, 2)

    def sample_batch(self, n, generator):
        """(cond, x0_real): no conditioning; real samples only in data-aided runs."""
        return None, (self.real(n, generator) if self.real else None)


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
        self.teacher = pipe.transformer.to(device, teacher_dtype).requires_grad_(False).eval()
        self.sample_shape = self.latent_shape(resolution)  # (C, h, w)
        pipe.vae.to(device)
        self.prompts, self.bank, self.uncond, self.data = [], None, None, None

    # --- what a family overrides ----------------------------------------------------------------------------------
    def encode(self, prompts):
        """list of str -> cond dict, batch len(prompts)."""
        raise NotImplementedError

    def forward(self, net, x_t, t, cond, guidance):
        """One call of `net` in our conventions: x_t (B, C, h, w), t (B,) in [0, 1] -> v (B, C, h, w)."""
        raise NotImplementedError

    def text_encoders(self):
        return [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(self.pipe, name)]

    # --- shared ---------------------------------------------------------------------------------------------------
    def latent_shape(self, resolution):
        f = self.pipe.vae_scale_factor
        p = self.teacher.config.patch_size * self.packing
        if resolution <= 0 or resolution % (f * p):
            raise UserError(f"--resolution {resolution}: must be a positive multiple of {f * p} for this teacher "
                            f"(VAE factor {f} x patch {p})")
        c = self.teacher.config.in_channels // self.packing ** 2
        return (c, resolution // f, resolution // f)

    def set_prompts(self, prompts):
        """Encode the prompt set once. If the cache fits PROMPT_CACHE_BYTES it is kept (on the CPU) and the text
        encoders are freed; otherwise prompts are encoded per batch and the encoders stay."""
        self.prompts = list(prompts)
        with torch.no_grad():
            self.uncond = self.encode([""])  # the CFG unconditional branch, on the device
            first = self.encode(self.prompts[:1])
            per_prompt = sum(v.numel() * v.element_size() for v in first.values())
            if per_prompt * len(self.prompts) <= PROMPT_CACHE_BYTES:
                chunks = [self.encode(self.prompts[i:i + 16]) for i in range(0, len(self.prompts), 16)]
                self.bank = {k: v.cpu() for k, v in _cat(chunks).items()}
                for name in self.text_encoders():
                    setattr(self.pipe, name, None)  # freed: every embedding the run will need is cached

    def cond_for(self, idx):
        """Conditioning for prompt indices idx (list of int), on the device."""
        if self.bank is not None:
            return {k: v[idx].to(self.device) for k, v in self.bank.items()}
        with torch.no_grad():
            return self.encode([self.prompts[i] for i in idx])

    def sample_batch(self, n, generator):
        """(cond, x0_real) for n random prompts; with a data set (set_data), the prompts are its captions and
        x0_real its cached latents, row for row."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator, device=generator.device).tolist()
        real = self.data[idx].to(self.device) if self.data is not None else None
        return self.cond_for(idx), real

    def velocity(self, net, x_t, t, cond, guidance):
        if guidance == 1.0 or self.guidance_embedded:
            return self.forward(net, x_t, t, cond, guidance)
        B = x_t.shape[0]
        uncond = {k: v.expand(B, *v.shape[1:]) for k, v in self.uncond.items()}
        v_uncond, v_cond = self.forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), _cat([uncond, cond]),
                                        guidance).chunk(2)  # (B, C, h, w) each
        return v_uncond + guidance * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x):
        """Latents (B, C, h, w) -> images (B, H, W, 3) float in [0, 1], as the stock pipeline decodes them."""
        vae = self.pipe.vae
        latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="np")

    def _dtype(self, net):
        return next(net.parameters()).dtype


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
    scale of the config is fed to that embedding; the generator gets cfg.student_guidance (pass the same value as
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
        g = torch.full((x_t.shape[0],), float(guidance), device=x_t.device) if net.config.guidance_embeds else None
        v = net(hidden_states=self.pack(x_t).to(dt), timestep=t, guidance=g, pooled_projections=cond["pooled"].to(dt),
                encoder_hidden_states=cond["embeds"].to(dt), txt_ids=self.txt_ids, img_ids=ids.reshape(-1, 3),
                return_dict=False)[0]
        return self.unpack(v, h, w)

    def step_noise(self, x, generator):
        B, C, h, w = x.shape  # FlowMatchEulerDiscreteScheduler draws in the packed layout the pipeline steps in
        n = torch.randn((B, (h // 2) * (w // 2), C * 4), generator=generator if self.step_noise_from_generator
                        else None, device=self.device)
        return self.unpack(n, h, w)


# --- LoRA mode: one frozen base transformer, adapters "generator", "fake" and "ema"; the teacher is the base --------
#
# Two peft pitfalls, handled here once: (1) peft's set_adapter() makes ONLY the active adapter trainable, so after every
# switch the requires_grad flags are put back (generator and fake train, ema does not), otherwise a backward pass after
# a switch would silently skip the other adapter; (2) gradient checkpointing recomputes a block during backward, when
# another adapter may be active, so the checkpoint function records the adapter of the forward pass and replays it.

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of every diffusers DiT family
LORA_TRAINABLE = ("generator", "fake")


def _adapter_state(base):
    """The adapter a forward pass of `base` runs with now: its name, or None when adapters are disabled."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layer = next(m for m in base.modules() if isinstance(m, BaseTunerLayer))
    return None if layer.disable_adapters else layer.active_adapters[0]


def _set_adapter_state(base, name):
    if name is None:
        base.disable_adapters()
    else:
        base.enable_adapters()
        base.set_adapter(name)
    for n, p in base.named_parameters():  # pitfall (1): restore what trains, whatever set_adapter did
        if "lora_" in n:
            p.requires_grad_(any(f".{a}." in n for a in LORA_TRAINABLE))


@contextlib.contextmanager
def use_adapter(base, name):
    previous = _adapter_state(base)
    _set_adapter_state(base, name)
    try:
        yield
    finally:
        _set_adapter_state(base, previous)


def adapter_checkpoint(base):
    """A gradient-checkpointing function for diffusers that replays the forward pass's adapter (pitfall 2)."""
    import torch.utils.checkpoint

    def checkpoint(block, *args):
        state = _adapter_state(base)

        def run(*a):
            with use_adapter(base, state):
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

    def merged(self):
        """A plain transformer of the base's class with this adapter's LoRA fused into its weights."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        state = {n.replace(".base_layer", ""): p.detach()
                 for n, p in self.base.state_dict().items() if "lora_" not in n}
        for name, module in self.base.named_modules():
            if isinstance(module, BaseTunerLayer) and self.adapter in module.lora_A:
                w = module.get_base_layer().weight
                state[f"{name}.weight"] = w.detach() + module.get_delta_weight(self.adapter).detach().to(w.dtype)
        plain = type(self.base).from_config(self.base.config)
        plain.load_state_dict(state)
        return plain


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
    _set_adapter_state(base, None)
    backbone.teacher = AdapterView(base, None)
    return views


# --- real images for data-aided SiD (D16): read, resize + center-crop, encode once with the teacher's VAE --------

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


FAMILIES = {"SanaPipeline": SanaBackbone, "StableDiffusion3Pipeline": SD3Backbone, "FluxPipeline": FluxBackbone}


# ------------------------------------------------------------------------------------------------------------------
# 6. One SiD iteration: fake update(s), then a generator update, on the same generator sample        (D9)-(D14)
# ------------------------------------------------------------------------------------------------------------------

def gan_schedule(cfg, images_seen):
    """Data-aided schedule, in generator images seen (so it holds at any batch size): the generator is frozen for the
    first cfg.gan_freeze_images; from cfg.gan_start_images its objective is (1 - gan_weight) SiD + gan_weight GAN.
    Returns (update_generator, gan_weight now)."""
    return images_seen >= cfg.gan_freeze_images, (cfg.gan_weight if images_seen >= cfg.gan_start_images else 0.0)


def sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng, images_seen=0, runtime=None):
    """One iteration of Algorithm 1 (derivation.md). Returns a dict of diagnostics; a phase whose loss is not finite
    skips its optimizer step and is named under 'nonfinite' (the loop decides when to stop). With real data from
    the backbone (data-aided SiD, D16) the fake network is also the discriminator."""
    B, K = cfg.batch_size, cfg.steps
    device = next(generator.parameters()).device
    teacher = backbone.teacher
    runtime = runtime or Runtime()
    # the same k for both updates: a uniform draw from {1..K} (the paper's mixture) or always K (D13). Drawn from
    # (seed, images seen), not from the per-rank rng: every rank must run the same number of (collective) forwards
    k_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + images_seen)
    k = K if cfg.train_step == "last" else int(torch.randint(1, K + 1, (1,), generator=k_rng).item())
    z = backbone.noise((B, *backbone.sample_shape), rng)  # (B, *D) initial noise
    cond, x0_real = backbone.sample_batch(B, rng)  # prompts (or None) and real samples (or None), both updates
    update_generator, gan_weight = gan_schedule(cfg, images_seen) if x0_real is not None else (True, 0.0)

    def draw(x):  # the re-noising draws between generator steps, from the loop's RNG
        return backbone.step_noise(x, rng)

    def G(x, t):  # the student: no two-branch CFG (cfg.student_guidance is 1, or FLUX's embedded guidance)
        return backbone.velocity(generator, x, t, cond, cfg.student_guidance)

    # backward simulation: steps 1..k-1 without gradient; x_in is the input of the trained step k
    with autocast(cfg, device):
        x_in, t_in = generator_rollout(G, z, K, k, cfg.noise, draw)  # (B, *D), (B,)
    out = {"k": k, "nonfinite": []}

    # --- fake update(s): plain flow matching on generator samples (D9); + discriminator loss if data-aided (D16) --
    with torch.no_grad(), autocast(cfg, device):
        # stop-gradient: the fake network fits the generator's distribution, it must not move the generator
        x_g = generator_step(G, x_in, t_in).float()  # (B, *D); extra fake updates reuse it with fresh t and eps
    for _ in range(cfg.fake_updates):
        t = sample_t(B, cfg.t_dist, rng, device)  # (B,)
        eps = backbone.noise(x_g.shape, rng)  # (B, *D)
        with autocast(cfg, device), capture_features(fake) as hidden:
            v_fake = backbone.velocity(fake, add_noise(x_g, eps, t), t, cond, cfg.cfg_train_fake)
            loss_fake = flow_matching_loss(v_fake.float(), x_g.float(), eps, t).mean()
            if x0_real is not None:  # real samples noised with the same eps and t as the fakes
                backbone.velocity(fake, add_noise(x0_real, eps, t), t, cond, 1.0)
                loss_d = discriminator_loss(pooled_logits(hidden[-1], B), pooled_logits(hidden[0], B)).mean()
                loss_fake = loss_fake + loss_d
                out["loss_d"] = loss_d.item()
        if not runtime.update(loss_fake, fake, opt_fake):
            out["nonfinite"].append("fake")
        out["loss_fake"] = loss_fake.item()

    if not update_generator:
        return out

    # --- generator update (D11); + the adversarial term if data-aided (D16) ------------------------------------------
    t = sample_t(B, cfg.t_dist, rng, device)  # (B,)
    eps = backbone.noise(z.shape, rng)  # (B, *D)
    with autocast(cfg, device):
        x_g = generator_step(G, x_in, t_in).float()  # (B, *D) the ONLY step that carries gradient into G
        x_t = add_noise(x_g, eps, t)  # (B, *D) differentiable in x_g: SiD's gradient also flows through here
        # DMD uses the networks as fixed critics: no gradient through their inputs (D14)
        critic = torch.no_grad() if cfg.loss == "dmd" else contextlib.nullcontext()
        with critic, capture_features(fake) as hidden:
            x0_teacher = velocity_to_x0(x_t, t, backbone.velocity(teacher, x_t, t, cond, cfg.cfg_eval_real).float())
            x0_fake = velocity_to_x0(x_t, t, backbone.velocity(fake, x_t, t, cond, cfg.cfg_eval_fake).float())
    w = sid_weight(cfg.weighting, t, x_g, x0_teacher)  # (B,) no gradient
    if cfg.loss == "sid":
        loss_gen = sid_generator_loss(x_g, x0_teacher, x0_fake, cfg.alpha, w).mean()
    else:
        loss_gen = dmd_generator_loss(x_g, x0_teacher, x0_fake, w).mean()
    if gan_weight > 0:  # the fake network's features of the generator's x_t, from the call just made
        loss_gan = gan_generator_loss(pooled_logits(hidden[-1], B), w).mean()
        loss_gen = (1 - gan_weight) * loss_gen + gan_weight * loss_gan
        out["loss_gan"] = loss_gan.item()
    # gradient reaches the generator's weights ONLY: it flows back through both networks' inputs, but the update
    # differentiates with respect to the generator's weights alone (backward(inputs=...)), never the fake's
    if not runtime.update(loss_gen, generator, opt_gen):
        out["nonfinite"].append("generator")
    with torch.no_grad():
        # the diagnostic that means something: how far the fake network's posterior mean is from the teacher's
        out["score_gap"] = _sum_pixels((x0_teacher - x0_fake).float() ** 2).mean().item()
    out["loss_gen"] = loss_gen.item()
    return out


# ------------------------------------------------------------------------------------------------------------------
# 7. The loop: EMA, checkpoints (atomic, resumable), JSONL log, progress bar, non-finite policy
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


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a corrupt `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# config fields that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_FIELDS = ("iters", "out", "log_every", "save_every", "eval_every", "device", "progress")


def make_students(cfg, backbone):
    """(generator, fake, ema), all starting as the teacher (D13): three full copies ('full' mode; trainable weights
    in float32, or bf16 with --precision bf16), or three LoRA adapters on the teacher itself ('lora' mode)."""
    if cfg.mode == "lora":
        if not isinstance(backbone, DiTBackbone):
            raise UserError("--mode lora needs a diffusers teacher (the toy MLP trains in full mode)")
        generator, fake, ema = lora_students(backbone, cfg.lora_rank)
        return generator, fake, ema
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    generator, fake = backbone.trainable_copy(dtype), backbone.trainable_copy(dtype)
    return generator, fake, copy.deepcopy(generator).requires_grad_(False).eval()


def _state(net, opt, sharded):
    """Model and optimizer state to save: plain state dicts, or DCP's sharded ones under FSDP2."""
    if not sharded:
        return net.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return get_model_state_dict(net), (get_optimizer_state_dict(net, opt) if opt is not None else None)


def _load_state(net, opt, model_state, opt_state, sharded):
    if not sharded:
        net.load_state_dict(model_state)
        if opt is not None:
            opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    set_model_state_dict(net, model_state)
    if opt is not None:
        set_optimizer_state_dict(net, opt, opt_state)


def full_weights(net, runtime):
    """A plain (unsharded, CPU) copy of `net`'s weights on rank 0 -- a collective under FSDP2."""
    if runtime.world > 1 and any(hasattr(p, "to_local") for p in net.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def distill(cfg, backbone, on_eval=None, runtime=None):
    """Distil `backbone.teacher` into a K-step generator. Resumes from cfg.out's checkpoint when there is one.
    `on_eval(step, generator, ema)` is called (on every rank) every cfg.eval_every iterations and at the end.
    Returns dict(generator=, ema=, fake=, step=, skipped=)."""
    runtime = runtime or Runtime()
    torch.manual_seed(cfg.seed)  # every rank the same: identical initial weights (FSDP2 broadcasts nothing)
    generator, fake, ema = make_students(cfg, backbone)
    runtime.same_on_all_ranks([generator, fake, ema], "initial weights")
    sharded = runtime.world > 1 and cfg.mode == "full"
    if sharded:
        for net in (backbone.teacher, generator, fake, ema):
            shard(net)
    if cfg.grad_checkpointing:  # recompute activations in backward: memory for time, in all three networks
        for net in (generator, fake, backbone.teacher):
            net.enable_gradient_checkpointing()
    device = next(generator.parameters()).device
    adam = dict(betas=(0.0, 0.999), eps=cfg.adam_eps)  # beta1 = 0 as the official code: no momentum
    opt_gen = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_gen, **adam)
    opt_fake = torch.optim.Adam([p for p in fake.parameters() if p.requires_grad], lr=cfg.lr_fake, **adam)
    rng = torch.Generator(device).manual_seed(cfg.seed + runtime.rank)  # all random draws of the loop; per rank
    step, skipped, in_a_row = 0, 0, 0
    writer = runtime.rank == 0  # rank 0 alone writes files and logs

    # one checkpoint: a file (replicated state) or, under FSDP2, a torch.distributed.checkpoint folder
    ckpt_path = log_path = None
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        ckpt_path = os.path.join(cfg.out, "checkpoint" if sharded else "checkpoint.pt")
        log_path = os.path.join(cfg.out, "log.jsonl")
    if ckpt_path and os.path.exists(ckpt_path):
        if sharded:
            import torch.distributed.checkpoint as dcp
            ck = torch.load(os.path.join(ckpt_path, "meta.pt"), weights_only=False)
        else:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
                if k not in RESUMABLE_FIELDS and getattr(cfg, k, v) != v}
        if diff:
            raise UserError(f"{ckpt_path} was written with a different config "
                            f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                            "use another --out or the same settings")
        if ck["step"] > cfg.iters:
            raise UserError(f"{ckpt_path} is at iteration {ck['step']}, beyond --iters {cfg.iters}; use another --out")
        if sharded:  # fill the sharded state in place from the checkpoint folder
            state = {name: _state(net, opt, True) for name, net, opt in
                     (("generator", generator, opt_gen), ("fake", fake, opt_fake), ("ema", ema, None))}
            state = {k: {"model": m, "optim": o} if k != "ema" else {"model": m} for k, (m, o) in state.items()}
            # partial: Adam keeps no state for a parameter that never had a gradient (an unused embedder, say)
            dcp.load(state, checkpoint_id=ckpt_path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
            for name, net, opt in (("generator", generator, opt_gen), ("fake", fake, opt_fake), ("ema", ema, None)):
                _load_state(net, opt, state[name]["model"], state[name].get("optim"), True)
        else:
            _load_state(generator, opt_gen, ck["generator"], ck["opt_gen"], False)
            _load_state(fake, opt_fake, ck["fake"], ck["opt_fake"], False)
            _load_state(ema, None, ck["ema"], None, False)
        rng.set_state(ck["rng"][runtime.rank])
        torch.set_rng_state(ck["torch_rng"])
        step, skipped = ck["step"], ck["skipped"]
        if writer:
            print(f"resumed from {ckpt_path} at iteration {step}")
        if writer and os.path.exists(log_path):  # drop log lines written after the checkpoint: they are redone
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= step]
            with open(log_path, "w") as f:
                f.writelines(kept)

    def save():
        if not ckpt_path:
            return
        rngs = [rng.get_state()]
        if runtime.world > 1:
            import torch.distributed as dist
            rngs = [None] * runtime.world
            dist.all_gather_object(rngs, rng.get_state())
        meta = dict(rng=rngs, torch_rng=torch.get_rng_state(), step=step, skipped=skipped,
                    config=dataclasses.asdict(cfg))
        if not sharded:
            if writer:
                atomic_save(dict(meta, generator=generator.state_dict(), fake=fake.state_dict(), ema=ema.state_dict(),
                                 opt_gen=opt_gen.state_dict(), opt_fake=opt_fake.state_dict()), ckpt_path)
            return
        import shutil
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        tmp = f"{ckpt_path}.tmp"
        if writer and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        state = {"generator": dict(zip(("model", "optim"), _state(generator, opt_gen, True))),
                 "fake": dict(zip(("model", "optim"), _state(fake, opt_fake, True))),
                 "ema": {"model": _state(ema, None, True)[0]}}
        dcp.save(state, checkpoint_id=tmp)  # every rank writes its shards
        if writer:
            torch.save(meta, os.path.join(tmp, "meta.pt"))
            old = f"{ckpt_path}.old"
            if os.path.exists(ckpt_path):
                os.replace(ckpt_path, old)
            os.replace(tmp, ckpt_path)  # the new checkpoint is complete before it takes the name
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.iters, initial=step, disable=not (cfg.progress and writer),
               desc="SiD" if cfg.loss == "sid" else "DMD", dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.iters:
        scale = lr_scale(cfg, step)
        for opt, lr in ((opt_gen, cfg.lr_gen), (opt_fake, cfg.lr_fake)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        images_seen = step * cfg.batch_size * runtime.world
        m = sid_iteration(cfg, backbone, fake, generator, opt_fake, opt_gen, rng, images_seen, runtime)
        step += 1
        if m["nonfinite"]:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= cfg.max_nonfinite:
                raise FloatingPointError(
                    f"non-finite {' and '.join(m['nonfinite'])} loss at iteration {step} ({in_a_row} in a row, "
                    f"{skipped} skipped in all); the last good checkpoint is kept")
        else:
            in_a_row = 0
        ema_update(ema, generator, cfg.ema_decay, step)
        if writer and (step % cfg.log_every == 0 or step == cfg.iters):
            bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss_fake", "score_gap", "loss_gen", "loss_d") if k in m})
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
    if not sharded:
        runtime.same_on_all_ranks([generator, fake, ema], "final weights")
    return dict(generator=generator, ema=ema, fake=fake, step=step, skipped=skipped)


# ------------------------------------------------------------------------------------------------------------------
# 7b. Runtime: device, precision, ranks and sharding -- the losses and samplers never see any of it
# ------------------------------------------------------------------------------------------------------------------

def autocast(cfg, device):
    """bf16 autocast on CUDA when cfg.precision == 'bf16-autocast'; a no-op elsewhere (CPU runs in float32)."""
    if cfg.precision != "fp32" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Runtime:
    """Where the ranks live, so the math never sees them. One process: rank 0 of 1. Under torchrun: full mode shards
    every network with FSDP2 (gradients are reduce-scattered inside backward); LoRA mode keeps a replica of the
    adapters per rank and averages their gradients with an all-reduce -- data parallel as DDP does it, done by hand
    because DDP's wrapper expects every forward to be followed by a backward into its own weights, and SiD's
    generator phase runs the fake network forward without training it."""

    def __init__(self, rank=0, world=1, device=None, average_grads=False):
        self.rank, self.world, self.device, self.average_grads = rank, world, device, average_grads

    def all_finite(self, loss):
        """Skip decisions must agree on every rank (a backward is a collective under FSDP)."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def update(self, loss, net, opt):
        """One optimizer step of `net` on `loss`, differentiating with respect to net's trainable weights only.
        Returns False (and steps nothing) when the loss is not finite on some rank."""
        params = [p for p in net.parameters() if p.requires_grad]
        opt.zero_grad(set_to_none=True)
        if not self.all_finite(loss):
            return False
        loss.backward(inputs=params)
        if self.average_grads and self.world > 1:
            import torch.distributed as dist
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
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


def shard(net):
    """FSDP2: each transformer block its own unit, then the root (teacher, generator, fake and EMA alike)."""
    from torch.distributed.fsdp import fully_shard
    for child in net.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(net)
    return net


# ------------------------------------------------------------------------------------------------------------------
# 8. Config: one typed place for every default; presets by name override a few fields; the CLI is generated
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
# SANA's value and FLUX's guidance embedding its usual 3.5 -- starting points, not tuned by this project.
_DIT = dict(precision="bf16-autocast", batch_size=4, iters=20_000, save_every=500, eval_every=500, log_every=10)
_CFG45 = dict(cfg_train_fake=4.5, cfg_eval_fake=4.5, cfg_eval_real=4.5)
_FLUX = dict(cfg_train_fake=3.5, cfg_eval_fake=3.5, cfg_eval_real=3.5, student_guidance=3.5)
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
    # run_toy.py --dataset digits: a 3-block SANA DiT on 8x8 digits, the class as a one-token caption. The teacher is
    # guided (CFG 2) inside the generator loss; the fake network, which models the generator, runs unguided (CFG 2
    # on it as well gave a four-step FD of 87 against the guided teacher's 13: README, "Digits")
    "digits": dict(teacher="digits", train_step="last", iters=300, batch_size=128, lr_gen=1e-4, lr_fake=3e-4,
                   weighting="inv-l1", ema_decay=0.99, cfg_train_fake=1.0, cfg_eval_fake=1.0, cfg_eval_real=2.0,
                   out="out/digits", log_every=20, save_every=0, gan_weight=0.01),
    "sana-0.6b-512": dict(_DIT, **_CFG45, resolution=512, batch_size=8),
    "sana-1.6b-1024": dict(_DIT, **_CFG45, resolution=1024),
    "sd3-medium": dict(_DIT, **_CFG45, resolution=1024),
    "sd3.5-medium": dict(_DIT, **_CFG45, resolution=1024),
    "sd3.5-large": dict(_DIT, **_CFG45, resolution=1024),
    "flux-dev": dict(_DIT, **_FLUX, resolution=1024),
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
# 9. Teachers from disk or hub, the exported student, previews, and the command line
# ------------------------------------------------------------------------------------------------------------------

def resolve_teacher(name):
    """A preset name -> its hub id; an existing folder -> itself (it must hold model_index.json); 'owner/repo' -> a
    hub id. Returns (source, pipeline class name), read from model_index.json -- never guessed from the name."""
    src = HUB_IDS.get(name, name)
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


def teacher_dtype(cfg, device):
    return torch.bfloat16 if cfg.precision != "fp32" and device.type == "cuda" else torch.float32


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
        pipe = diffusers.DiffusionPipeline.from_pretrained(src, dtype=teacher_dtype(cfg, device))
    except (OSError, ValueError) as e:  # missing weights (a configs-only cache or folder), a broken pipeline
        raise UserError(f"cannot load the pipeline {src}: {' '.join(str(e).split())} (a cache or folder holding only "
                        "configs, such as assets/hf, serves --dry-run alone)")
    pipe.set_progress_bar_config(disable=True)
    resolution = cfg.resolution or (getattr(pipe.transformer.config, "sample_size", None) or 128) * pipe.vae_scale_factor
    backbone = FAMILIES[family](pipe, resolution, device, teacher_dtype(cfg, device))
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


def memory_plan(cfg, net, world_size=1):
    """Bytes per GPU of weights, gradients, optimizer state and an activation estimate for cfg (mode, precision,
    batch, resolution) on `world_size` GPUs. `net`: the transformer (meta device is enough).

    full: a frozen teacher + trainable generator and fake (master weights fp32, or bf16 with --precision bf16) + EMA,
          sharded over the GPUs by FSDP2 (divide by world_size).
    lora: one frozen base per GPU (DDP replicates it) + three adapters (generator, fake, ema), two of them trained.
    Adam keeps two moments per trainable parameter. Activations: a rough 16 bytes x tokens x width per layer and per
    sample for each network whose graph is alive in the generator phase (G, teacher, fake), times ~1/layers when
    gradient checkpointing keeps only block inputs."""
    P = sum(p.numel() for p in net.parameters())
    base_bytes = 4 if cfg.precision == "fp32" else 2
    train_bytes = 2 if cfg.precision == "bf16" else 4
    if cfg.mode == "lora":
        lora = sum(cfg.lora_rank * (m.in_features + m.out_features) for name, m in net.named_modules()
                   if isinstance(m, nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS))
        trainable, shard = 2 * lora, 1
        weights = P * base_bytes + 3 * lora * 4
    else:
        trainable, shard = 2 * P, world_size
        weights = P * base_bytes + 3 * P * train_bytes  # teacher + generator + fake + ema
    c = net.config
    width = c.get("num_attention_heads", 1) * c.get("attention_head_dim", 1)
    layers = c.get("num_layers", 1) + c.get("num_single_layers", 0)
    kind = type(net).__name__
    f = 32 if kind.startswith("Sana") else 8  # DC-AE (SANA) or KL VAE (SD3, FLUX): the spatial factor
    patch = c.get("patch_size", 1) * (2 if kind.startswith("Flux") else 1)  # FLUX packs 2x2 latents into a token
    tokens = (cfg.resolution // f // patch) ** 2 + 300  # image tokens + a typical text length
    per_layer = 16 * tokens * width * cfg.batch_size
    activations = 3 * per_layer * (2 if cfg.grad_checkpointing else layers)
    plan = dict(parameters=P, trainable=trainable, weights=weights / shard,
                gradients=trainable * (train_bytes if cfg.mode == "full" else 4) / shard,
                optimizer=2 * trainable * (train_bytes if cfg.mode == "full" else 4) / shard, activations=activations)
    plan["total"] = plan["weights"] + plan["gradients"] + plan["optimizer"] + activations
    return plan


def cmd_dry_run(cfg, world_size):
    src, _ = resolve_teacher(cfg.teacher)
    net = meta_transformer(src)
    plan = memory_plan(cfg, net, world_size)
    gib = 1 << 30
    print(f"memory plan per GPU: {cfg.teacher} ({type(net).__name__}, {plan['parameters'] / 1e9:.2f} B parameters), "
          f"mode {cfg.mode}, precision {cfg.precision}, {world_size} GPU(s), batch {cfg.batch_size}/GPU at "
          f"{cfg.resolution} px{', gradient checkpointing' if cfg.grad_checkpointing else ''}")
    print(f"  trainable parameters  {plan['trainable'] / 1e6:12.1f} M")
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        print(f"  {key:<20}  {plan[key] / gib:12.1f} GiB" + ("   (rough estimate)" if key == "activations" else ""))
    return plan


STUDENT_META = "sid_flow.json"  # written beside the exported pipeline: how to sample it


def export_student(backbone, net, cfg, folder):
    """Write a complete diffusers pipeline folder: the teacher's components, `net` as the transformer, and a
    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) without shift, which takes exactly the 'fresh'
    re-noising step (D13) when called with sigmas = generator_times(K). Written beside, then renamed into place."""
    import shutil
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True)
    base_dtype = next(backbone.teacher.parameters()).dtype
    plain = net.merged() if isinstance(net, AdapterView) else copy.deepcopy(net)  # LoRA: fused into the weights
    transformer = plain.to("cpu", base_dtype).eval()
    pipe = DiffusionPipeline.from_pretrained(backbone.source, transformer=transformer, scheduler=scheduler,
                                             dtype=base_dtype)
    tmp = f"{folder}.tmp{os.getpid()}"
    pipe.save_pretrained(tmp)
    if isinstance(net, AdapterView):  # the adapter alone too, loadable with load_lora_adapter()
        net.base.save_lora_adapter(os.path.join(tmp, "lora"), adapter_name=net.adapter)
    meta = dict(family=backbone.family, teacher=backbone.source, resolution=backbone.resolution, steps=cfg.steps,
                sigmas=generator_times(cfg.steps), guidance_scale=cfg.student_guidance,
                pipeline_kwargs=backbone.pipeline_kwargs, global_rng_step_noise=not backbone.step_noise_from_generator)
    with open(os.path.join(tmp, STUDENT_META), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def student_images(backbone, net, prompts, seed, steps, guidance):
    """The student's images for `prompts` with the stock pipeline's RNG use (one seed per call): initial latents
    from torch.Generator(device).manual_seed(seed); per-step noise from that generator (SANA) or from torch's global
    RNG seeded with `seed` (SD3, FLUX: their pipelines do not pass `generator` to the scheduler). (B, H, W, 3)."""
    torch.manual_seed(seed)
    g = torch.Generator(backbone.device).manual_seed(seed)
    cond = _cat([backbone.encode([p]) for p in prompts]) if backbone.bank is None else backbone.cond_for(
        [backbone.prompts.index(p) for p in prompts])
    z = backbone.noise((len(prompts), *backbone.sample_shape), g)
    x = generate(lambda x, t: backbone.velocity(net, x, t, cond, guidance), z, steps, "fresh",
                 lambda x: backbone.step_noise(x, g))
    return backbone.decode(x)


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
    runtime = setup_runtime(cfg)
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
        images = student_images(backbone, ema, preview, PREVIEW_SEED, cfg.steps, cfg.student_guidance)
        if runtime.rank == 0:
            save_grid(images, os.path.join(cfg.out, f"preview_{step:07d}.png"))

    res = distill(cfg, backbone, on_eval=on_eval, runtime=runtime)
    net = res["ema"] if cfg.ema_decay > 0 else res["generator"]
    if runtime.world > 1 and cfg.mode == "full":  # gather the shards into a plain transformer on rank 0
        weights = full_weights(net, runtime)
        if runtime.rank == 0:
            from diffusers import DiffusionPipeline
            net = DiffusionPipeline.from_pretrained(src).transformer
            net.load_state_dict(weights)
    if runtime.rank == 0:
        folder = export_student(backbone, net, cfg, os.path.join(cfg.out, "student"))
        print(f"student pipeline: {folder} (skipped non-finite iterations: {res['skipped']}; "
              f"{runtime.world} process(es))")
    if runtime.world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def cmd_export(out, weights, device_name):
    """Export OUT/student from OUT/checkpoint.pt (any checkpoint, not only a finished run)."""
    path, sharded = os.path.join(out, "checkpoint.pt"), os.path.join(out, "checkpoint")
    if os.path.isdir(sharded):  # an FSDP2 run's torch.distributed.checkpoint folder: gathered into one process
        import tempfile
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(sharded, os.path.join(tmp, "full.pt"))
            full = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=False)
        ck = dict(torch.load(os.path.join(sharded, "meta.pt"), weights_only=False),
                  generator=full["generator"]["model"], ema=full["ema"]["model"])
    elif os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=False)
    else:
        raise UserError(f"--out {out}: no checkpoint there (export reads the run folder of sid_flow.py)")
    if ck["config"]["teacher"] in ("toy", "digits"):
        raise UserError(f"--out {out}: a run_toy.py run (teacher {ck['config']['teacher']}); export writes diffusers "
                        "pipelines of image teachers, and this student's weights are already in its checkpoint.pt")
    cfg = Config(**{**ck["config"], "device": device_name})
    backbone = load_backbone(cfg, resolve_device(cfg.device))
    generator, _, ema = make_students(cfg, backbone)
    net = ema if weights == "ema" else generator
    net.load_state_dict(ck[weights])
    print(f"student pipeline ({weights}, iteration {ck['step']}):",
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
    cfg = Config(teacher=student, resolution=resolution or meta["resolution"], device=device_name)
    backbone = load_backbone(cfg, device, student, meta["family"])
    with torch.no_grad():
        images = student_images(backbone, backbone.teacher, [prompt], seed, meta["steps"], meta["guidance_scale"])
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
    a = vars(p.parse_args(argv))
    dry_run, world_size = a.pop("dry_run"), a.pop("world_size")
    if a["teacher"] is None:
        raise UserError(f"--teacher is required: a preset ({', '.join(HUB_IDS)}), a pipeline folder or a hub id")
    if a["teacher"] in PRESETS and a["teacher"] not in HUB_IDS:
        hint = " --dataset digits" if a["teacher"] == "digits" else ""
        raise UserError(f"--teacher {a['teacher']}: that teacher is trained by run_toy.py: "
                        f"run `python run_toy.py{hint}`")
    preset = a["teacher"] if a["teacher"] in PRESETS else None
    a["out"] = a["out"] or f"out/{_slug(a['teacher'])}"
    cfg = make_config(preset, **a)
    if dry_run:
        if not cfg.resolution:
            resolve_teacher(cfg.teacher)  # a misspelt name or an unreachable hub id says so first
            raise UserError(f"--dry-run needs --resolution for {cfg.teacher}, which is not a preset")
        return cmd_dry_run(cfg, world_size)
    return cmd_distill(cfg)


def _slug(name):
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
