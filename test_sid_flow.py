"""Tests read like proofs: each checks an identity of derivation.md (labels in the names' docstrings) against an
independent oracle -- closed-form Gaussian mixtures, autograd, Monte Carlo, brute force -- never a snapshot.

    python -m pytest -q test_sid_flow.py
"""

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import diffusers
import numpy as np
import peft
import pytest
import torch
import torch.utils.checkpoint
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import run_toy
import sid_flow as sf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
import bench  # noqa: E402  experiments/bench.py

torch.set_num_threads(1)  # 2-core CI: thread oversubscription makes tiny ops ~100x slower
HERE = os.path.dirname(os.path.abspath(__file__))
# SID_FLOW_TEST_DEVICE=cuda runs the pipeline tests (sections 7-9 and the bf16 and placement tests) on a GPU; the
# math tests stay on the CPU in float64/float32, and the two-process tests use gloo on the CPU (one GPU has no NCCL
# peer). TF32 is turned off so that the stock-pipeline comparisons keep their float32 tolerances.
DEVICE = os.environ.get("SID_FLOW_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
PATHS = [sf.FLOW, sf.VP]


@pytest.fixture(autouse=True)
def small_quality_sets(request, monkeypatch):
    """Runs with evaluations draw a reference set for their quality number (sid_flow section 14): a small one in the
    tests, except in the test of the number itself."""
    if "quality_number" not in request.node.name:
        monkeypatch.setattr(sf, "QUALITY_SIZE", 8)
        monkeypatch.setattr(sf, "REFERENCE_STEPS", 4)


# ------------------------------------------------------------------------------------------------------------------
# An analytic teacher: a Gaussian mixture, whose diffused density, score and E[x0 | x_t] are closed-form
# ------------------------------------------------------------------------------------------------------------------


class Mixture:
    """x0 ~ sum_k pi_k N(mu_k, sigma_k^2 I). Under x_t = a x0 + s eps each component stays Gaussian:
    N(a mu_k, (a^2 sigma_k^2 + s^2) I), with per-component posterior mean mu_k + a sigma_k^2 / var_k (x_t - a mu_k)."""

    def __init__(self, mu, sigma, pi):
        self.mu, self.sigma, self.pi = (torch.as_tensor(v, dtype=torch.float64) for v in (mu, sigma, pi))

    def sample(self, n, g):
        k = torch.multinomial(self.pi, n, replacement=True, generator=g)
        return self.mu[k] + self.sigma[k, None] * torch.randn(n, self.mu.shape[1], generator=g, dtype=torch.float64)

    def _parts(self, x_t, t, path):
        a, s, _, _ = sf.coefficients(path, t[:, None])  # (B, 1)
        var = a**2 * self.sigma[None] ** 2 + s**2  # (B, K)
        diff = x_t[:, None, :] - a[:, :, None] * self.mu[None]  # (B, K, D)
        d = self.mu.shape[1]
        logp = torch.log(self.pi)[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return a, var, diff, logp  # logp: (B, K) log of pi_k N(x_t; a mu_k, var_k)

    def log_p(self, x_t, t, path):
        return torch.logsumexp(self._parts(x_t, t, path)[3], dim=1)  # (B,)

    def posterior_mean(self, x_t, t, path):
        a, var, diff, logp = self._parts(x_t, t, path)
        r = torch.softmax(logp, dim=1)  # (B, K) responsibilities
        comp = self.mu[None] + (a * self.sigma[None] ** 2 / var)[:, :, None] * diff  # (B, K, D)
        return (r[:, :, None] * comp).sum(1)  # (B, D)

    def velocity(self, x_t, t, path):
        a, s, da, ds = sf.coefficients(path, t[:, None])
        x0 = self.posterior_mean(x_t, t, path)
        return da * x0 + ds * (x_t - a * x0) / s  # (D2) with E[eps | x_t] = (x_t - a E[x0|x_t]) / s


MIX = Mixture(mu=[[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]], sigma=[0.3, 0.6, 0.2], pi=[0.5, 0.3, 0.2])


def _noised(n=512, seed=0, path=sf.FLOW, mix=MIX):
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, eps, t, sf.add_noise(x0, eps, t, path)


# ------------------------------------------------------------------------------------------------------------------
# 1. Conventions and path algebra (D1)-(D7)
# ------------------------------------------------------------------------------------------------------------------


def test_conventions():
    """(D1), (D2), (D15): t = 1 is noise, t = 0 is data, v = eps - x0, generator times 1, .75, .5, .25."""
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(sf.add_noise(x0, eps, torch.ones(4)), eps)
    assert torch.equal(sf.add_noise(x0, eps, torch.zeros(4)), x0)
    assert torch.allclose(sf.velocity_target(x0, eps, torch.rand(4)), eps - x0)
    assert sf.generator_times(4) == [1.0, 0.75, 0.5, 0.25] and sf.generator_times(1) == [1.0]


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_conversions_round_trip(path):
    """(D4), (D5), (D3) in float64: from the true (x0, eps) -> v, every conversion recovers them exactly."""
    x0, eps, t, x_t = _noised(path=path)
    v = sf.velocity_target(x0, eps, t, path)
    assert torch.allclose(sf.velocity_to_x0(x_t, t, v, path), x0, atol=1e-10)
    assert torch.allclose(sf.velocity_to_eps(x_t, t, v, path), eps, atol=1e-10)
    assert torch.allclose(sf.x0_to_velocity(x_t, t, x0, path), v, atol=1e-9)
    score = sf.velocity_to_score(x_t, t, v, path)
    assert torch.allclose(sf.score_to_x0(x_t, t, score, path), x0, atol=1e-9)
    # shapes: t (B,) broadcasts over image-like samples
    img = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    assert sf.velocity_to_x0(img, torch.rand(3, dtype=torch.float64), img).shape == img.shape


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_gaussian_mixture_closed_form(path):
    """(D3)-(D5) against an analytic teacher: velocity_to_x0 of the exact velocity is the exact E[x0|x_t], and
    velocity_to_score is the autograd gradient of the exact log-density."""
    _, _, t, x_t = _noised(path=path)
    v = MIX.velocity(x_t, t, path)
    assert torch.allclose(sf.velocity_to_x0(x_t, t, v, path), MIX.posterior_mean(x_t, t, path), atol=1e-10)
    x = x_t.clone().requires_grad_(True)
    (score_autograd,) = torch.autograd.grad(MIX.log_p(x, t, path).sum(), x)
    assert torch.allclose(sf.velocity_to_score(x_t, t, v, path), score_autograd, atol=1e-8)


def test_flow_to_vp_snr_map():
    """(D7): the flow-matching state and its VP image under the SNR map have the same posterior mean, computed
    independently from the mixture under each path."""
    _, _, t, x_t = _noised(path=sf.FLOW)
    x_vp, tau = sf.flow_to_vp(x_t, t)
    a, s, _, _ = sf.coefficients(sf.VP, tau)
    assert torch.allclose(a / s, (1 - t) / t)  # same signal-to-noise ratio
    assert torch.allclose(MIX.posterior_mean(x_vp, tau, sf.VP), MIX.posterior_mean(x_t, t, sf.FLOW), atol=1e-10)


def test_loss_weighting():
    """(D6): |v_hat - v|^2 = |x0_hat - x0|^2 / t^2 for any velocity prediction."""
    x0, eps, t, x_t = _noised()
    v_hat = torch.randn_like(x0)
    lhs = sf.flow_matching_loss(v_hat, x0, eps, t)
    rhs = ((sf.velocity_to_x0(x_t, t, v_hat) - x0) ** 2).sum(1) / t**2
    assert torch.allclose(lhs, rhs)


def test_fake_loss_minimiser():
    """(D8)/(D9): the flow-matching loss is minimised by the exact E[v | x_t]: the mixture's velocity beats any
    perturbation of it (the excess equals the perturbation's squared norm, by orthogonality)."""
    n = 200_000
    x0, eps, t, x_t = _noised(n=n, seed=1)
    v_star = MIX.velocity(x_t, t, sf.FLOW)
    delta = 0.1 * torch.sin(3 * x_t)  # any perturbation, a function of x_t only
    excess = sf.flow_matching_loss(v_star + delta, x0, eps, t) - sf.flow_matching_loss(v_star, x0, eps, t)
    cross = excess - (delta**2).sum(1)  # 2 delta . (v* - target): zero mean because v* = E[target | x_t]
    assert abs(cross.mean()) < 4 * cross.std() / math.sqrt(n)
    assert excess.mean() > 10 * cross.std() / math.sqrt(n)  # the perturbation is measurably worse


# ------------------------------------------------------------------------------------------------------------------
# 2. SiD: the score identity and the generator loss (D11)-(D16)
# ------------------------------------------------------------------------------------------------------------------


def test_score_identity_monte_carlo():
    """(D11) by Monte Carlo: E[u(x_t)^T E_g[x0|x_t]] = E[u(x_t)^T x_g] for a nonlinear u, and the rewritten Fisher
    divergence E (f_phi - f_g)^T (f_phi - x_g) equals the direct E |f_phi - f_g|^2 (teacher = another mixture)."""
    n = 400_000
    x_g, _, t, x_t = _noised(n=n, seed=2)  # the "generator" is MIX
    u = torch.tanh(x_t @ torch.tensor([[0.7, -0.3], [0.2, 0.9]], dtype=torch.float64)) + 0.1 * x_t
    f_g = MIX.posterior_mean(x_t, t, sf.FLOW)
    lhs, rhs = (u * f_g).sum(1), (u * x_g).sum(1)
    se = (lhs - rhs).std() / math.sqrt(n)
    assert abs(lhs.mean() - rhs.mean()) < 4 * se
    teacher = Mixture(mu=[[-1.5, 0.5], [1.5, 1.5], [0.0, -2.0]], sigma=[0.4, 0.5, 0.3], pi=[0.4, 0.4, 0.2])
    f_phi = teacher.posterior_mean(x_t, t, sf.FLOW)
    direct = ((f_phi - f_g) ** 2).sum(1)
    identity = ((f_phi - f_g) * (f_phi - x_g)).sum(1)
    se = (direct - identity).std() / math.sqrt(n)
    assert abs(direct.mean() - identity.mean()) < 4 * se
    assert direct.mean() > 20 * se  # the check is not vacuous


@pytest.mark.parametrize("alpha", [1.0, 1.2, 0.5])
def test_generator_loss_gradient(alpha):
    """(D13) autograd against the hand-derived gradient (derivation.md section 3) with linear teacher and fake
    networks; (D16) DMD's gradient is w (x0_fake - x0_teacher) on x_g alone."""
    g = torch.Generator().manual_seed(3)
    B, D = 8, 5
    A_T, A_F = (torch.randn(D, D, generator=g, dtype=torch.float64) for _ in range(2))
    b_T, b_F = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(2))
    x_g = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64)
    x_t = sf.add_noise(x_g, eps, t)
    f_T, f_F = x_t @ A_T.T + b_T, x_t @ A_F.T + b_F
    (grad,) = torch.autograd.grad(sf.sid_generator_loss(x_g, f_T, f_F, alpha, w).sum(), x_g)
    gap, J = f_T - f_F, A_T - A_F
    r = (f_T - x_g) - alpha * gap
    c = (1 - t)[:, None]
    hand = w[:, None] * (c * r @ J + c * gap @ A_T - gap - alpha * c * gap @ J)
    assert torch.allclose(grad, hand.detach(), atol=1e-10)
    # DMD
    x_t = sf.add_noise(x_g, eps, t)
    f_T, f_F = x_t @ A_T.T + b_T, x_t @ A_F.T + b_F
    (grad_dmd,) = torch.autograd.grad(sf.dmd_generator_loss(x_g, f_T, f_F, w).sum(), x_g)
    assert torch.allclose(grad_dmd, w[:, None] * (f_F - f_T).detach(), atol=1e-12)


def test_weightings_and_times():
    """(D14): every weighting is finite, positive and gradient-free; the logit-normal median is 2/3."""
    g = torch.Generator().manual_seed(4)
    t = sf.sample_t(100_000, g)
    assert abs(t.median().item() - 2 / 3) < 0.01 and t.min() > 0 and t.max() < 1
    x_g = torch.randn(16, 2, requires_grad=True)
    for name in sf.WEIGHTS:
        w = sf.sid_weight(name, t[:16], x_g, torch.randn(16, 2))
        assert w.shape == (16,) and torch.isfinite(w).all() and (w > 0).all() and not w.requires_grad
    with pytest.raises(ValueError):
        sf.sid_weight("nope", t[:16], x_g, x_g)


# ------------------------------------------------------------------------------------------------------------------
# 3. The few-step generator (D15)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_backward_simulation(k):
    """Steps 1..k-1 run without gradient; only step k carries gradient into the generator."""
    net = run_toy.ToyMLP(width=16, depth=2)
    calls = []

    def G(x, t):
        calls.append((torch.is_grad_enabled(), round(t[0].item(), 4)))
        return net(x, t)

    x_in, t_in = sf.generator_rollout(G, torch.randn(6, 4, 2), k, "fresh")
    x_g = sf.generator_step(G, x_in, t_in)
    assert calls == [(False, 1.0 - j / 4) for j in range(k - 1)] + [(True, 1.0 - (k - 1) / 4)]
    assert not x_in.requires_grad and x_g.requires_grad
    x_g.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("mode", ["fresh", "fixed", "ddim"])
def test_rollout_noise_modes(mode):
    """The roll-out written out by hand for K = 4, k = 3 (D15): x_1 = z; x0_j = x_j - t_j G(x_j, t_j); the next input
    (1 - t) x0_j + t n with n the step's own draw (fresh), z (fixed), or (x_j - (1 - t_j) x0_j) / t_j (ddim)."""
    torch.manual_seed(0)
    net, noises = run_toy.ToyMLP(width=16, depth=2), torch.randn(5, 4, 2)
    z, x, t = noises[:, 0], noises[:, 0], 1.0
    with torch.no_grad():
        for j, t_next in ((1, 0.75), (2, 0.5)):
            x0 = x - t * net(x, torch.full((5,), t))
            n = {"fresh": noises[:, j], "fixed": z, "ddim": (x - (1 - t) * x0) / t}[mode]
            x, t = (1 - t_next) * x0 + t_next * n, t_next
        got, t_in = sf.generator_rollout(net, noises, 3, mode)
    assert torch.allclose(got, x, atol=1e-6) and torch.equal(t_in, torch.full((5,), 0.5))


def test_euler_sample_integrates_from_noise_to_data():
    """The teacher's own sampler (the quality number's reference set) integrates dx/dt = v from t = 1, noise, to
    t = 0, data: for Gaussian data N(mu, s^2 I) the flow's map is z -> mu + s z (each x_t is (1 - t) mu +
    sqrt((1 - t)^2 s^2 + t^2) z along it), which 256 Euler steps reach to 1e-2."""
    gauss = Mixture(mu=[[1.0, -2.0]], sigma=[0.5], pi=[1.0])
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sf.euler_sample(lambda x_t, t: gauss.velocity(x_t, t, sf.FLOW), z, 256)
    assert torch.allclose(x, gauss.mu + 0.5 * z, atol=1e-2), (x - gauss.mu - 0.5 * z).abs().max()


def test_one_step_generator_is_x0_prediction():
    """K = 1: the generator's sample is x0_hat(G(z, 1)) = z - G(z, 1)."""
    net = run_toy.ToyMLP(width=16, depth=2)
    z = torch.randn(7, 2)
    with torch.no_grad():
        assert torch.allclose(sf.generate(lambda x, t: net(x, t), z[:, None]), z - net(z, torch.ones(7)))


# ------------------------------------------------------------------------------------------------------------------
# 4. The iteration against the official arithmetic, and the loop
# ------------------------------------------------------------------------------------------------------------------


def _tiny_backbone(seed=0, real=None):
    torch.manual_seed(seed)
    return sf.ToyBackbone(run_toy.ToyMLP(width=32, depth=2), real)


def _run(config, bb, on_eval=None):  # a run that writes config.out and resumes from it
    return sf.distill(config, bb, on_eval, sf.Checkpoints())


def _checkpoint(out):
    """A run's checkpoint as one dict: {name: {"model": state, "optim": state}} of its torch.distributed.checkpoint
    folder, read whole, with meta.pt's step, rng, skipped and config."""
    path = os.path.join(out, "checkpoint")
    dcp_to_torch_save(path, f"{path}.pt")
    return torch.load(f"{path}.pt", weights_only=False, map_location="cpu") | sf.read_meta(path)


def _cfg(tmp_path=None, **kw):
    base = dict(out=str(tmp_path) if tmp_path else "", iters=4, batch_size=64, save_every=0)
    return sf.make_config("toy", **{**base, **kw})


def _bce(logits, target):  # per sample: the mean over the logits of BCE-with-logits, clamped to [-10, 10] as official
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits.clamp(-10, 10), torch.full_like(logits, float(target)), reduction="none"
    ).mean(1)


# w(t) as the official loop writes it (sigma = t), each name's official one beside it: the denominators clipped at 1e-5
OFFICIAL_WEIGHTS = {
    "1-t": lambda t, l1: 1 - t,  # 1_minus_sigma
    "(1-t)^2": lambda t, l1: (1 - t) ** 2,  # 1_minus_sigma_squared
    "inv-l1": lambda t, l1: 1 / l1.clip(min=1e-5),  # sid_legacy
    "(1-t)/t": lambda t, l1: 1 / (t / (1 - t)).clip(min=1e-5),  # snr_sqrt
    "((1-t)/t)^2": lambda t, l1: 1 / ((t / (1 - t)) ** 2).clip(min=1e-5),  # snr
    "1/t": lambda t, l1: 1 / t.clip(min=1e-5),  # 1_over_sigma
    "1/t^2": lambda t, l1: 1 / (t**2).clip(min=1e-5),  # 1_over_sigma2
}
LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, in every family


class Official:
    """One SiD-DiT iteration as the official training loop computes it (ml-sid-dit: training/sid_dit_training_loop.py
    and its SD3 and FLUX twins), written from its formulas and run on networks of its own, never through sid_flow:
    stock diffusers transformers called directly (LoRA: a peft adapter on a copy of its own), the stock pipeline's
    prompt encoding, and its own CFG mix, guidance interval, FLUX guidance embedding, empty-prompt branch, micro-batch
    split, weightings and Adam step (torch's Adam, betas (0, 0.999)). Its inputs: the config, the networks' starting
    weights, and the iteration's raw global draws (prompt indices, noises, t, eps, real rows) and k. `family` None is
    the toy (an MLP called as net(x, t), no prompts)."""

    def __init__(self, config, nets, family=None, pipe=None, real=None):
        self.config, self.family, self.real = config, family, real
        self.teacher, self.generator, self.fake = nets
        self.autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if config.precision == "bf16-autocast"
            else contextlib.nullcontext()
        )
        if family is None:
            return
        with torch.no_grad():  # the stock pipeline's conditioning of every prompt, and of the empty prompt
            if family == "sana":  # the prompt behind the pipeline's complex human instruction; "" without it
                instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
                e, m, ue, um = pipe.encode_prompt(
                    TEST_PROMPTS, True, negative_prompt="", complex_human_instruction=instruction
                )
                self.cond, self.uncond = dict(embeds=e, mask=m), dict(embeds=ue[:1], mask=um[:1])
            elif family in ("sd3", "sd35"):
                e, ue, p, up = pipe.encode_prompt(TEST_PROMPTS, None, None, negative_prompt="")
                self.cond, self.uncond = dict(embeds=e, pooled=p), dict(embeds=ue[:1], pooled=up[:1])
            else:
                e, p, self.txt_ids = pipe.encode_prompt(TEST_PROMPTS)
                ue, up, _ = pipe.encode_prompt([""])
                self.cond, self.uncond = dict(embeds=e, pooled=p), dict(embeds=ue, pooled=up)
        self.vae_scale_factor = pipe.vae_scale_factor

    def call(self, net, x, t, c, g):
        """One stock transformer call on latents x (B, C, h, w) at t (B,), conditioning c, embedded guidance g."""
        if self.family is None:
            return net(x, t)
        if self.family == "sana":
            timestep = t * 1000 * net.config.timestep_scale
            return net(x, encoder_hidden_states=c["embeds"], encoder_attention_mask=c["mask"], timestep=timestep)[0]
        if self.family in ("sd3", "sd35"):
            return net(x, timestep=t * 1000, encoder_hidden_states=c["embeds"], pooled_projections=c["pooled"])[0]
        B, C, h, w = x.shape
        out = net(
            hidden_states=diffusers.FluxPipeline._pack_latents(x, B, C, h, w),
            timestep=t,
            guidance=torch.as_tensor(g, dtype=torch.float32).expand(B),
            pooled_projections=c["pooled"],
            encoder_hidden_states=c["embeds"],
            txt_ids=self.txt_ids,
            img_ids=diffusers.FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x.device, x.dtype),
        )[0]
        f = self.vae_scale_factor
        return diffusers.FluxPipeline._unpack_latents(out, h * f, w * f, f)

    def conditioning(self, prompts):
        if self.family is None:
            return None
        return {k: v[prompts] for k, v in self.cond.items()}

    def denoise(self, net, x, t, c, w, features=False, prompt_only=False):
        """sid_dit_denoise: w = 1: one conditional call; w = 0: the empty prompt's call (FLUX: the prompt's at
        embedded 0) unless features are wanted (then both branches run); else both branches [empty, prompt],
        v_u + w (v_c - v_u), FLUX's embedding at w in both; the logits: the prompt's half, pooled over tokens.
        sid-flow's interval: outside [guidance_t_min, guidance_t_max] a row's w is 1 (then every row runs both
        branches)."""
        config, B, flux = self.config, len(x), self.family == "flux"
        if config.guidance_t_min > 0 or config.guidance_t_max < 1:
            inside = (t >= config.guidance_t_min) & (t <= config.guidance_t_max)
            w = w if w == 1 else torch.where(inside, torch.full_like(t, w), torch.ones_like(t))  # (B,)
        seen = []
        head = net.head if self.family is None else net.proj_out
        hook = head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            if self.family is None or prompt_only or config.embedded_guidance_only:
                v = self.call(net, x, t, c, w)  # one branch: the prompt's
                h = seen[-1]
            elif not torch.is_tensor(w) and (w == 1 or (w == 0 and not features)):
                u = {k: val.expand(B, *val.shape[1:]) for k, val in self.uncond.items()}
                v = self.call(net, x, t, c if w == 1 or flux else u, w)
                h = seen[-1]
            else:
                u = {k: val.expand(B, *val.shape[1:]) for k, val in self.uncond.items()}
                both = {k: torch.cat([u[k], c[k]]) for k in c}
                g = torch.cat([w, w]) if torch.is_tensor(w) else w
                v_u, v_c = self.call(net, torch.cat([x, x]), torch.cat([t, t]), both, g).chunk(2)
                wv = w.view(-1, *[1] * (x.dim() - 1)) if torch.is_tensor(w) else w
                v, h = v_u + wv * (v_c - v_u), seen[-1][B:]  # the prompt's half
        finally:
            hook.remove()
        assert len(seen) == 1
        logits = (h.mean(1) if h.dim() == 3 else h).float()  # pooled over tokens: (B, C)
        return v.float(), logits

    def images(self, G, d, k, grad):
        """sid_dit_generate: k of K steps at t_i = 1 - i/K from the initial noise, re-noised between steps; only the
        last step with gradient, when `grad`. The student is called unguided (FLUX: embedded 1; with
        --embedded-guidance-only at the teacher's scale)."""
        config, noises, c = self.config, d["noises"], d["cond"]
        K, z = noises.shape[1], noises[:, 0]
        g = config.guidance_eval_real if config.embedded_guidance_only else 1.0
        D_x, latents, t_prev = torch.zeros_like(z), z, 1.0
        for i in range(k):
            t = 1.0 - i / K
            ddim = (latents - (1.0 - t_prev) * D_x) / t_prev  # the noise the previous input implies
            noise = z if i == 0 else {"fresh": noises[:, i], "fixed": z, "ddim": ddim}[config.noise]
            latents = (1.0 - t) * D_x + t * noise
            with torch.set_grad_enabled(grad and i == k - 1):
                D_x = latents - t * self.call(G, latents, torch.full((len(z),), t), c, g).float()
            t_prev = t
        return D_x

    def micro(self, draws):
        """The global draws split into grad_accum micro-batches of batch_size rows, with their conditioning."""
        config, out = self.config, []
        for j in range(config.grad_accum):
            d = {k: v[j * config.batch_size : (j + 1) * config.batch_size] for k, v in draws.items()}
            d["cond"] = self.conditioning(d.get("prompt"))
            if "real" in d:  # an image-caption pair: its latents, its caption's conditioning
                d["x0_real"], d["cond_real"] = self.real[d["real"]].to(d["t"].device), self.conditioning(d["real"])
            elif "x0_real" in d:  # the toy's true samples, unconditional
                d["cond_real"] = None
            out.append(d)
        return out

    def fake_phase(self, draws, k):
        """Summed over micro-batches: mse(noise - images, output, 'sum') / batch_total, plus, data-aided,
        (BCE(real -> 1) + BCE(fake -> 0)) / 2 * C*H*W summed / batch_total. Returns {name: gradient}."""
        config, total = self.config, self.config.batch_size * self.config.grad_accum
        params = _trainable(self.fake)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for d in self.micro(draws):
            with self.autocast:
                images, t, noise = self.images(self.generator, d, k, False), d["t"], d["eps"]
                tv = t.view(-1, *[1] * (images.dim() - 1))
                aided = "x0_real" in d
                output, logit_fake = self.denoise(
                    self.fake, (1 - tv) * images + tv * noise, t, d["cond"], config.guidance_train_fake, aided
                )
                loss = ((noise - images) - output).pow(2).sum() / total
                if aided:  # the real pairs, noised with the same noise and t; one branch at the fake's scale
                    r = d["x0_real"]
                    _, logit_real = self.denoise(
                        self.fake, (1 - tv) * r + tv * noise, t, d["cond_real"], config.guidance_train_fake, True, True
                    )
                    loss_D = (_bce(logit_real, 1) + _bce(logit_fake, 0)) / 2 * images[0].numel()
                    loss = loss + loss_D.sum() / total
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                grads[n] += g
        return grads

    def generator_phase(self, draws, k, gan):
        """Summed over micro-batches: sum((y_real - y_fake) ((y_real - images) - alpha (y_real - y_fake)) w) * 100 /
        batch_total; past 40k images 0.5 of it + 0.5 BCE(y_D -> 1) w C*H*W summed / batch_total."""
        config, total = self.config, self.config.batch_size * self.config.grad_accum
        params = _trainable(self.generator)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for d in self.micro(draws):
            with self.autocast:
                images, t, noise = self.images(self.generator, d, k, True), d["t"], d["eps"]
                tv = t.view(-1, *[1] * (images.dim() - 1))
                x_t = (1 - tv) * images + tv * noise
                v_real, _ = self.denoise(self.teacher, x_t, t, d["cond"], config.guidance_eval_real)
                v_fake, y_D = self.denoise(self.fake, x_t, t, d["cond"], config.guidance_eval_fake, gan)
            y_real, y_fake = x_t - tv * v_real, x_t - tv * v_fake
            l1 = (images - y_real).abs().flatten(1).mean(1)
            scale = OFFICIAL_WEIGHTS[config.weighting](t, l1).detach().view_as(tv)
            loss = ((y_real - y_fake) * ((y_real - images) - config.alpha * (y_real - y_fake)) * scale).sum()
            loss = loss * 100 / total
            if gan:
                loss_gan = (_bce(y_D, 1) * scale.flatten() * images[0].numel()).sum() / total
                loss = 0.5 * loss + 0.5 * loss_gan
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                grads[n] += g
        return grads

    @staticmethod
    def adam_step(weights, grads, lr):
        """The official optimizer's first step on {name: weight} with {name: gradient}: Adam, betas (0, 0.999), eps
        1e-8 (float32 weights). Returns the new weights."""
        params = {n: w.detach().clone().requires_grad_(True) for n, w in weights.items()}
        opt = torch.optim.Adam(list(params.values()), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        for n, p in params.items():
            p.grad = grads[n].to(p.dtype)
        opt.step()
        return params


def _recorded_iteration(sid, step):
    """Run sid.iteration(step), recording each update's micro-batch draws and the gradients its optimizer stepped
    with: ([(phase, [draws of each micro-batch], [gradients])], the iteration's diagnostics)."""
    phases, real_micro = [], sid.micro_batches

    def micro_batches():
        phases.append([])
        for d in real_micro():
            phases[-1].append(d)
            yield d

    sid.micro_batches, grads = micro_batches, []
    for name, opt in sid.optimizers.items():
        net = getattr(sid, name)
        opt.register_step_pre_hook(
            lambda *_, net=net: grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
        )
    out = sid.iteration(step)
    return list(zip(phases, grads, strict=True)), out


def _plain(name):  # a trainable weight's name without its adapter's: sid_flow's views and the oracle's copies alike
    return re.sub(r"\.(generator|fake|ema|default)\.", ".", name)


def _trainable(net):
    return {_plain(n): p for n, p in net.named_parameters() if p.requires_grad}


def _recorded_draws_and_gradients(sid, step):
    """sid.iteration(step), recording each update's raw GLOBAL draws (its micro-batches' rows, concatenated) and the
    gradients its optimizer stepped with, by weight name: ([draws], [gradients], the iteration's diagnostics)."""
    draws, grads, real_micro = [], [], sid.micro_batches

    def micro_batches():
        parts = []
        for d in real_micro():
            parts.append(d)
            yield d
        raw = [k for k in ("noises", "t", "eps", "prompt", "real") if k in parts[0]]
        raw += ["x0_real"] if "real" not in parts[0] and parts[0]["x0_real"] is not None else []  # the toy's
        draws.append({k: torch.cat([p[k] for p in parts]) for k in raw})

    sid.micro_batches = micro_batches
    for name, opt in sid.optimizers.items():
        net = getattr(sid, name)
        opt.register_step_pre_hook(
            lambda *_, net=net: grads.append({n: p.grad.clone() for n, p in _trainable(net).items()})
        )
    out = sid.iteration(step)
    return draws, grads, out


def _relative_error(got, want):  # {name: tensor} alike: |got - want| / |want| over all of them
    assert got.keys() == want.keys()
    a, b = (torch.cat([d[n].detach().flatten().float() for n in want]) for d in (got, want))
    assert b.norm() > 0
    return ((a - b).norm() / b.norm()).item()


def _check_against_official(sid, official, step, tol):
    """sid_flow's iteration `step` against the oracle's on the same raw draws and starting weights: each update's
    gradient to `tol` (relative to its norm), and each step's move to 1e-6 of it (the official Adam, from the
    gradient sid_flow stepped with: a first Adam step is nearly lr sign(g), so it would magnify rounding)."""
    start = {
        name: {n: p.detach().clone() for n, p in _trainable(getattr(sid, name)).items()} for name in sid.optimizers
    }
    draws, grads, out = _recorded_draws_and_gradients(sid, step)
    assert len(draws) == 2 and not torch.equal(draws[0]["t"], draws[1]["t"])  # each update: its own draws
    assert not torch.equal(draws[0]["noises"], draws[1]["noises"]) and not torch.equal(
        draws[0]["eps"], draws[1]["eps"]
    )
    images_seen = step * sid.config.batch_size * sid.config.grad_accum
    data_aided = "real" in draws[0] or "x0_real" in draws[0]
    assert not data_aided or images_seen > 20_000  # (before 20k images the generator waits: no update to compare)
    assert _relative_error(grads[0], official.fake_phase(draws[0], out["k"])) <= tol
    # the generator's update sees the fake network after its step: the official Adam's step with the gradient sid_flow
    # stepped with (equal to the oracle's, above; a first Adam step is nearly lr sign(g), which would magnify any
    # rounding between the two into a different fake network)
    with torch.no_grad():
        stepped = Official.adam_step(_trainable(official.fake), grads[0], sid.config.lr_fake)
        for n, p in _trainable(official.fake).items():
            p.copy_(stepped[n])
    gan = data_aided and images_seen > 40_000
    assert _relative_error(grads[1], official.generator_phase(draws[1], out["k"], gan)) <= tol
    # each optimizer's step: the official Adam from the starting weights with the gradient sid_flow stepped with
    for (name, lr), grad in zip((("fake", sid.config.lr_fake), ("generator", sid.config.lr_gen)), grads, strict=True):
        moved = {n: p - start[name][n] for n, p in _trainable(getattr(sid, name)).items()}
        want = {n: p - start[name][n] for n, p in Official.adam_step(start[name], grad, lr).items()}
        assert _relative_error(moved, want) <= 1e-6
    return out


@pytest.mark.parametrize("data_aided", [False, True])
@pytest.mark.parametrize("weighting", list(sf.WEIGHTS))
def test_toy_iteration_computes_the_official_iteration(weighting, data_aided):
    """One toy iteration, data-free and data-aided (the GAN term on: past 40k images), with two micro-batches per
    step, uniform k and every weighting, equals the official iteration (class Official) on the same draws: the fake
    network's gradient and step, then the generator's, through x_g AND both networks' inputs."""
    real = (lambda n, g: torch.randn(n, 2, generator=g, device=g.device) * 0.5 + 1.0) if data_aided else None
    bb = _tiny_backbone(real=real)
    config = _cfg(batch_size=16, grad_accum=2, weighting=weighting, alpha=1.2, noise="fresh", train_step="uniform")
    config = dataclasses.replace(config, fake_updates=1, lr_schedule="constant", seed=1)  # seed 1: k = 2 of 4
    sid = sf.SiD(config, bb, sf.Runtime())
    with torch.no_grad():  # a fake network unlike the teacher: a score gap to descend
        for p in sid.fake.parameters():
            p.add_(0.1 * torch.randn_like(p))
    nets = [copy.deepcopy(n) for n in (bb.teacher, sid.generator, sid.fake)]
    step = 2000 if data_aided else 0  # 2000 x 32 = 64k images: the generator trains with the GAN term
    out = _check_against_official(sid, Official(config, nets), step, 1e-5)
    assert out["k"] == 2 and ("loss_gan" in out) == data_aided and ("loss_d" in out) == data_aided


TRANSFORMERS = {"sana": "SanaTransformer2DModel", "sd3": "SD3Transformer2DModel", "sd35": "SD3Transformer2DModel"}
TRANSFORMERS["flux"] = "FluxTransformer2DModel"


def _official_nets(sid, family, path):
    """The oracle's own teacher, generator and fake network: stock transformers from the pipeline folder, the
    students' starting weights copied in (LoRA: a peft adapter of its own on each copy, trained in float32)."""
    config = sid.config
    dtype = torch.float32 if config.precision == "fp32" else torch.bfloat16  # sid-flow's teacher dtype (a departure)
    cls = getattr(diffusers, TRANSFORMERS[family])
    teacher = cls.from_pretrained(path, subfolder="transformer", torch_dtype=dtype).requires_grad_(False)
    nets = [teacher]
    for name in ("generator", "fake"):
        state = getattr(sid, name).state_dict()
        if config.mode == "full":
            net = cls.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32)
            net.load_state_dict(state)
            net.requires_grad_(True)
        else:
            net = cls.from_pretrained(path, subfolder="transformer", torch_dtype=dtype).requires_grad_(False)
            net.add_adapter(
                peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=LORA_MODULES)
            )
            for n, p in net.named_parameters():
                if "lora_" in n:
                    p.data = state[_plain(n)].detach().clone().float()
                    p.requires_grad_(True)
        nets.append(net.to(DEVICE).train())
    return nets


OFFICIAL_CASES = {  # each preset's own mode, guidance and step settings, on the tiny stand-in of its family
    "sana-full-interval": ("sana-0.6b-512", "sana", {}),
    "sana-full-every-t-data": ("sana-0.6b-512", "sana", dict(guidance_t_max=1.0, guidance_t_min=0.0, data=True)),
    "sd3-lora-interval-last-step": ("sd3-medium", "sd3", dict(train_step="last")),
    "sd3-lora-interval-data": ("sd3-medium", "sd3", dict(data=True)),
    "sd35-lora-every-t-data": ("sd3.5-medium", "sd35", dict(guidance_t_max=1.0, guidance_t_min=0.0, data=True)),
    "flux-lora-interval": ("flux-dev", "flux", {}),
    "flux-lora-every-t-data": ("flux-dev", "flux", dict(guidance_t_max=1.0, guidance_t_min=0.0, data=True)),
    "flux-lora-embedded-only": ("flux-dev", "flux", dict(embedded_guidance_only=True)),
    "sana-full-interval-data-bf16": ("sana-0.6b-512", "sana", dict(precision="bf16-autocast", data=True)),
    "flux-lora-interval-data-bf16": ("flux-dev", "flux", dict(precision="bf16-autocast", data=True)),
}
BF16_TOLERANCE = 5e-2  # bf16 autocast: the oracle's and sid_flow's bf16 roundings differ (op order, casts)


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_iteration_computes_the_official_iteration_per_preset(tiny, case):
    """One iteration of each preset's own configuration -- its mode (SANA full, SD3 / SD3.5 / FLUX LoRA, with the
    preset's gradient-checkpointed share), its guidance (CFG 4.5 or FLUX's 3.5, embedded and two-branch, in the
    interval [0.2, 0.6] or at every t; FLUX's --embedded-guidance-only), uniform k < K or the last step, data-free
    and data-aided with the GAN term on, float32 and bf16 autocast -- on a tiny stand-in of its family, with two
    micro-batches, equals the official iteration (class Official, which calls none of sid_flow) on the same draws:
    both updates' gradients and the weights their Adam steps leave. Data-aided, the discriminator's fake half reads
    the fake network's call on x_g, with its gradient (not another call of a layer the LoRA views share)."""
    preset, family, fields = OFFICIAL_CASES[case]
    fields = dict(fields)
    data_aided = fields.pop("data", False)
    fields = dict(precision="fp32") | fields
    config = sf.make_config(preset, teacher=tiny[family], resolution=FAMILY_RES[family], **fields)
    config = dataclasses.replace(config, batch_size=2, grad_accum=2, lora_rank=4, lr_gen=1e-3, lr_fake=1e-3, seed=1)
    config = dataclasses.replace(config, device=DEVICE, out="", alpha=1.2)  # seed 1: k = 2 of 4 (uniform)
    bb = sf.load_backbone(config, torch.device(DEVICE))
    bb.set_prompts(TEST_PROMPTS)
    if data_aided:  # latents of 3 "real" images, one per caption (the prompts)
        bb.real = torch.randn(len(TEST_PROMPTS), *bb.sample_shape, generator=torch.Generator().manual_seed(3))
    sid = sf.SiD(config, bb, sf.Runtime(torch.device(DEVICE)))
    g = torch.Generator().manual_seed(1)
    # students unlike the teacher: a score gap to descend, adapters that would show if swapped. Under bf16 a wider
    # gap: at a small one the generator's gradient is fragile (on tiny FLUX, rounding the fake network's weights to
    # bf16 alone moves it by 11% at a fake adapter of scale 0.1, by 2% at scale 1)
    scales = (
        dict(fake=0.1 if config.precision == "fp32" else 1.0, generator=0.1)
        if config.mode == "lora"
        else dict(fake=0.02)
    )
    with torch.no_grad():
        for name, scale in scales.items():
            for p in getattr(sid, name).parameters():
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny[family], torch_dtype=sf.teacher_dtype(config)).to(DEVICE)
    official = Official(config, _official_nets(sid, family, tiny[family]), family, pipe, bb.real)
    tol = 1e-5 if config.precision == "fp32" else BF16_TOLERANCE
    pooled, pooled_logits = [], sf.pooled_logits  # the hidden states the discriminator's logits are read from
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sf, "pooled_logits", lambda hidden, B: pooled.append(hidden) or pooled_logits(hidden, B))
        out = _check_against_official(sid, official, 10_001 if data_aided else 0, tol)  # 10,001 x 4 > 40k images
    # data-aided: real, fake (each micro-batch's fake update), then the GAN term's -- each a fake network's call with
    # its gradient (a generator roll-out's call, which shares LoRA's output projection, would have none)
    assert len(pooled) == (3 * config.grad_accum if data_aided else 0) and all(h.requires_grad for h in pooled)
    assert out["k"] == (4 if config.train_step == "last" else 2)
    assert ("loss_gan" in out) == data_aided and ("loss_d" in out) == data_aided


def test_generator_gradient_flows_through_the_networks_inputs():
    """SiD's gradient (D13) is not DMD's direction (x_g alone, D16), which a detached x_t would silently give: the
    input paths carry a real share of the generator's gradient."""
    bb = _tiny_backbone()
    config = _cfg(batch_size=32, weighting="1-t", train_step="last")
    grads = {}
    for loss in ("sid", "dmd"):
        sid = sf.SiD(dataclasses.replace(config, loss=loss), bb, sf.Runtime())
        with torch.no_grad():
            for p in sid.fake.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        recorded, _ = _recorded_iteration(sid, 0)
        grads[loss] = torch.cat([g.flatten() for g in recorded[-1][1]])  # the generator update's
    assert (grads["sid"] - grads["dmd"]).norm() > 0.1 * grads["sid"].norm()


def test_micro_batches_and_processes_give_the_update_of_one_batch():
    """--grad-accum: N micro-batches of B give the gradient of one batch of N B on the same draws (the global batch's
    rows are split, never redrawn), and so the same weights after a step; the GAN schedule counts global images."""
    bb = _tiny_backbone()
    outs = {}
    for B, N in ((32, 1), (16, 2), (8, 4)):
        sid = sf.SiD(_cfg(batch_size=B, grad_accum=N, train_step="uniform"), bb, sf.Runtime())
        recorded, out = _recorded_iteration(sid, 0)
        outs[N] = (recorded, sid.generator.state_dict(), out)
    (one, w_one, o_one) = outs[1]
    for N in (2, 4):
        many, w_many, o_many = outs[N]
        assert o_many["k"] == o_one["k"]
        for (draws_1, g_1), (draws_n, g_n) in zip(one, many, strict=True):
            for key in draws_1[0]:
                if torch.is_tensor(draws_1[0][key]):
                    torch.testing.assert_close(torch.cat([d[key] for d in draws_n]), draws_1[0][key])
            for a, b in zip(g_1, g_n, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        for key, v in w_one.items():
            torch.testing.assert_close(v, w_many[key], rtol=1e-4, atol=1e-6)


def test_adam_is_the_officials_without_momentum():
    """make_optimizers: Adam with betas (0, 0.999), as the official code: the second step moves a weight by
    lr g2 / (sqrt(v2 / (1 - 0.999^2)) + eps), v2 = 0.999 (1 - 0.999) g1^2 + (1 - 0.999) g2^2 -- no memory of g1 in
    the numerator. Checked on the weights, for both networks."""
    net = torch.nn.Linear(2, 1, bias=False)
    config = _cfg(lr_gen=0.1, lr_fake=0.01)
    opts = sf.make_optimizers(config, copy.deepcopy(net), copy.deepcopy(net))
    for name, lr in (("generator", 0.1), ("fake", 0.01)):
        opt = opts[name]
        (p,) = opt.param_groups[0]["params"]
        g1, g2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[-3.0, 0.5]])
        p.grad = g1
        opt.step()
        before = p.detach().clone()
        p.grad = g2
        opt.step()
        v2 = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
        step = lr * g2 / ((v2 / (1 - 0.999**2)).sqrt() + 1e-8)
        torch.testing.assert_close(before - p.detach(), step, rtol=1e-5, atol=1e-7)


def test_iteration_touches_only_what_it_should():
    """One iteration: teacher unchanged; generator and fake move; the generator phase puts no gradient into the fake
    network's weights (the fake's gradients after the iteration are exactly those its own update used)."""
    for loss in ("sid", "dmd"):
        bb = _tiny_backbone()
        sid = sf.SiD(_cfg(loss=loss, lr_gen=1e-3, lr_fake=1e-3), bb, sf.Runtime())
        teacher0 = {k: v.clone() for k, v in bb.teacher.state_dict().items()}
        seen = {}
        sid.optimizers["fake"].register_step_post_hook(
            lambda *_, seen=seen, fake=sid.fake: seen.update({n: p.grad.clone() for n, p in fake.named_parameters()})
        )
        gen0, fake0 = [{k: v.clone() for k, v in m.state_dict().items()} for m in (sid.generator, sid.fake)]
        m = sid.iteration(0)
        assert all(torch.equal(v, bb.teacher.state_dict()[k]) for k, v in teacher0.items())
        assert all(p.grad is None for p in bb.teacher.parameters())
        assert any(not torch.equal(v, sid.generator.state_dict()[k]) for k, v in gen0.items())
        assert any(not torch.equal(v, sid.fake.state_dict()[k]) for k, v in fake0.items())
        assert all(torch.equal(seen[n], p.grad) for n, p in sid.fake.named_parameters())
        assert m["nonfinite"] == [] and math.isfinite(m["score_gap"]) and m["k"] == 4  # toy preset: last step


class GuidanceSpy(sf.ToyBackbone):
    """The toy teacher, recording which network was called at which times with which CFG scale."""

    def __init__(self, teacher, real=None):
        super().__init__(teacher, real)
        self.calls = []

    def velocity(self, net, x_t, t, cond, guidance):
        self.calls.append((net, t.detach().clone(), guidance))
        return net(x_t, t)


def test_guidance_interval_reaches_every_call_as_configured():
    """(D18): each network call of an iteration gets its CFG scale from one rule. Without an interval the three
    scales arrive as the configured floats; with one, a call at t outside [guidance_t_min, guidance_t_max] gets 1 (the
    conditional velocity: the teacher's target is unguided there) and one inside gets its configured scale --
    Zero-CFG's 0 for the fake network's training, Anti-CFG's negative scale for its evaluation."""
    torch.manual_seed(0)
    scales = dict(guidance_train_fake=0.0, guidance_eval_fake=-1.0, guidance_eval_real=2.0)
    for interval in (dict(), dict(guidance_t_min=0.3, guidance_t_max=0.7)):
        bb = GuidanceSpy(run_toy.ToyMLP(width=16, depth=2))
        sid = sf.SiD(_cfg(batch_size=256, fake_updates=1, **scales, **interval), bb, sf.Runtime())
        sid.iteration(0)
        got = [(net, t, w) for net, t, w in bb.calls if net is not sid.generator]  # fake update, then teacher, fake
        assert [net for net, _, _ in got] == [sid.fake, bb.teacher, sid.fake]
        for (_, t, w), want in zip(got, [0.0, 2.0, -1.0], strict=True):
            if not interval:
                assert isinstance(w, float) and w == want
                continue
            inside = (t >= 0.3) & (t <= 0.7)
            assert 0 < inside.sum() < len(t)  # both kinds of rows are present
            assert torch.equal(w, torch.where(inside, torch.tensor(want), torch.tensor(1.0)))
        assert all(w == 1.0 for net, _, w in bb.calls if net is sid.generator)  # the student: no CFG
    assert sf.guidance_scale(3.0, torch.rand(4)) == 3.0
    with pytest.raises(sf.UserError, match="guidance interval"):
        sf.make_config("toy", guidance_t_min=0.8, guidance_t_max=0.2)


def test_data_aided_discriminator_reads_the_prompts_branch():
    """Data-aided SiD (D17), as the official code: the real samples are seen through the prompt's branch alone (the
    toy: scale 1; FLUX.1-dev: its embedding at the fake network's scale, checked against the official iteration),
    and the fake network's call on the generated ones keeps the prompt's branch even under Zero-CFG's batch-wide 0
    (both branches run: a per-sample scale of zeros); a guided fake network is called at its scale."""
    torch.manual_seed(0)
    for w in (0.0, 2.0):
        bb = GuidanceSpy(run_toy.ToyMLP(width=16, depth=2), real=lambda n, g: torch.randn(n, 2, generator=g))
        sid = sf.SiD(_cfg(batch_size=32, guidance_train_fake=w, fake_updates=1), bb, sf.Runtime())
        sid.iteration(0)  # images seen 0 < GAN_FREEZE_IMAGES: the fake update only
        (_, _, w_fake), (_, _, w_real) = [c for c in bb.calls if c[0] is sid.fake]
        assert w_real == 1.0
        assert torch.equal(w_fake, torch.zeros(32)) if w == 0 else w_fake == w


def test_ema_update_closed_form():
    """EMA with warm-up G: ema <- ema + (1 - d) (net - ema) with d = min(decay, (1 + step) / (G + step)), checked
    against that closed form early (warm-up active, G = 10 and the toy's 5), late (the configured decay), and with
    decay 0 (a copy)."""
    torch.manual_seed(0)
    ema, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for decay, warmup, step in ((0.99, 10, 5), (0.99, 5, 5), (0.9, 10, 10**6), (0.0, 10, 7)):
        before = [p.detach().clone() for p in ema.parameters()]
        d = min(decay, (1 + step) / (warmup + step))
        sf.ema_update(ema, net, decay, warmup, step)
        for b, p_ema, p in zip(before, ema.parameters(), net.parameters(), strict=True):
            assert torch.allclose(p_ema, b + (1 - d) * (p - b), atol=1e-7), (decay, warmup, step)
        assert decay == 0.0 or not torch.allclose(ema.weight, net.weight)


def test_iteration_averages_with_the_configured_warmup():
    """The loop's EMA is ema_update's with --ema-warmup G: after iteration 1 the EMA, which started as the teacher,
    is teacher + (1 - d) (generator - teacher), d = min(decay, 2 / (G + 1)): for the default G = 10 and the toy's 5."""
    for warmup in (10, 5):
        bb = _tiny_backbone()
        config = _cfg(iters=1, batch_size=16, ema_decay=0.99, ema_warmup=warmup)
        sid = sf.SiD(config, bb, sf.Runtime())
        sid.iteration(0)
        d = min(0.99, 2 / (warmup + 1))
        for p_ema, p, p_teacher in zip(
            sid.ema.parameters(), sid.generator.parameters(), bb.teacher.parameters(), strict=True
        ):
            assert torch.allclose(p_ema, p_teacher + (1 - d) * (p - p_teacher), atol=1e-7), warmup
        assert not torch.equal(sid.generator.head.weight, bb.teacher.head.weight)  # the generator moved


def test_resume_equals_uninterrupted(tmp_path, capsys):
    """A run stopped after 3 iterations and resumed to 6 ends with the same weights, EMA and optimizer state as an
    uninterrupted 6-iteration run with the same seed (uniform k, fresh noise: every RNG stream is restored). Under a
    cosine schedule, which --iters shapes, a resume with other --iters is refused."""
    bb = _tiny_backbone()  # constant rates: a cosine over --iters 3, then 6, is not the cosine over 6
    kw = dict(train_step="uniform", fake_updates=2, ema_decay=0.9, lr_schedule="constant")
    full = _run(_cfg(tmp_path / "a", iters=6, **kw), bb)
    _run(_cfg(tmp_path / "b", iters=3, **kw), bb)
    assert sf.read_meta(tmp_path / "b" / "checkpoint")["step"] == 3
    capsys.readouterr()
    resumed = _run(_cfg(tmp_path / "b", iters=6, **kw), bb)
    assert resumed["step"] == 6
    assert capsys.readouterr().out.splitlines() == [f"resumed from {tmp_path / 'b' / 'checkpoint'} at iteration 3"]
    for key in ("generator", "ema", "fake"):
        for (n, a), b in zip(full[key].state_dict().items(), resumed[key].state_dict().values(), strict=True):
            assert torch.equal(a, b), (key, n)
    ck_a, ck_b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    optim_a, optim_b = ck_a["generator"]["optim"]["state"], ck_b["generator"]["optim"]["state"]
    for a, b in zip(optim_a.values(), optim_b.values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert steps == sorted(set(steps))  # the resumed log has no duplicated iterations
    _run(_cfg(tmp_path / "c", iters=3), bb)  # the toy preset's cosine is shaped by --iters: no other on resume
    with pytest.raises(sf.UserError, match="iters: 3 -> 6"):
        _run(_cfg(tmp_path / "c", iters=6), bb)


def test_resume_refuses_a_different_config(tmp_path):
    bb = _tiny_backbone()
    _run(_cfg(tmp_path, iters=2), bb)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    with pytest.raises(sf.UserError, match="alpha"):
        _run(_cfg(tmp_path, iters=4, alpha=1.2), bb)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before


def test_resume_refuses_a_checkpoint_that_lacks_a_weight(tmp_path, monkeypatch):
    """Every network weight must be in the checkpoint a run resumes from: one that lacks a weight is refused in one
    line naming it (resuming would keep the teacher's value for it, silently), and the checkpoint is left as it was."""
    bb = _tiny_backbone()
    saved_state = sf.saved_state
    with monkeypatch.context() as m:  # a checkpoint written without the fake network's last bias
        m.setattr(sf, "saved_state", lambda sid: _without(saved_state(sid), "fake", "head.bias"))
        _run(_cfg(tmp_path, iters=2, lr_schedule="constant"), bb)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    with pytest.raises(sf.UserError, match="lacks the fake network's weight head.bias") as e:
        _run(_cfg(tmp_path, iters=4, lr_schedule="constant"), bb)
    assert len(str(e.value).splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before


def _without(state, name, key):  # a checkpoint's state, less one weight of one network
    model = {k: v for k, v in state[name]["model"].items() if k != key}
    return state | {name: dict(state[name], model=model)}


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    """A kill in mid-write leaves half a line at the end of OUT/log.jsonl: the resumed run drops it (its iteration is
    redone) and goes on, and every line of the log is whole again."""
    bb = _tiny_backbone()
    _run(_cfg(tmp_path, iters=2, lr_schedule="constant"), bb)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "time": 0.1, "loss_fa')
    assert _run(_cfg(tmp_path, iters=4, lr_schedule="constant"), bb)["step"] == 4
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [2, 4]


class NaNTeacher(sf.ToyBackbone):
    """A teacher that returns NaN velocities (the fake and generator copies stay finite)."""

    def velocity(self, net, x_t, t, cond, guidance):
        v = net(x_t, t)
        return v * float("nan") if net is self.teacher else v


def test_nonfinite_loss_stops_with_step_and_phase(tmp_path):
    """A non-finite loss skips the step; MAX_NONFINITE (3) in a row stop the run, naming the iteration and the phase,
    and the checkpoint on disk holds only finite weights."""
    torch.manual_seed(0)
    bb = NaNTeacher(run_toy.ToyMLP(width=16, depth=2))
    with pytest.raises(FloatingPointError, match=r"non-finite generator loss at iteration 3"):
        _run(_cfg(tmp_path, iters=10, save_every=1), bb)
    ck = _checkpoint(tmp_path)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["generator"]["model"].values())


# ------------------------------------------------------------------------------------------------------------------
# 5. The toy demo end to end, the metric and the command line
# ------------------------------------------------------------------------------------------------------------------


def test_energy_distance():
    """(D19): the projection formula equals the brute-force pairwise U- and V-statistics; ~0 for equal laws."""
    g = torch.Generator().manual_seed(0)
    x, y = run_toy.draw("checkerboard", 700, g), run_toy.draw("8gaussians", 500, g)

    def mean_dist(a, b, pairs):
        return torch.cdist(a.double(), b.double()).sum().item() / pairs

    brute_u = 2 * mean_dist(x, y, 700 * 500) - mean_dist(x, x, 700 * 699) - mean_dist(y, y, 500 * 499)
    brute_v = 2 * mean_dist(x, y, 700 * 500) - mean_dist(x, x, 700**2) - mean_dist(y, y, 500**2)
    assert abs(run_toy.energy_distance(x, y) - brute_u) < 5e-5 * brute_u  # 128-direction quadrature
    assert abs(run_toy.energy_distance(x, y, independent=False) - brute_v) < 5e-5 * brute_v
    same = run_toy.draw("checkerboard", 4000, g), run_toy.draw("checkerboard", 4000, g)
    assert abs(run_toy.energy_distance(*same)) < 3e-3


def test_qmc_estimate_is_far_less_noisy_than_iid():
    """The demo's randomised QMC estimate: independently scrambled Sobol replicates spread >= 30x less than the
    estimate from independent draws of the same size, and its bias (the V-statistic's) is below 2e-5 at 4096 points."""
    g = torch.Generator().manual_seed(0)
    iid = torch.tensor(
        [
            run_toy.energy_distance(run_toy.draw("checkerboard", 4096, g), run_toy.draw("checkerboard", 4 * 4096, g))
            for _ in range(6)
        ]
    )
    ev = run_toy.Evaluation("checkerboard", 4096, replicates=6)
    mean, se = ev.distance(ev.twin)  # another Sobol draw of the data against the reference: the floor
    assert 0 <= mean < 2e-5 and se * math.sqrt(6) * 30 < iid.std().item()
    noises = ev.inputs(0, 4)  # a 4-step sampler's inputs: z, then three re-noising draws, all different columns
    cols = [noises[:, j] for j in range(4)]
    assert noises.shape == (4096, 4, 2) and len({round(c.sum().item(), 4) for c in cols}) == 4


def test_toy_run_beats_teacher_at_same_steps(tmp_path, monkeypatch):
    """A seeded short run of the demo (small teacher, 300 iterations of the toy preset): the four-step student is
    within 1.75x of the 128-step teacher's distance, over twenty times closer to the data than the teacher sampled
    with four Euler steps, and every promised output is written."""
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")  # what run_toy.strict_sums sets, undone after the test
    monkeypatch.setitem(run_toy.TEACHER, "width", 64)
    monkeypatch.setitem(run_toy.TEACHER, "iters", 800)
    monkeypatch.setitem(run_toy.TEACHER, "batch", 512)
    m = run_toy.main(["--out", str(tmp_path), "--iters", "300", "--batch-size", "512", "--n-eval", "4096"])
    ed, se = m["energy_distance"], m["standard_error"]
    # measured with one thread: the EMA at 0.027x the 4-step teacher (1.24x the 128-step one), the raw generator at
    # 0.026x; with --seed 1 and 2 instead, the EMA at 1.41x and 1.25x, the raw generator at 0.026x and 0.033x
    assert ed["SiD (4 steps, EMA)"] < min(0.045 * ed["teacher 4 steps"], 1.75 * ed["teacher 128 steps"])
    assert ed["SiD (4 steps, raw)"] < 0.05 * ed["teacher 4 steps"]
    assert se["teacher 128 steps"] < 0.1 * ed["teacher 128 steps"]  # the uncertainty resolves the teacher's distance
    run = tmp_path / "checkerboard-batch-size-512-iters-300-n-eval-4096"
    assert m["folder"] == str(run)
    for name in ("data", "teacher_4", "teacher_128", "student"):
        arr = np.load(run / f"{name}.npy")
        assert arr.shape == (1024, 2) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert (run / "toy.png").stat().st_size > 10_000 and (run / "metrics.json").exists()
    png = (run / "toy.png").read_bytes()
    # the second run reuses the cached teacher and writes its own folder: the first run's figure stays
    m2 = run_toy.main(["--out", str(tmp_path), "--iters", "2", "--batch-size", "64", "--n-eval", "512"])
    assert m2["seconds"]["teacher"] == 0.0 and m2["folder"] != m["folder"] and (run / "toy.png").read_bytes() == png


def _cached_toy_teacher(out):
    """OUT with run_toy.py's teacher cached in it, untrained (its recipe, seed 0; the same weights at every call): a
    run there trains no teacher."""
    out.mkdir()
    recipe = dict(run_toy.TEACHER, dataset="checkerboard", seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = run_toy.ToyMLP(**{k: run_toy.TEACHER[k] for k in ("width", "depth", "fourier", "fourier_scale")})
    sf.atomic_save(dict(recipe=recipe, state=net.state_dict()), str(out / "teacher-checkerboard.pt"))
    return out


@pytest.mark.skipif(not torch.backends.mkl.is_available() or (os.cpu_count() or 1) < 2, reason="MKL, 2 cores")
def test_toy_run_is_the_same_at_any_thread_count(tmp_path):
    """The demo's student and table are the same to the bit at one and two threads: run_toy.strict_sums has MKL sum a
    matrix product in one order whatever the thread count, and no other step of the toy depends on it. The control:
    with MKL_CBWR=AUTO instead (which strict_sums keeps), MKL splits the weight gradients' sums over the batch among
    the threads, and the two students differ -- so the test would see the setting lost."""

    def run(threads, mkl_cbwr):  # -> (the student's samples, the printed distances)
        out = _cached_toy_teacher(tmp_path / f"{threads}-{mkl_cbwr}")
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | dict(OMP_NUM_THREADS=threads)
        env |= dict(MKL_NUM_THREADS=threads) | ({"MKL_CBWR": mkl_cbwr} if mkl_cbwr else {})
        r = subprocess.run(
            [sys.executable, os.path.join(HERE, "run_toy.py"), "--out", str(out), "--iters", "30", "--n-eval", "1024"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        run = out / "checkerboard-iters-30-n-eval-1024"
        return np.load(run / "student.npy"), json.load(open(run / "metrics.json"))["energy_distance"]

    (x1, ed1), (x2, ed2) = run("1", None), run("2", None)  # None: run_toy.py's own setting
    assert np.isfinite(x1).all() and np.array_equal(x1, x2) and ed1 == ed2
    if np.array_equal(run("1", "AUTO")[0], run("2", "AUTO")[0]):
        pytest.skip("MKL summed alike at one and two threads without the strict mode: nothing to tell apart here")


def test_toy_interrupt_then_same_command_continues(tmp_path):
    """Ctrl-C while the demo distils: one line says where it stopped and how to go on, exit status 130, and curve.json
    ends at the checkpointed iteration; the same command then finishes the run, its curve and log each step once."""
    out = _cached_toy_teacher(tmp_path / "o")
    cmd = [
        sys.executable,
        os.path.join(HERE, "run_toy.py"),
        "--out",
        str(out),
        "--iters",
        "600",
        "--batch-size",
        "32",
        "--n-eval",
        "256",
        "--eval-every",
        "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list(out.glob("runs/*/log.jsonl")):  # distilling
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    run = next(out.glob("runs/*"))
    step = sf.read_meta(run / "checkpoint")["step"]
    assert p.returncode == 130 and 5 <= step < 600, (p.returncode, err[-2000:])
    assert err.strip().splitlines() == [
        f"stopped at iteration {step} of 600; {run} holds it: run the same command to continue"
    ], err[-2000:]
    assert [q["step"] for q in json.load(open(run / "curve.json"))] == list(range(0, step + 1, 5))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and f"resumed from {run / 'checkpoint'} at iteration {step}" in r.stdout, r.stderr
    assert [q["step"] for q in json.load(open(run / "curve.json"))] == list(range(0, 601, 5))
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == list(range(5, 601, 5))


def test_toy_exact_teacher_velocity():
    """experiments/toy_exact_teacher.py: the checkerboard's closed-form E[x0 | x_t] agrees with a Monte-Carlo posterior
    mean within 5 of its standard errors and with Tweedie's formula (D3) on its closed-form density to 1e-10; the
    velocity (x_t - E[x0 | x_t]) / t is differentiable in x_t, as SiD's generator loss needs."""
    import toy_exact_teacher  # experiments/toy_exact_teacher.py

    mc_z, tweedie = toy_exact_teacher.check_exact_velocity(n_points=8, n_mc=200_000)
    assert mc_z < 5 and tweedie < 1e-10, (mc_z, tweedie)
    x_t = torch.randn(16, 2, requires_grad=True)
    v = toy_exact_teacher.ExactCheckerboard()(x_t, torch.full((16,), 0.3))
    (grad,) = torch.autograd.grad(v.sum(), x_t)
    assert v.shape == (16, 2) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_toy_output_folders_do_not_collide():
    """Every dataset, comparison and result-changing flag has its own results folder; I/O flags do not change it."""

    def name(*argv):
        return run_toy.run_name(*run_toy.parse_args(list(argv)))  # (args, the Config fields they set)

    names = [
        name(),
        name("--dataset", "moons"),
        name("--compare"),
        name("--data-aided"),
        name("--alpha", "1.2"),
        name("--weighting", "1/t"),
        name("--weighting", "1/t^2"),
        name("--n-eval", "4096"),
    ]
    assert len(set(names)) == len(names) and all("/" not in n and n not in (".", "..") for n in names)
    assert name() == "checkerboard" and name("--out", "x", "--save-every", "5", "--eval-every", "5") == "checkerboard"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "rings"], "invalid choice"),
        (["--alpha", "nan"], "--alpha must be finite"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--loss", "kl"], "invalid choice"),
        (["--mode", "lora"], "--mode is a sid_flow.py flag for image teachers"),
        (["--prompts", "p.txt"], "--prompts is a sid_flow.py flag for image teachers"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--dataset", "digits"], "invalid choice: 'digits'"),  # the digits benchmark is experiments/digits.py
        (["--guidance-study"], "unrecognized arguments: --guidance-study"),
    ],
)
def test_toy_cli_bad_values(tmp_path, args, message):
    """Bad flags: one line on stderr, exit status 2, nothing written (no teacher was trained)."""
    out = tmp_path / "o"
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_toy.py"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def _help_blocks(text):
    """{'--flag': its help text, joined onto one line} from argparse's --help output."""
    blocks, flag = {}, None
    for line in text.split("\n\n", 2)[2].splitlines():
        m = re.match(r"  (--[\w-]+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_cli_help_gives_every_flag_its_meaning_and_real_default():
    """--help of the scripts: each Config flag with its field's help -- words, not a symbol -- and the default each
    preset really gives it (sid_flow.py: every image preset and the plain Config for a folder or hub id; run_toy.py:
    the toy preset); run_toy.py offers none of sid_flow.py's image-teacher flags. sid_flow.py's lists the presets and
    the export command; its --teacher says it is required, not "[default: required]"."""
    helps = {f.name: f.metadata["help"] for f in sf.dataclasses.fields(sf.Config)}
    assert all(len(h.split()) >= 4 and "WEIGHTS" not in h for h in helps.values()), helps
    wide = dict(os.environ, COLUMNS="400")  # argparse wraps help at hyphens otherwise ("SiD- LSG")
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "sid_flow.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=wide,
    )
    blocks = _help_blocks(r.stdout)
    assert r.returncode == 0 and all(p in r.stdout for p in sf.HUB_IDS) and "sid_flow.py export" in r.stdout
    assert "(required)" in blocks["--teacher"] and "[default: required]" not in r.stdout
    for f in sf.dataclasses.fields(sf.Config):
        help = blocks["--" + f.name.replace("_", "-")]
        assert f.name in ("teacher", "out") or (" ".join(helps[f.name].split()) in help and "[default: " in help), help
        if f.name not in ("teacher", "out"):  # "[default: COMMON (label: value; ...)]" -> each preset's value
            common, _, rest = re.search(r"\[default: (.*)\]$", help).group(1).partition(" (")
            shown = dict(pair.split(": ", 1) for pair in rest.rstrip(")").split("; ") if pair)
            for preset in list(sf.HUB_IDS) + [None]:
                value = str(sf.PRESETS.get(preset, {}).get(f.name, f.default)) or "none"
                assert shown.get(preset or "a folder or hub id", common) == value, (f.name, preset, help)
    toy = sf.PRESETS["toy"]
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_toy.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=wide,
    )
    blocks = _help_blocks(r.stdout)
    assert r.returncode == 0 and "(default: None)" not in r.stdout
    for f in dataclasses.fields(sf.Config):
        flag = "--" + f.name.replace("_", "-")
        assert (flag in blocks) == (f.name not in run_toy.NOT_HERE), flag
        if flag in blocks:
            assert f"[default: {toy.get(f.name, f.default)}" in blocks[flag], blocks[flag]
    # run_toy.py's own help for two of them: OUT holds the teacher, the runs and the results (no exported student),
    # and --eval-every 0 means every tenth of --iters there, not never as in sid_flow.py
    assert "exported student" not in blocks["--out"] and "runs" in blocks["--out"]
    assert "every tenth of --iters" in blocks["--eval-every"] and "never" in blocks["--eval-every"]
    # experiments/digits.py: the digits preset's defaults; neither the image-teacher, guidance nor preview flags
    import digits  # experiments/digits.py

    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "experiments", "digits.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=wide,
    )
    blocks = _help_blocks(r.stdout)
    assert r.returncode == 0 and "(default: None)" not in r.stdout and "--guidance-study" in blocks
    assert digits.SKIP == run_toy.NOT_HERE + ("eval_every",) and "exported student" not in blocks["--out"]
    for f in dataclasses.fields(sf.Config):
        flag = "--" + f.name.replace("_", "-")
        assert (flag in blocks) == (f.name not in digits.SKIP), flag
        if flag in blocks:
            assert f"[default: {sf.PRESETS['digits'].get(f.name, f.default)}" in blocks[flag], blocks[flag]


def test_config_presets():
    """Defaults live in one place: presets override fields of Config, unknown fields are refused."""
    config = sf.make_config("toy")
    assert config.train_step == "last" and config.alpha == sf.Config.alpha
    with pytest.raises(sf.UserError):
        sf.make_config("toy", not_a_field=1)
    with pytest.raises(sf.UserError):
        sf.make_config("toy", weighting="1/t^3")


# ------------------------------------------------------------------------------------------------------------------
# 6. The code and the derivation agree
# ------------------------------------------------------------------------------------------------------------------


def test_derivation_labels():
    """Every (Dk) cited in the code exists in derivation.md; every name of its symbol table exists, whole, where the
    table says (a dotted name is an attribute of what precedes it: `SiD.iteration`); every test it names exists."""
    import digits  # experiments/digits.py

    doc = open(os.path.join(HERE, "derivation.md")).read()
    code = "".join(
        open(os.path.join(HERE, f)).read()
        for f in ("sid_flow.py", "run_toy.py", "experiments/digits.py", "experiments/bench.py")
        if os.path.exists(os.path.join(HERE, f))
    )
    cited = set(re.findall(r"\(D\d+\)", code))
    assert cited and cited <= set(re.findall(r"\(D\d+\)", doc)), cited - set(re.findall(r"\(D\d+\)", doc))
    table = doc[doc.index("## Symbol table") :]
    modules = {"run_toy.": run_toy, "digits.": digits, "bench.": bench}
    for row in table.splitlines()[3:]:
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", row.split("|")[2]):
            module = next((m for prefix, m in modules.items() if name.startswith(prefix)), sf)
            parts = name.removeprefix(module.__name__ + ".").split(".")
            if not hasattr(
                module, parts[0]
            ):  # a variable of the code, e.g. `x0_teacher`, `config.alpha`: whole, in it
                assert re.search(rf"(?<![\w.]){re.escape(name)}\b", code), name
                continue
            obj = module
            for part in parts:  # a function, class, method or constant: the whole name, where the table puts it
                assert hasattr(obj, part), name
                obj = getattr(obj, part)
    tests = open(__file__).read()
    for name in set(re.findall(r"`(test_\w+)`", doc)):
        assert f"def {name}(" in tests, name


# ------------------------------------------------------------------------------------------------------------------
# 7. Real teacher families with tiny random weights, saved and loaded by path like a hub id
# ------------------------------------------------------------------------------------------------------------------

TEST_PROMPTS = ["a red fox in the snow", "a bowl of ramen", "an astronaut riding a horse"]
FAMILY_RES = {"sana": 32, "sd3": 32, "sd35": 32, "flux": 32}  # tiny VAEs: factor 2 (SANA) or 1 (SD3, FLUX)


def _tokenizer(max_len):
    """A word-level tokenizer built offline (no hub): lowercase words of the prompts, <s> ... </s> around them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in sf.DEFAULT_PROMPTS + TEST_PROMPTS for w in re.findall(r"\w+", p.lower())})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_len,
    )


def _clip(cls):
    from transformers import CLIPTextConfig

    return cls(
        CLIPTextConfig(
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            projection_dim=32,
        )
    )


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2
        )
    )


def _kl_vae(channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=channels,
        norm_num_groups=2,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _tiny_sana_transformer(num_layers, sample_size):  # 4 latent channels, width 16, a 16-wide caption
    return diffusers.SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=sample_size,
    )


def build_tiny_pipeline(family, folder):
    """A random-weight pipeline of the family, written with save_pretrained (the path a hub id resolves to)."""
    import diffusers as d
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if family == "sana":
        pipe = d.SanaPipeline(
            tokenizer=_tokenizer(300),
            text_encoder=Gemma2Model(
                Gemma2Config(
                    head_dim=8,
                    hidden_size=16,
                    intermediate_size=32,
                    num_attention_heads=2,
                    num_hidden_layers=1,
                    num_key_value_heads=2,
                    vocab_size=1000,
                    attn_implementation="eager",
                )
            ),
            vae=d.AutoencoderDC(
                in_channels=3,
                latent_channels=4,
                attention_head_dim=2,
                encoder_block_types=("ResBlock", "EfficientViTBlock"),
                decoder_block_types=("ResBlock", "EfficientViTBlock"),
                encoder_block_out_channels=(8, 8),
                decoder_block_out_channels=(8, 8),
                encoder_qkv_multiscales=((), (5,)),
                decoder_qkv_multiscales=((), (5,)),
                encoder_layers_per_block=(1, 1),
                decoder_layers_per_block=(1, 1),
                downsample_block_type="conv",
                upsample_block_type="interpolate",
                decoder_norm_types="rms_norm",
                decoder_act_fns="silu",
                scaling_factor=0.41407,
            ),
            transformer=_tiny_sana_transformer(num_layers=2, sample_size=16),
            scheduler=sched,
        )
    elif family in ("sd3", "sd35"):
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if family == "sd35" else {}
        pipe = d.StableDiffusion3Pipeline(
            transformer=d.SD3Transformer2DModel(
                sample_size=32,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=32,
                pooled_projection_dim=64,
                **extra,
            ),
            scheduler=sched,
            vae=_kl_vae(4),
            text_encoder=_clip(CLIPTextModelWithProjection),
            tokenizer=_tokenizer(77),
            text_encoder_2=_clip(CLIPTextModelWithProjection),
            tokenizer_2=_tokenizer(77),
            text_encoder_3=_t5(),
            tokenizer_3=_tokenizer(512),
        )
    elif family == "flux":
        pipe = d.FluxPipeline(
            scheduler=sched,
            vae=_kl_vae(4),
            text_encoder=_clip(CLIPTextModel),
            tokenizer=_tokenizer(77),
            text_encoder_2=_t5(),
            tokenizer_2=_tokenizer(512),
            transformer=d.FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                axes_dims_rope=[4, 4, 8],
                guidance_embeds=True,
            ),
        )
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {f: build_tiny_pipeline(f, root / f) for f in FAMILY_RES}


def _backbone(path, family, device=DEVICE, **kw):
    config = sf.make_config(None, teacher=path, resolution=FAMILY_RES[family], device=device, **kw)
    return sf.load_backbone(config, torch.device(device))


def _euler_pipe(path, stochastic=False):
    """The stock pipeline with a plain (or stochastic) unshifted flow-matching Euler scheduler."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=stochastic)
    pipe = DiffusionPipeline.from_pretrained(path, scheduler=sched)
    pipe.to(DEVICE).set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", list(FAMILY_RES))
def test_adapter_velocity_matches_stock_pipeline(tiny, family):
    """The adapter's velocity, with and without guidance, equals what the stock pipeline steps with: one Euler step
    of the unmodified pipeline from sigma t to 0 gives x - t v, so v = (x - out) / t. (The pipeline is the oracle
    for timestep scale, packing, ids, pooled projections, masks, SANA's prompt instruction and the CFG convention;
    FLUX.1-dev's official guidance is the pipeline's guidance_scale and its true CFG with the empty prompt at the
    same scale. A tiny SANA has no resolution bin: binning off, as it is a no-op at a real SANA's native size.)"""
    bb = _backbone(tiny[family], family)
    bb.set_prompts(TEST_PROMPTS[:1])
    assert bb.prompt_cache is not None and all(getattr(bb.pipe, n) is None for n in bb.text_encoders())  # freed
    pipe = _euler_pipe(tiny[family])
    res, t = FAMILY_RES[family], 0.6
    x = torch.randn(1, *bb.sample_shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for w in (1.0, 3.0):
        with torch.no_grad():
            v = bb.velocity(bb.teacher, x, torch.full((1,), t, device=DEVICE), bb.cond_for([0]), w)
        latents = sf.FluxBackbone.pack(x) if family == "flux" else x
        out = pipe(
            TEST_PROMPTS[0],
            height=res,
            width=res,
            sigmas=[t],
            latents=latents.clone(),
            guidance_scale=w,
            output_type="latent",
            **{"sana": dict(use_resolution_binning=False), "flux": dict(true_cfg_scale=w, negative_prompt="")}.get(
                family, {}
            ),
        ).images
        if family == "flux":
            out = sf.FluxBackbone.unpack(out, *bb.sample_shape[1:])
        assert torch.allclose(v, (x - out) / t, atol=2e-5), (w, (v - (x - out) / t).abs().max())


@pytest.mark.parametrize("family", ["sana", "sd3", "flux"])
def test_guided_velocity_per_sample_and_zero_cfg(tiny, family, monkeypatch):
    """(D18): a per-sample scale (a guidance interval) gives each row the velocity of its own float scale -- through
    the second branch (FLUX: and its guidance embedding); a batch-wide scale 0 is one call that receives the empty
    prompt's conditioning alone (Zero-CFG), FLUX's the prompt's at embedded guidance 0 (the official code's)."""
    bb = _backbone(tiny[family], family)
    bb.set_prompts(TEST_PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *bb.sample_shape, generator=g).to(DEVICE)
    t, cond = torch.tensor([0.2, 0.5, 0.8, 0.9], device=DEVICE), bb.cond_for([0, 1, 0, 1])
    w = sf.guidance_scale(3.0, t, 0.4, 0.85)  # rows 1, 2 guided
    with torch.no_grad():
        v = bb.velocity(bb.teacher, x, t, cond, w)
        v1, v3 = (bb.velocity(bb.teacher, x, t, cond, s) for s in (1.0, 3.0))
        v0_two_branch = bb.velocity(bb.teacher, x, t, cond, torch.zeros(4, device=DEVICE))
        seen = []
        forward = bb.forward
        monkeypatch.setattr(bb, "forward", lambda net, x_t, t_, c, w_: seen.append(c) or forward(net, x_t, t_, c, w_))
        v0 = bb.velocity(bb.teacher, x, t, cond, 0.0)
    assert torch.allclose(v[[0, 3]], v1[[0, 3]], atol=1e-5) and torch.allclose(v[1:3], v3[1:3], atol=1e-5)
    assert not torch.allclose(v1, v3, atol=1e-3)  # guidance changes the velocity: the check above can fail
    want = cond if family == "flux" else {k: bb.uncond[k].expand_as(cond[k]) for k in cond}
    assert len(seen) == 1 and all(torch.equal(seen[0][k], want[k]) for k in cond)
    assert torch.allclose(v0, v0_two_branch, atol=1e-5) == (family != "flux")


def test_flux_packing_matches_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 6)
    assert torch.equal(sf.FluxBackbone.pack(x), packed)
    assert torch.equal(sf.FluxBackbone.unpack(packed, 8, 6), x)


def test_a_model_family_is_one_subclass_and_a_preset(tiny, tmp_path, monkeypatch):
    """A new model family is one DiTBackbone subclass naming its pipeline class (its facts as class attributes, its
    encode and forward), plus a preset: no other edit. Here a pipeline class of its own (the tiny SANA's, under
    another name) and a family written for it: one iteration runs through the command line's path and exports."""
    import shutil

    class TinyDiTPipeline(diffusers.SanaPipeline):
        pass

    monkeypatch.setattr(diffusers, "TinyDiTPipeline", TinyDiTPipeline, raising=False)  # as a library would add it
    monkeypatch.setattr(sf, "FAMILIES", dict(sf.FAMILIES))  # (the registration below ends with the test)
    folder = tmp_path / "tiny-dit"
    shutil.copytree(tiny["sana"], folder)
    index = json.load(open(folder / "model_index.json"))
    json.dump(index | {"_class_name": "TinyDiTPipeline"}, open(folder / "model_index.json", "w"))

    class TinyDiTBackbone(sf.DiTBackbone):
        pipeline = "TinyDiTPipeline"
        text_tokens = 300

        def encode(self, prompts):
            embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
            return {"embeds": embeds, "mask": mask}

        def forward(self, net, x_t, t, cond, guidance):
            return net(
                x_t,
                encoder_hidden_states=cond["embeds"],
                encoder_attention_mask=cond["mask"],
                timestep=t * 1000,
                return_dict=False,
            )[0]

    assert sf.FAMILIES["TinyDiTPipeline"] is TinyDiTBackbone
    monkeypatch.setitem(sf.PRESETS, "tiny-dit", dict(teacher=str(folder), iters=1, batch_size=2, save_every=0))
    config = sf.make_config("tiny-dit", out=str(tmp_path / "run"), device=DEVICE)
    sf.cmd_distill(config)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["step"] == 1 and math.isfinite(log[-1]["loss_gen"]) and math.isfinite(log[-1]["loss_fake"])
    student = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "student"))
    assert type(student) is TinyDiTPipeline


def test_importing_sid_flow_changes_nothing_in_the_process():
    """Importing the module leaves the process as it was -- warning filters, torch.compile's cache size, the choice of
    attention kernels --: a run makes its settings when it starts. (The libraries it imports are imported first.)"""
    code = (
        "import warnings, torch, torch._dynamo, torch.distributed.checkpoint, torch.distributed.fsdp\n"
        "import diffusers, peft, transformers, huggingface_hub, matplotlib.figure, tqdm.auto\n"
        "import peft.tuners.tuners_utils\n"
        "diffusers.SanaPipeline, diffusers.FluxPipeline, diffusers.StableDiffusion3Pipeline\n"
        "def state():\n"
        "    cudnn = torch.backends.cuda.cudnn_sdp_enabled()\n"
        "    return list(warnings.filters), torch._dynamo.config.cache_size_limit, cudnn\n"
        "before = state()\n"
        "import sid_flow\n"
        "assert state() == before, (state(), before)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, timeout=300)


def test_family_is_read_from_model_index(tiny, tmp_path):
    """A SANA pipeline saved under a FLUX-looking name is still SANA: the name is never used."""
    import shutil

    fake_name = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny["sana"], fake_name)
    assert sf.resolve_teacher(str(fake_name)) == (str(fake_name), sf.SanaBackbone)


@pytest.mark.parametrize("family", list(FAMILY_RES))
def test_sid_iterations_per_family_then_export_matches_sample(tiny, family, tmp_path):
    """A few SiD iterations on each family: the generator moves, the teacher does not. The exported OUT/student
    loads in the stock pipeline, whose 4-step images equal sid_flow's sampler's within 1e-4 (same prompt, seed)."""
    config = sf.make_config(
        None,
        teacher=tiny[family],
        resolution=FAMILY_RES[family],
        device=DEVICE,
        iters=2,
        batch_size=2,
        lr_gen=1e-3,
        lr_fake=1e-3,
        guidance_eval_real=2.0,
        guidance_eval_fake=2.0,
        guidance_train_fake=2.0,
        out=str(tmp_path / "run"),
        save_every=0,
        ema_decay=0.0,
        eval_every=2,
    )
    sf.cmd_distill(config)
    from diffusers import DiffusionPipeline

    teacher_disk = DiffusionPipeline.from_pretrained(tiny[family]).transformer.state_dict()
    student_dir = tmp_path / "run" / "student"
    student = DiffusionPipeline.from_pretrained(str(student_dir))
    student.set_progress_bar_config(disable=True)
    changed = [not torch.equal(v, student.transformer.state_dict()[k]) for k, v in teacher_disk.items()]
    student.to(DEVICE)
    assert any(changed)
    ck = _checkpoint(tmp_path / "run")
    assert ck["step"] == 2 and (tmp_path / "run" / "preview_0000002.png").exists()
    meta = json.load(open(student_dir / sf.STUDENT_META))
    assert meta["sigmas"] == [1.0, 0.75, 0.5, 0.25] and student.scheduler.config.stochastic_sampling
    # stock diffusers, seeded as the README says: generator for the initial noise, torch.manual_seed for SD3/FLUX steps
    seed, prompt, res = 7, TEST_PROMPTS[2], FAMILY_RES[family]
    torch.manual_seed(seed)
    stock = student(
        prompt,
        sigmas=meta["sigmas"],
        guidance_scale=meta["guidance_scale"],
        height=res,
        width=res,
        generator=torch.Generator(DEVICE).manual_seed(seed),
        output_type="np",
        **(dict(use_resolution_binning=False) if family == "sana" else {}),  # (tiny: no bin; see above)
    ).images
    bb = _backbone(str(student_dir), family)
    ours = _seeded_images(bb, prompt, seed, meta["steps"], meta["guidance_scale"])
    assert stock.shape == ours.shape == (1, res, res, 3)
    assert abs(stock - ours).max() < 1e-4
    # on-demand export from the checkpoint: the raw generator's weights, loadable by the stock pipeline
    sf.cmd_export(str(tmp_path / "run"), "generator", DEVICE)
    again = DiffusionPipeline.from_pretrained(str(student_dir)).transformer.state_dict()
    assert all(torch.equal(v, ck["generator"]["model"][k]) for k, v in again.items())


def _seeded_images(bb, prompt, seed, steps, guidance):
    """sid_flow's K-step sampler of bb.teacher, seeded as the stock pipeline draws for one seed: the initial latents
    from
    a generator seeded so; the per-step noise from it (SANA) or, as the stock pipeline draws it from torch's global RNG
    after torch.manual_seed(seed) (SD3, FLUX), from a second generator seeded alike. Decoded: (1, H, W, 3)."""
    g = torch.Generator(bb.device).manual_seed(seed)
    g_steps = g if bb.step_noise_from_generator else torch.Generator(bb.device).manual_seed(seed)
    cond, shape = bb.encode([prompt]), (1, *bb.sample_shape)
    noises = torch.stack([bb.noise(shape, g)] + [bb.step_noise(shape, g_steps) for _ in range(steps - 1)], 1)
    x = sf.generate(lambda x, t: bb.velocity(bb.teacher, x, t, cond, guidance), noises, "fresh")
    return bb.decode(x.float())


def test_hub_errors_say_why(monkeypatch):
    """A hub file that cannot be read: one line saying why -- no route to the hub, or the hub's own answer (a missing
    file is not called an unreachable hub, though the hub client raises it as an OSError too)."""
    monkeypatch.setattr(sf.huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def download(repo, filename, local_files_only=False):  # not cached; the hub says the file is missing
        raise FileNotFoundError("not cached") if local_files_only else OSError("404 Client Error: Entry Not Found")

    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(sf.huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(sf.socket, "create_connection", no_route)
    with pytest.raises(sf.UserError, match="the hub .* is unreachable .*Network is unreachable"):
        sf._hub_file("owner/repo", "model_index.json")
    monkeypatch.setattr(sf.socket, "create_connection", lambda *args, **kwargs: open(os.devnull))  # a route: closed
    with pytest.raises(sf.UserError, match="Entry Not Found") as e:
        sf._hub_file("owner/repo", "model_index.json")
    assert "unreachable" not in str(e.value)


def _bad_teacher_cases(tiny, tmp_path):
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    unsupported = tmp_path / "sd15"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    return {
        "unknown preset": (["--teacher", "flux-pro"], "not a preset"),
        "no model_index": (["--teacher", str(no_index)], "no model_index.json"),
        "unsupported": (["--teacher", str(unsupported)], "StableDiffusionPipeline is not supported"),
        "bad resolution": (["--teacher", tiny["sd3"], "--resolution", "33", "--device", "cpu"], "multiple of 2"),
        "empty prompts": (["--teacher", tiny["sana"], "--prompts", str(empty)], "has no prompts"),
        "missing prompts": (["--teacher", tiny["sana"], "--prompts", str(tmp_path / "nope.txt")], "no such file"),
        "cuda": (["--teacher", tiny["sana"], "--device", "cuda"], "no CUDA device"),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown preset", "no model_index", "unsupported", "bad resolution", "empty prompts", "missing prompts", "cuda"],
)
def test_bad_input_is_one_clear_error(tiny, tmp_path, case):
    """Bad input stops before anything is written; an existing output folder is left byte-for-byte as it was."""
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, message = _bad_teacher_cases(tiny, tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "meta.pt").write_bytes(b"precious")
    with pytest.raises(sf.UserError, match=message):
        sf.main([*args, "--out", str(out)])
    assert [p.name for p in out.rglob("*")] == ["checkpoint", "meta.pt"]
    assert (out / "checkpoint" / "meta.pt").read_bytes() == b"precious"


def test_bad_resolution_fails_before_any_weights_load(tiny, tmp_path, monkeypatch):
    """A resolution the configs can judge (not a whole number of latent patches) stops before the pipeline loads."""

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the resolution was checked")

    monkeypatch.setattr(sf, "load_backbone", no_loading)
    for family, bad in (("sana", 33), ("sd3", 31), ("flux", 31)):
        with pytest.raises(sf.UserError, match="--resolution .*: must be a positive multiple of"):
            sf.main(
                [
                    "--teacher",
                    tiny[family],
                    "--resolution",
                    str(bad),
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp_path / family),
                ]
            )


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "sid_flow.py"), "--teacher", "nope-model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: --teacher nope-model: not a preset")
    assert len(r.stderr.strip().splitlines()) == 1


def test_misleading_inputs_get_one_clear_line(tmp_path, monkeypatch):
    """Each of these once said something wrong or long; now each is one line that names the way out, and fast."""
    import time

    from huggingface_hub import constants as hub_constants

    cases = {  # argv -> what the line must say
        (): "--teacher is required: a preset (sana-0.6b-512",
        ("--teacher", "toy"): "run `python run_toy.py`",
        ("--teacher", "digits"): "run `python experiments/digits.py`",
        ("--teacher", "flux-devv", "--dry-run"): "--teacher flux-devv: not a preset (sana-0.6b-512",
    }
    for argv, message in cases.items():
        with pytest.raises(sf.UserError) as e:
            sf.main(list(argv))
        assert message in str(e.value) and "\n" not in str(e.value) and "digits," not in str(e.value), str(e.value)
    # a hub id that is not in the cache, offline: at once, naming HF_HUB_OFFLINE (no minute of retries)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    with pytest.raises(sf.UserError, match="HF_HUB_OFFLINE is set") as e:
        sf.main(["--teacher", "nobody/no-model", "--dry-run", "--resolution", "64"])
    assert time.time() - t0 < 10 and "\n" not in str(e.value)
    # export of a run_toy.py run: says what that run is, not "--teacher toy: not a preset"
    _run(_cfg(tmp_path / "toy", iters=1), _tiny_backbone())
    with pytest.raises(sf.UserError, match="a run of the toy teacher"):
        sf.main(["export", "--out", str(tmp_path / "toy")])


def test_dry_run_judges_what_a_run_judges(tmp_path):
    """--dry-run stops with a run's one-line error on a resolution that is no whole number of latent patches or is
    too large, and on a missing prompts file; a negative number is a value (the range error, not argparse's)."""
    for argv, message in (
        (["--resolution", "100000"], "at most 4096"),
        (["--resolution", "520"], "multiple of 32"),
        (["--prompts", str(tmp_path / "none.txt")], "no such file"),
    ):
        with pytest.raises(sf.UserError, match=message):
            sf.main(["--teacher", "sana-0.6b-512", "--dry-run", *argv])
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "sid_flow.py"),
            "--teacher",
            "sana-0.6b-512",
            "--lr-gen",
            "-1e-4",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr-gen must be positive, got -0.0001", r.stderr


def test_configs_only_cache_fails_in_one_line(tmp_path):
    """A training run on the configs-only hub cache (assets/hf: --dry-run's) stops with one line, not a traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=os.path.join(HERE, "assets", "hf"))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "sid_flow.py"),
            "--teacher",
            "sana-0.6b-512",
            "--iters",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: cannot load the pipeline"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------------------------
# 8. Data-aided SiD (D17): the fake network as the discriminator
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILY_RES))
def test_discriminator_per_family(tiny, family):
    """Pooled features of the fake network are (B, C) logits -- also under two-branch CFG, where the conditional
    half is used; their gradient reaches the fake network's weights and never the teacher's."""
    bb = _backbone(tiny[family], family)
    bb.set_prompts(TEST_PROMPTS)
    fake = bb.trainable_copy(torch.float32)
    B = 3
    x = torch.randn(B, *bb.sample_shape, device=DEVICE)
    t = torch.full((B,), 0.5, device=DEVICE)
    for guidance in (1.0, 2.5):
        _, hidden = sf.velocity_and_features(bb.velocity, fake, x, t, bb.cond_for([0, 1, 2]), guidance)
        logits = sf.pooled_logits(hidden, B)
        width = fake.proj_out.in_features
        assert logits.shape == (B, width)
        fake.zero_grad()
        sf.discriminator_loss(logits, logits, 1).sum().backward()
        assert fake.proj_out.weight.grad is None  # the head is not part of D
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None for p in bb.teacher.parameters())


def _image_folder(folder, n=4, res=40):
    """n random images with captions, plus one corrupt image and one image without a caption."""
    from PIL import Image

    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (res, res + 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(TEST_PROMPTS[i % len(TEST_PROMPTS)] + "\n")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken image")
    Image.fromarray(g.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / "nocaption.png")
    return folder


@pytest.mark.parametrize("family", list(FAMILY_RES))
def test_data_aided_iteration_per_family(tiny, family, tmp_path, capsys, monkeypatch):
    """One data-aided iteration per family on generated images with captions: the loader skips and counts the
    corrupt image and the missing caption; both the discriminator and the generator's GAN term are active."""
    monkeypatch.setattr(sf, "GAN_FREEZE_IMAGES", -1)
    monkeypatch.setattr(sf, "GAN_START_IMAGES", -1)
    data = _image_folder(tmp_path / "data")
    config = sf.make_config(
        None,
        teacher=tiny[family],
        resolution=FAMILY_RES[family],
        device=DEVICE,
        iters=1,
        batch_size=2,
        data=str(data),
        out=str(tmp_path / "run"),
        save_every=0,
    )
    sf.cmd_distill(config)
    out = capsys.readouterr().out
    assert "4 image-caption pairs; skipped 1 unreadable images and 1 without caption" in out
    assert "global batch 2 (--batch-size x processes x --grad-accum), not the paper's 256" in out  # said at the start
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert math.isfinite(log[-1]["loss_d"]) and math.isfinite(log[-1]["loss_gan"])
    cache = torch.load(tmp_path / "run" / "data_cache.pt", weights_only=False, map_location="cpu")
    assert cache["latents"].shape[1:] == _backbone(tiny[family], family).sample_shape


def test_data_loader_bad_inputs(tiny, tmp_path):
    """An empty folder; a folder with an unreadable image, one without a caption and one with a blank caption; a file
    that is no folder: clear errors or counts."""
    bb = _backbone(tiny["sana"], "sana")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sf.UserError, match="no usable image-caption pairs"):
        sf.encode_data(bb, str(tmp_path / "empty"), str(tmp_path / "c1.pt"))
    assert not (tmp_path / "c1.pt").exists()
    folder = _image_folder(tmp_path / "imgs", n=1)  # img0, a corrupt image and one without a caption
    (folder / "img1.png").write_bytes((folder / "img0.png").read_bytes())  # and one whose caption is blank
    (folder / "img1.txt").write_text("  \n")
    latents, captions, skipped = sf.encode_data(bb, str(folder), str(tmp_path / "c2.pt"))
    assert captions == [(folder / "img0.txt").read_text().strip()] and skipped == dict(unreadable=1, no_caption=2)
    assert latents.shape == (1, *bb.sample_shape)
    with pytest.raises(sf.UserError, match="not a folder"):
        sf.read_image_captions(str(tmp_path / "c2.pt"))


def test_data_aided_toy_schedule():
    """As the official loop counts: the generator is frozen until more than GAN_FREEZE_IMAGES (20k) images have been
    seen, then trained; the GAN term joins past GAN_START_IMAGES (40k). Images seen: iterations x global batch."""
    torch.manual_seed(0)
    bb = sf.ToyBackbone(run_toy.ToyMLP(width=32, depth=2), real=lambda n, g: run_toy.draw("checkerboard", n, g))
    sid = sf.SiD(_cfg(batch_size=32, grad_accum=2, lr_gen=1e-3, lr_fake=1e-3), bb, sf.Runtime())
    start = {k: v.clone() for k, v in sid.generator.state_dict().items()}
    for step in (0, 1, 312):  # 0, 64, ..., 19,968 images seen: frozen
        m = sid.iteration(step)
        assert "loss_gen" not in m and "loss_d" in m
    assert all(torch.equal(v, sid.generator.state_dict()[k]) for k, v in start.items())
    m = sid.iteration(313)  # 20,032 images
    assert "loss_gen" in m and "loss_gan" not in m
    assert any(not torch.equal(v, sid.generator.state_dict()[k]) for k, v in start.items())
    assert "loss_gan" not in sid.iteration(625)  # 40,000 images: not past 40k
    assert "loss_gan" in sid.iteration(626)


# ------------------------------------------------------------------------------------------------------------------
# 9. Scale: LoRA mode
# ------------------------------------------------------------------------------------------------------------------


def _lora_setup(tiny, family, checkpointing=0.0, seed=0):
    bb = _backbone(tiny[family], family)
    bb.set_prompts(TEST_PROMPTS)
    config = sf.make_config(
        None,
        teacher=tiny[family],
        resolution=FAMILY_RES[family],
        device=DEVICE,
        mode="lora",
        lora_rank=4,
        batch_size=2,
        guidance_eval_real=2.0,
        grad_checkpointing=checkpointing,
        ema_decay=0.9,
        lr_gen=1e-3,
        lr_fake=1e-3,
        seed=seed,
    )
    sid = sf.SiD(config, bb, sf.Runtime(torch.device(DEVICE)))
    g = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():  # distinct, non-trivial adapters, so that running the wrong one would show
        for p in list(sid.generator.parameters()) + list(sid.fake.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, device=p.device))
    return bb, config, sid


@pytest.mark.parametrize("family", ["sana", "flux"])
def test_lora_mode_each_update_reaches_only_its_adapter(tiny, family, monkeypatch):
    """One base, three adapters: the teacher is the base with adapters off; an iteration moves the generator and
    fake adapters, never the base; the generator phase adds no gradient to the fake adapter; the EMA adapter does
    not train. With gradient checkpointing of every block or of every second one the result is the same (the adapter
    of each forward is replayed)."""
    from diffusers import DiffusionPipeline

    bb, config, sid = _lora_setup(tiny, family)
    fake = sid.fake
    plain = DiffusionPipeline.from_pretrained(tiny[family]).transformer.to(DEVICE)
    x, t = torch.randn(2, *bb.sample_shape, device=DEVICE), torch.full((2,), 0.4, device=DEVICE)
    with torch.no_grad():
        for p in fake.parameters():  # make the fake adapter non-trivial: the teacher must not see it
            p.add_(0.05 * torch.randn_like(p))
        v_teacher = bb.velocity(bb.teacher, x, t, bb.cond_for([0, 1]), 1.0)
        v_plain = bb.forward(plain, x, t, bb.cond_for([0, 1]), 1.0)
        v_fake = bb.velocity(fake, x, t, bb.cond_for([0, 1]), 1.0)
    assert torch.allclose(v_teacher, v_plain, atol=1e-6) and not torch.allclose(v_teacher, v_fake, atol=1e-4)
    base0 = {n: p.clone() for n, p in bb.teacher.named_parameters()}
    gen0 = {n: p.clone() for n, p in sid.generator.named_parameters()}
    results = []

    def no_replay(net, share):
        net.enable_gradient_checkpointing(
            lambda block, *a: torch.utils.checkpoint.checkpoint(block, *a, use_reentrant=False)
        )

    for checkpointing, replay in ((0.0, True), (1.0, True), (0.5, True), (1.0, False)):
        if not replay:
            monkeypatch.setattr(sf, "recompute_blocks", no_replay)
        bb, config, sid = _lora_setup(tiny, family, checkpointing)
        gen, fake = sid.generator, sid.fake
        ema0 = {k: v.clone() for k, v in sid.ema.state_dict().items()}
        seen = {}
        sid.optimizers["fake"].register_step_post_hook(
            lambda *_, fake=fake, seen=seen: seen.update({n: p.grad.clone() for n, p in fake.named_parameters()})
        )
        if not replay:  # negative control: checkpointing WITHOUT replaying the adapter recomputes another network
            with pytest.raises(torch.utils.checkpoint.CheckpointError):
                sid.iteration(0)
            continue
        sid.iteration(0)
        assert all(torch.equal(seen[n], p.grad) for n, p in fake.named_parameters())
        assert all(torch.equal(p, base0[n]) for n, p in bb.teacher.named_parameters())
        d, ema_state = min(0.9, 2 / (config.ema_warmup + 1)), sid.ema.state_dict()  # ema_update's average
        assert all(
            torch.allclose(v, d * ema0[k] + (1 - d) * gen.state_dict()[k], atol=1e-6) for k, v in ema_state.items()
        )
        assert any(not torch.equal(p, gen0[n]) for n, p in gen.named_parameters())
        results.append({n: p.detach().clone() for n, p in gen.named_parameters()})
    assert all(torch.allclose(a, r[n], atol=1e-6) for r in results[1:] for n, a in results[0].items())


@pytest.mark.parametrize("family", ["sana", "flux"])
def test_partial_checkpointing_same_gradients_less_memory(tiny, family):
    """Full mode: one iteration with none, every second, or every block checkpointed gives the same gradients
    (float tolerance), and the tensors saved for backward shrink as the share grows (FLUX: two kinds of block)."""
    grads, saved = [], []
    for share in (0.0, 0.5, 1.0):
        bb = _backbone(tiny[family], family)
        bb.set_prompts(TEST_PROMPTS)
        config = sf.make_config(
            None,
            teacher=tiny[family],
            resolution=FAMILY_RES[family],
            device=DEVICE,
            batch_size=2,
            guidance_eval_real=2.0,
            grad_checkpointing=share,
        )
        sid = sf.SiD(config, bb, sf.Runtime(torch.device(DEVICE)))
        meter = bench.SavedActivations([bb.teacher, sid.generator, sid.fake])
        with meter.hooks():
            sid.iteration(0)
        grads.append(torch.cat([p.grad.flatten() for p in sid.generator.parameters() if p.grad is not None]))
        saved.append(meter.peak)
    assert all(torch.allclose(g, grads[0], rtol=1e-4, atol=1e-6) for g in grads[1:])
    assert saved[0] > saved[1] > saved[2], saved


@pytest.mark.parametrize(
    "share, chosen", [(0.0, []), (0.25, [3]), (0.5, [1, 3]), (0.75, [1, 2, 3]), (1.0, [0, 1, 2, 3])]
)
def test_checkpointed_share_is_spread_over_the_network(share, chosen):
    """--grad-checkpointing s recomputes a share s of the blocks spread evenly over the network (0.5: every second
    one), so that the memory it saves is spread over the forward pass as the memory plan assumes."""
    torch.manual_seed(0)
    net = _tiny_sana_transformer(num_layers=4, sample_size=4)
    sf.recompute_blocks(net, share)
    calls = [0] * len(net.transformer_blocks)
    for i, block in enumerate(net.transformer_blocks):  # a recomputed block runs twice: in forward, then in backward
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    v = net(torch.randn(1, 4, 4, 4), encoder_hidden_states=torch.randn(1, 3, 16), timestep=torch.tensor([500.0]))[0]
    v.square().sum().backward()
    assert [i for i, n in enumerate(calls) if n == 2] == chosen and set(calls) <= {1, 2}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_compiled_blocks_equal_eager_and_compile_once(tiny, mode, monkeypatch):
    """--compile: torch.compile of each transformer block (here through dynamo and AOT autograd with the eager backend:
    the CPU cannot afford inductor's code generation in a test; the benchmark runs inductor on a GPU). Uniform k, a
    guidance interval (per-sample CFG scales) and, in LoRA mode, four adapter states: the losses equal the eager
    run's, and after the first iteration no call compiles again."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(sf.COMPILE, "backend", "aot_eager")
    losses = {}
    for compiled in (False, True):
        bb = _backbone(tiny["sana"], "sana")
        bb.set_prompts(TEST_PROMPTS)
        config = sf.make_config(
            None,
            teacher=tiny["sana"],
            resolution=FAMILY_RES["sana"],
            device=DEVICE,
            batch_size=2,
            mode=mode,
            lora_rank=4,
            guidance_eval_real=2.0,
            guidance_t_min=0.2,
            guidance_t_max=0.6,
            train_step="uniform",
            precision="bf16-autocast",
            compile=compiled,
        )
        torch._dynamo.reset()
        counters.clear()
        sid, graphs, losses[compiled] = sf.SiD(config, bb, sf.Runtime(torch.device(DEVICE))), [], []
        for i in range(4):
            m = sid.iteration(i)
            losses[compiled].append((m["k"], m["loss_fake"], m["loss_gen"]))
            graphs.append(counters["stats"]["unique_graphs"])
    assert len({k for k, _, _ in losses[True]}) > 1  # several trained steps k: the roll-outs differ in length
    assert graphs[0] > 0 and graphs == [graphs[0]] * 4, graphs
    for eager, compiled in zip(losses[False], losses[True], strict=True):
        assert eager[0] == compiled[0] and all(
            abs(a - b) <= 1e-4 * abs(a) + 1e-5 for a, b in zip(eager[1:], compiled[1:], strict=True)
        )


def test_compile_reaches_every_kind_of_block(tiny, monkeypatch):
    """--compile on FLUX, whose transformer has two kinds of block (double- and single-stream): every block of both
    lists is compiled, in every network that runs (teacher, generator, fake), and one velocity call compiles a graph
    for each kind."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(sf.COMPILE, "backend", "aot_eager")
    bb = _backbone(tiny["flux"], "flux")
    bb.set_prompts(TEST_PROMPTS)
    config = sf.make_config(None, teacher=tiny["flux"], resolution=FAMILY_RES["flux"], batch_size=2, compile=True)
    torch._dynamo.reset()
    counters.clear()
    sid = sf.SiD(config, bb, sf.Runtime(torch.device(DEVICE)))
    kinds = [name for name, child in bb.teacher.named_children() if isinstance(child, torch.nn.ModuleList)]
    assert {"transformer_blocks", "single_transformer_blocks"} <= set(kinds)
    for net in (bb.teacher, sid.generator, sid.fake):
        assert all(block._compiled_call_impl is not None for block in sf.blocks(net))
        assert len(sf.blocks(net)) == sum(len(getattr(net, kind)) for kind in kinds)
    x, t = torch.randn(2, *bb.sample_shape, device=DEVICE), torch.full((2,), 0.5, device=DEVICE)
    with torch.no_grad():
        bb.velocity(bb.teacher, x, t, bb.cond_for([0, 1]), 1.0)
    assert counters["stats"]["unique_graphs"] >= 2  # a graph per kind of block


def test_compile_reaches_lora_mode_under_torchrun(tiny):
    """LoRA mode under torchrun replicates one base on every process, unsharded: --compile compiles its blocks there
    as on one process (FSDP2's shard() compiles full mode's, and only those)."""
    bb = _backbone(tiny["sana"], "sana")
    config = sf.make_config(
        None, teacher=tiny["sana"], resolution=FAMILY_RES["sana"], mode="lora", lora_rank=4, compile=True
    )
    runtime = sf.Runtime(torch.device(DEVICE))
    runtime.world = 2  # (placement asks only how many processes there are; LoRA's needs no process group)
    sf.place_students(bb, config, runtime)
    assert all(block._compiled_call_impl is not None for block in sf.blocks(bb.teacher.base))


def test_lora_export_fuses_the_adapter(tiny, tmp_path):
    """A LoRA run exports a plain transformer with the EMA adapter fused (same outputs as the adapter view), and the
    adapter alone beside it."""
    config = sf.make_config(
        None,
        teacher=tiny["sana"],
        resolution=FAMILY_RES["sana"],
        device=DEVICE,
        mode="lora",
        lora_rank=4,
        iters=2,
        batch_size=2,
        lr_gen=1e-2,
        lr_fake=1e-2,
        ema_decay=0.5,
        out=str(tmp_path / "run"),
        save_every=0,
    )
    sf.cmd_distill(config)
    from diffusers import DiffusionPipeline

    student = DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "student")).transformer.to(DEVICE)
    assert not any("lora" in n for n in student.state_dict())
    assert (tmp_path / "run" / "student" / "lora").is_dir()
    bb = _backbone(tiny["sana"], "sana")
    bb.set_prompts(TEST_PROMPTS)
    _, _, ema = bb.students(config, sf.Runtime())
    ema.load_state_dict(_checkpoint(tmp_path / "run")["ema"]["model"])
    x, t = torch.randn(2, *bb.sample_shape, device=DEVICE), torch.full((2,), 0.7, device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(
            bb.forward(student, x, t, bb.cond_for([0, 1]), 1.0),
            bb.velocity(ema, x, t, bb.cond_for([0, 1]), 1.0),
            atol=1e-5,
        )
        assert not torch.allclose(
            bb.forward(student, x, t, bb.cond_for([0, 1]), 1.0),
            bb.velocity(bb.teacher, x, t, bb.cond_for([0, 1]), 1.0),
            atol=1e-5,
        )


def test_lora_export_reads_the_weights_it_names(tiny, tmp_path):
    """LoRA mode: `export --weights ema` fuses the checkpoint's EMA adapter into the base, `--weights generator` the
    generator's (fused here independently, by peft, from the checkpoint), and the two differ."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    sf.cmd_distill(
        sf.make_config(
            None,
            teacher=tiny["sana"],
            resolution=32,
            device=DEVICE,
            mode="lora",
            lora_rank=4,
            iters=3,
            batch_size=2,
            lr_gen=1e-2,
            lr_fake=1e-2,
            ema_decay=0.9,
            out=str(out),
        )
    )
    ck = {which: d["model"] for which, d in _checkpoint(out).items() if which in ("ema", "generator")}
    assert any(not torch.equal(ck["ema"][k], ck["generator"][k]) for k in ck["ema"])
    for which in ("ema", "generator"):
        sf.cmd_export(str(out), which, DEVICE)
        student = DiffusionPipeline.from_pretrained(str(out / "student")).transformer.state_dict()
        fused = _fused(tiny, ck[which])
        assert all(torch.allclose(v, fused[k], atol=1e-6) for k, v in student.items()), which


def _measured(nets, opts):
    weights = sum(p.numel() * p.element_size() for n in nets for p in n.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for n in nets for p in n.parameters() if p.grad is not None)
    optim = sum(
        v.numel() * v.element_size() for o in opts for st in o.state.values() for k, v in st.items() if k != "step"
    )
    return weights, grads, optim


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_dry_run_plan_matches_measured_tensors(tiny, mode):
    """The --dry-run plan, computed from the configs on the meta device, against the real thing on a tiny SD3:
    parameter count, and the bytes of weights, gradients and Adam state after one iteration."""
    src = tiny["sd3"]
    for ema_decay in (0.0, 0.5) if mode == "full" else (0.5,):  # (LoRA makes its few-MB EMA adapter either way)
        kw = dict(resolution=32, device=DEVICE, mode=mode, lora_rank=4, batch_size=2, ema_decay=ema_decay)
        config = sf.make_config(None, teacher=src, **kw)
        plan = sf.memory_plan(config, sf.meta_transformer(src), sf.SD3Backbone)
        bb = _backbone(src, "sd3", mode=mode, lora_rank=4)
        assert plan["parameters"] == sum(p.numel() for p in bb.teacher.parameters())
        bb.set_prompts(TEST_PROMPTS)
        sid = sf.SiD(config, bb, sf.Runtime(torch.device(DEVICE)))
        sid.iteration(0)
        nets = [bb.teacher, sid.generator, sid.fake] + ([sid.ema] if sid.ema is not None else [])
        weights, grads, optim = _measured(nets, sid.optimizers.values())
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (weights, grads, optim)
        assert plan["trainable"] == sum(p.numel() for n in (sid.generator, sid.fake) for p in n.parameters())


BENCH_FIELDS = {
    "teacher",
    "mode",
    "precision",
    "device",
    "world_size",
    "batch_size",
    "resolution",
    "step_s",
    "passes_s",
    "loop_overhead",
    "compile",
    "images_per_s",
    "measured",
    "planned",
    "flops_per_step",
}
MEMORY_KEYS = {"weights", "gradients", "optimizer", "activations", "total"}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bench_runs_the_loop_and_writes_every_field(tiny, tmp_path, mode):
    """experiments/bench.py --timed 2 on a tiny pipeline folder: real iterations through distill() on a random-weight
    teacher built from
    transformer/config.json alone; bench.json has every field, with measured weights, gradients and Adam state equal
    to the plan's (exact) and FLOPs counted."""
    out = tmp_path / mode
    r = bench.main(
        [
            "--teacher",
            tiny["sd3"],
            "--resolution",
            "32",
            "--device",
            DEVICE,
            "--batch-size",
            "2",
            "--mode",
            mode,
            "--lora-rank",
            "4",
            "--timed",
            "2",
            "--out",
            str(out),
        ]
    )
    saved = json.load(open(out / "bench.json"))
    assert BENCH_FIELDS <= set(saved) and set(saved["measured"]) == set(saved["planned"]) == MEMORY_KEYS
    assert saved["step_s"] > 0 and saved["images_per_s"] == pytest.approx(2 / saved["step_s"])
    assert 0 < saved["passes_s"] and saved["loop_overhead"] == pytest.approx(saved["step_s"] / saved["passes_s"] - 1)
    assert saved["flops_per_step"] > 0 and saved["world_size"] == 1 and saved["mode"] == mode
    for key in ("weights", "gradients", "optimizer"):
        assert saved["measured"][key] == saved["planned"][key] == r["measured"][key], key
    assert ("mfu" in saved) == DEVICE.startswith("cuda")


LADDER_ARCH = {
    "sana": [{"num_attention_heads": 4, "num_cross_attention_heads": 4, "cross_attention_dim": 32}, {"num_layers": 3}],
    "sd3": [{"num_attention_heads": 8, "caption_projection_dim": 64}, {"num_layers": 3}],
    "flux": [{"num_attention_heads": 4}, {"num_layers": 2}],
}
LADDER_RUNS = [
    {},
    dict(resolution=48),
    dict(batch_size=3),
    dict(mode="lora"),
    dict(precision="bf16-autocast"),
    dict(guidance_eval_real=2.0, guidance_eval_fake=2.0),
    dict(grad_checkpointing=1.0),
    dict(grad_checkpointing=0.5),
    dict(mode="lora", grad_checkpointing=1.0),
]


@pytest.mark.parametrize("family", ["sana", "sd3", "flux"])
def test_memory_plan_matches_measured_bytes(tiny, tmp_path, family):
    """The --dry-run plan against experiments/bench.py's measurement over a ladder of small configurations per family
    (width,
    depth, resolution, batch, both modes, bf16, two-branch CFG, gradient checkpointing): the total within 25%. The
    CPU measures activations as the peak of the tensors saved for backward, which does not see a checkpointed
    block's recompute; with checkpointing the plan less its recompute term is held to the 25%."""
    import shutil

    ladder = [(arch, {}) for arch in LADDER_ARCH[family]] + [({}, run) for run in LADDER_RUNS]
    for i, (arch, run) in enumerate(ladder):
        folder = tmp_path / f"c{i}"
        for part in ("transformer", "vae"):
            (folder / part).mkdir(parents=True)
            shutil.copy(os.path.join(tiny[family], part, "config.json"), folder / part)
        shutil.copy(os.path.join(tiny[family], "model_index.json"), folder)
        config = json.load(open(folder / "transformer" / "config.json"))
        json.dump({**config, **arch}, open(folder / "transformer" / "config.json", "w"))
        config = sf.make_config(
            None,
            teacher=str(folder),
            **{**dict(resolution=32, batch_size=2, lora_rank=4, device="cpu", out=str(folder / "out")), **run},
        )
        r = bench.bench(config, 1)
        fam = sf.resolve_teacher(str(folder))[1]
        plan = sf.memory_plan(config, sf.meta_transformer(str(folder)), fam, 1, sf.vae_factor(str(folder), fam))
        planned = plan["total"] - plan["recompute"]
        assert abs(planned / r["measured"]["total"] - 1) < 0.25, (arch, run, planned, r["measured"])


def test_every_preset_plans_offline_without_a_token(monkeypatch, capsys):
    """--dry-run for every preset reads the project's own copy of its configs: no network, no hub cache, no token."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent")
    for preset in sf.HUB_IDS:
        plan = sf.main(["--teacher", preset, "--dry-run"])
        assert plan["parameters"] > 5e8 and plan["total"] > plan["weights"] > 0, preset
    assert capsys.readouterr().out.count("memory plan per GPU") == len(sf.HUB_IDS)


def test_every_gpu_command_of_the_readme_plans_what_it_says_and_fits(monkeypatch, capsys):
    """Each GPU row of the README's "What to run on what you have": the command with --dry-run appended (torchrun's
    rows with WORLD_SIZE=8) plans the GiB the row states, and that fits the row's GPU (8 GPUs: 80 GB each), within the
    69 GiB the presets leave an 80 GB GPU for the plan's error; and it trains at the paper's global batch of 256."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    readme = open(os.path.join(HERE, "README.md")).read()
    table = readme.split("## What to run on what you have")[1].split("\n\n")[1]
    rows = [line.split(" | ") for line in table.splitlines() if "GPU" in line.split(" | ")[0]]
    assert len(rows) >= 7 and any("24 GB" in row[0] for row in rows) and any("16 GB" in row[0] for row in rows)
    for row in rows:
        command = row[1].strip("`").split()
        world = 8 if command[0] == "torchrun" else 1
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args = command[command.index("sid_flow.py") + 1 :]
        args = [os.path.join(HERE, "assets", "prompts.txt") if a == "my_prompts.txt" else a for a in args]  # (yours)
        plan = sf.main([*args, "--dry-run"])
        out = capsys.readouterr().out
        planned = max(plan["total"], plan["startup"]) / 2**30
        assert f"{planned:.1f}" == row[3].split()[0], (row[1], planned)
        gpu = 80 if world == 8 else int(re.search(r"(\d+) GB", row[0]).group(1))
        assert planned <= min(gpu, 80) * 69 / 80, (row[1], planned)
        assert "= 256)" in out, row[1]


def test_a_local_copy_of_a_presets_model_gets_its_preset(tmp_path, capsys, monkeypatch):
    """A pipeline folder whose transformer config is a preset's model (a downloaded FLUX.1-dev), or that preset's hub
    id, runs with the preset's settings, and one line says so; a folder of another model gets the plain defaults."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = sf.resolve_teacher("flux-dev", configs_only=True)[0]
    shutil.copytree(src, tmp_path / "FLUX.1-dev")
    plan = sf.main(["--teacher", str(tmp_path / "FLUX.1-dev"), "--dry-run"])
    out = capsys.readouterr().out
    assert "flux-dev's preset" in out and "global batch 2 x 1 GPU(s) x 128 = 256" in out and plan["total"] > 0
    assert sf.known_preset("black-forest-labs/FLUX.1-dev") == "flux-dev" and sf.known_preset("flux-dev") == "flux-dev"
    config = json.load(open(tmp_path / "FLUX.1-dev" / "transformer" / "config.json"))
    json.dump({**config, "num_layers": 2}, open(tmp_path / "FLUX.1-dev" / "transformer" / "config.json", "w"))
    assert sf.known_preset(str(tmp_path / "FLUX.1-dev")) is None  # another model of the family: no preset


@pytest.mark.parametrize(
    "preset, free_gib, advice",
    [("sd3-medium", 23, "try --grad-checkpointing"), ("sana-0.6b-512", 23, "try --grad-checkpointing")]
    + [("flux-dev", 23, "a GPU with more memory$"), ("sana-1.6b-1024", 3, "more GPUs")],
)
def test_fit_advice_names_only_settings_that_fit_at_the_same_global_batch(
    monkeypatch, capsys, preset, free_gib, advice
):
    """On a GPU whose free memory the plan exceeds, --dry-run says so in one line, naming the lightest settings whose
    own --dry-run plan fits -- at the same global batch (a smaller micro-batch raises --grad-accum) --, or, when none
    does, more GPUs only in full mode (FSDP2 shards it; LoRA mode is replicated on every GPU). A run stops with the
    same line before any weights load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib << 30, 80 << 30))
    sf.main(["--teacher", preset, "--dry-run"])
    line = capsys.readouterr().out.splitlines()[-1]
    hint = line.split(" are free: ")[1].removesuffix(" (--dry-run prints the plan)")
    assert re.search(advice, hint), hint
    assert "GPUs" not in hint or sf.PRESETS[preset].get("mode", "full") == "full"
    monkeypatch.setattr(sf, "check_inputs", functools.partial(sf.check_inputs, configs_only=True))  # (no weights)
    monkeypatch.setattr(sf, "setup_runtime", lambda config: sf.Runtime(torch.device("cuda")))
    monkeypatch.setattr(sf, "load_backbone", lambda *args: pytest.fail("a weight was loaded"))
    with pytest.raises(sf.UserError) as e:  # a run: the same line, before any weights load
        sf.main(["--teacher", preset])
    assert str(e.value) == line
    if hint.startswith("try "):  # the named flags' own --dry-run plan fits, at the preset's global batch of 256
        plan = sf.main(["--teacher", preset, *hint.removeprefix("try ").split(), "--dry-run"])
        out = capsys.readouterr().out
        assert max(plan["total"], plan["startup"]) <= free_gib << 30 and "fits the" in out
        assert "= 256)" in out


def test_dry_run_cli_prints_a_plan_without_weights(tiny, tmp_path, capsys, monkeypatch):
    """--dry-run needs only model_index.json and transformer/config.json: a folder without any weights works."""
    import shutil

    folder = tmp_path / "configs_only"
    (folder / "transformer").mkdir(parents=True)
    shutil.copy(os.path.join(tiny["flux"], "model_index.json"), folder)
    shutil.copy(os.path.join(tiny["flux"], "transformer", "config.json"), folder / "transformer")
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc-per-node 4 would set it
    plan = sf.main(["--teacher", str(folder), "--resolution", "64", "--dry-run"])
    out = capsys.readouterr().out
    assert "memory plan per GPU" in out and "FluxTransformer2DModel" in out and plan["total"] > 0
    config = sf.make_config(None, teacher=str(folder), resolution=64)
    full = sf.memory_plan(config, sf.meta_transformer(str(folder)), sf.FluxBackbone)
    assert plan["weights"] == pytest.approx(full["weights"] / 4)  # FSDP2 shards full mode over the GPUs


# ------------------------------------------------------------------------------------------------------------------
# 9b. The GPU's code paths, run here: bf16 autocast, device placement, random-number streams
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", ["sana", "sd3", "flux"])
def test_bf16_autocast_trains_previews_and_exports(tiny, family, mode, tmp_path):
    """--precision bf16-autocast is the same path on every device: the pipeline in bf16, compute under bf16 autocast,
    float32 trainable weights. Per family and mode, with and without gradient checkpointing: two iterations with a
    preview after each, then the export. The trainable weights move and stay float32 and finite; the previews are
    images; the exported bf16 student loads in the stock pipeline and differs from the teacher."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    teacher = {
        k: v.to(torch.bfloat16)
        for k, v in DiffusionPipeline.from_pretrained(tiny[family]).transformer.state_dict().items()
    }
    for checkpointing in (0.0, 1.0):
        out = tmp_path / f"checkpointing{int(checkpointing)}"
        config = sf.make_config(
            None,
            teacher=tiny[family],
            resolution=FAMILY_RES[family],
            device=DEVICE,
            mode=mode,
            lora_rank=4,
            precision="bf16-autocast",
            grad_checkpointing=checkpointing,
            iters=2,
            batch_size=2,
            lr_gen=1e-2,
            lr_fake=1e-2,
            guidance_eval_real=2.0,
            ema_decay=0.5,
            guidance_t_min=0.2,
            guidance_t_max=0.6,  # the DiT presets' guidance interval: per-sample scales
            out=str(out),
            save_every=0,
            eval_every=1,
        )
        sf.cmd_distill(config)
        generator = _checkpoint(out)["generator"]["model"]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in generator.values())
        if mode == "full":
            assert any(not torch.equal(v.to(torch.bfloat16), teacher[k]) for k, v in generator.items())
        else:
            assert all(v.abs().sum() > 0 for k, v in generator.items() if "lora_B" in k)
        for step in (1, 2):
            assert np.asarray(Image.open(out / f"preview_{step:07d}.png")).std() > 0
        student = DiffusionPipeline.from_pretrained(str(out / "student"), dtype=torch.bfloat16).transformer
        state = student.state_dict()
        assert all(v.dtype == torch.bfloat16 for v in state.values())
        assert any(not torch.equal(v, teacher[k]) for k, v in state.items()), checkpointing


@pytest.mark.parametrize("family", ["sana", "sd3", "flux"])
def test_every_component_runs_on_the_runs_device(tiny, family, monkeypatch):
    """Device placement, checked on the CPU with the 'meta' device as the run's device: a component left on the CPU
    fails here as a CPU text encoder fails on a GPU run (cpu and meta tensors do not mix). With the prompt bank off
    (the encoders stay), prompt encoding, the CFG velocity call and every module of the pipeline are on the device."""
    monkeypatch.setattr(sf, "PROMPT_CACHE_BYTES", 0)
    bb = _backbone(tiny[family], family, device="cpu")  # loaded as usual ...
    bb = type(bb)(bb.pipe, sf.make_config(None, resolution=FAMILY_RES[family]), torch.device("meta"))  # ... on meta
    for name, module in bb.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert all(p.device.type == "meta" for p in [*module.parameters(), *module.buffers()]), name
    if family == "sana":  # some transformers versions read Gemma-2's mask values (.item()), which meta cannot give:
        bb.encode = lambda prompts: {
            "embeds": torch.zeros(len(prompts), 300, 16, device="meta"),  # the placement
            "mask": torch.ones(len(prompts), 300, device="meta"),
        }  # is asserted above
    bb.set_prompts(TEST_PROMPTS)
    assert bb.prompt_cache is None and bb.text_encoders()
    cond = bb.cond_for([0, 1])
    assert all(v.device.type == "meta" for v in cond.values())
    x, t = torch.zeros(2, *bb.sample_shape, device="meta"), torch.full((2,), 0.5, device="meta")
    v = bb.velocity(bb.teacher, x, t, cond, 2.0)
    assert v.device.type == "meta" and v.shape == x.shape


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_iterations_and_previews_leave_the_global_rng_alone(tiny, family, tmp_path):
    """SD3 and FLUX pipelines draw their per-step noise from torch's global RNG; the loop must not (on CUDA that is
    the CUDA generator, which a checkpoint would not restore). Iterations (uniform k: re-noising draws) and previews
    leave the global RNG untouched, and a run stopped at 2 and resumed to 4 -- with the global RNG scrambled in
    between -- equals an uninterrupted one exactly."""
    bb = _backbone(tiny[family], family)
    bb.set_prompts(TEST_PROMPTS)
    kw = dict(
        teacher=tiny[family],
        resolution=FAMILY_RES[family],
        device=DEVICE,
        train_step="uniform",
        batch_size=2,
        lr_gen=1e-3,
        lr_fake=1e-3,
        ema_decay=0.5,
        save_every=0,
        eval_every=1,
    )

    def global_rng():  # the CPU generator's state, and the CUDA generators' when there are any
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])]

    def preview(step, generator, ema):  # a run's evaluation: the quality number, whose samples are the preview
        before = global_rng()
        sf.Quality(bb, sf.make_config(None, **kw))(ema)
        assert all(torch.equal(a, b) for a, b in zip(before, global_rng(), strict=True))

    sid = sf.SiD(sf.make_config(None, **kw), bb, sf.Runtime(torch.device(DEVICE)))
    before = global_rng()
    ks = {sid.iteration(i)["k"] for i in range(6)}
    assert (
        all(torch.equal(a, b) for a, b in zip(before, global_rng(), strict=True)) and max(ks) > 1
    )  # k > 1: re-noising
    full = _run(sf.make_config(None, **kw, iters=4, out=str(tmp_path / "a")), bb, on_eval=preview)
    _run(sf.make_config(None, **kw, iters=2, out=str(tmp_path / "b")), bb, on_eval=preview)
    torch.manual_seed(12345)
    resumed = _run(sf.make_config(None, **kw, iters=4, out=str(tmp_path / "b")), bb, on_eval=preview)
    for key in ("generator", "fake", "ema"):
        assert all(
            torch.equal(a, b)
            for a, b in zip(full[key].state_dict().values(), resumed[key].state_dict().values(), strict=True)
        ), key


def test_export_reads_the_weights_it_names(tiny, tmp_path):
    """`export --weights ema` writes the checkpoint's EMA, `--weights generator` its generator, and the two differ."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    sf.cmd_distill(
        sf.make_config(
            None,
            teacher=tiny["sana"],
            resolution=32,
            device=DEVICE,
            iters=3,
            batch_size=2,
            lr_gen=1e-2,
            lr_fake=1e-2,
            ema_decay=0.9,
            out=str(out),
        )
    )
    ck = {which: d["model"] for which, d in _checkpoint(out).items() if which in ("ema", "generator")}
    for which in ("ema", "generator"):
        sf.cmd_export(str(out), which, DEVICE)
        student = DiffusionPipeline.from_pretrained(str(out / "student")).transformer.state_dict()
        assert all(torch.equal(v, ck[which][k].cpu()) for k, v in student.items()), which
    assert any(not torch.equal(ck["ema"][k], ck["generator"][k]) for k in ck["ema"])


# ------------------------------------------------------------------------------------------------------------------
# 10. Scale: two processes under torchrun (gloo on the CPU), resume, export from a sharded checkpoint
# ------------------------------------------------------------------------------------------------------------------


def _torchrun_script(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _torchrun(args, timeout=300):
    return _torchrun_script([os.path.join(HERE, "sid_flow.py"), *args], timeout)


TOY_TWO_PROCESSES = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
import run_toy
import sid_flow as sf
torch.set_num_threads(1)


def run(world, rank, layout, precision):
    # a toy teacher; generator and fake start as copies; a global batch of 8: 2 micro-batches, split over the ranks
    torch.manual_seed(0)
    bb = sf.ToyBackbone(run_toy.ToyMLP(width=32, depth=2))
    config = sf.make_config("toy", batch_size=4 // world, grad_accum=2, lr_gen=10.0, lr_fake=10.0, steps=2,
                         train_step="uniform", fake_updates=1, precision=precision, ema_decay=0.0)
    cpu = torch.device("cpu")
    sid = sf.SiD(config, bb, sf.Runtime(cpu))  # one-process copies, sharded or replicated below
    gen, fake = sid.generator, sid.fake
    start = {n: p.detach().clone() for n, p in bb.teacher.named_parameters()}
    if world > 1 and layout == "sharded":  # FSDP2, as full mode; else replicas averaged by hand, as LoRA mode
        student = sf.STUDENTS_BF16 if precision == "bf16-autocast" else None  # (as sf.sharded_copy's)
        for net, mp in ((bb.teacher, None), (gen, student), (fake, student)):
            for layer in net.body[::2]:  # each Linear a unit of its own, as each block of a DiT, then the root
                fully_shard(layer, mesh=init_device_mesh("cpu", (world,)), **({"mp_policy": mp} if mp else {}))
            sf.shard(net, mp)
    seen = set()  # the dtypes of t as the students' forward receives it (after FSDP2's own pre-forward)
    for net in (gen, fake):
        net.register_forward_pre_hook(lambda module, args: seen.add(str(args[1].dtype)))
    sid.runtime = sf.Distributed(rank, world, cpu, sharded=layout == "sharded") if world > 1 else sf.Runtime(cpu)
    sid.optimizers = sf.make_optimizers(config, gen, fake)  # over the sharded weights
    for group in (g for opt in sid.optimizers.values() for g in opt.param_groups):
        group["eps"] = 100.0  # eps >> |grad|: Adam's step is ~ lr / eps * grad
    for i in range(2):
        sid.iteration(i)
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float()
    return {f"{name}.{n}": full(p) for name, net in (("generator", gen), ("fake", fake))
            for n, p in net.named_parameters()}, start, seen


dist.init_process_group("gloo")
results = {}
for layout in ("sharded", "replicated"):
    for precision in ("fp32", "bf16-autocast"):
        two, start, seen = run(2, dist.get_rank(), layout, precision)
        one, _, _ = run(1, 0, layout, precision)
        moved = max((one[k] - start[k.split(".", 1)[1]]).abs().max().item() for k in one)
        results[f"{layout} {precision}"] = dict(  # the largest difference, relative to the largest update
            diff=max((two[k] - one[k]).abs().max().item() for k in one) / moved,
            unmoved=[k for k in two if torch.equal(two[k], start[k.split(".", 1)[1]])], t_dtypes=sorted(seen))
if dist.get_rank() == 0:
    print(json.dumps(results))
dist.destroy_process_group()
"""


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Data parallel is the one-process update on the global batch: two gloo processes with micro-batches of 2 against
    one process with micro-batches of 4, two of each per step (every draw is made for the global batch of 8 from one
    seed, each rank keeping its rows of each micro-batch). FSDP2
    sharding (full mode; the generator's gradient routed through d loss / d x_g) and replicas with all-reduced
    gradients (LoRA mode) alike, in fp32 and bf16 autocast (FSDP2 all-gathering bf16, the inputs left in float32).
    Adam runs with eps >> |grad|, so its step is proportional to the gradient: a sum over ranks instead of a mean
    would show as a factor 2."""
    script = tmp_path / "two.py"
    script.write_text(TOY_TWO_PROCESSES)
    r = _torchrun_script([str(script), HERE], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for name, res in results.items():
        assert res["unmoved"] == [], name  # every weight of both networks trained
        assert res["t_dtypes"] == ["torch.float32"], name  # the students see t as one process does (not cast to bf16)
        assert res["diff"] < (1e-5 if "fp32" in name else 5e-2), (name, res["diff"])


def _sana_blocks_changed(state, teacher):
    """Indices of SANA transformer blocks with at least one weight different from the teacher's."""
    return {
        int(k.split(".")[1])
        for k, v in state.items()
        if k.startswith("transformer_blocks.") and not torch.equal(v.float(), teacher[k].float())
    }


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_torchrun_two_processes(tiny, tmp_path, mode, monkeypatch):
    """torchrun, two gloo processes with batch 1 each, against one process with batch 2 (the same global batch):
    2 iterations, then a resumed third. Full mode shards every network with FSDP2; LoRA mode all-reduces the adapters'
    gradients; each process writes its part of the one checkpoint folder. The weights equal the one-process run's
    within float tolerance, every transformer block trained, and the exported student (written by rank 0 from the
    checkpoint, and again by `export`) is the checkpoint's EMA in a stock-loadable pipeline."""
    from diffusers import DiffusionPipeline

    common = dict(
        resolution=32,
        device="cpu",
        mode=mode,
        lora_rank=4,
        train_step="uniform",
        lr_gen=1e-2,
        lr_fake=1e-2,
        ema_decay=0.5,
        guidance_eval_real=2.0,
        save_every=2,
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    out = tmp_path / "run"
    # Adam with eps 1e-2 >> |grad|, in both runs: its step is then ~ proportional to the gradient, so float noise in
    # a near-zero gradient cannot flip a step's sign between the two-process and the one-process run
    wrapper = tmp_path / "sid_flow_eps.py"
    wrapper.write_text(ADAM_EPS_WRAPPER.format(here=HERE))
    monkeypatch.setattr(sf, "make_optimizers", _with_adam_eps(sf.make_optimizers))
    args = ["--teacher", tiny["sana"], *flags, "--batch-size", "1", "--out", str(out)]
    r = _torchrun_script([str(wrapper), *args, "--iters", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sf.read_meta(out / "checkpoint")["step"] == 2
    r = _torchrun_script([str(wrapper), *args, "--iters", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 3]  # resumed at 2
    one = tmp_path / "one"
    sf.cmd_distill(sf.make_config(None, teacher=tiny["sana"], **common, batch_size=2, iters=3, out=str(one)))
    ck_one = {which: d["model"] for which, d in _checkpoint(one).items() if which in ("ema", "generator")}
    teacher = DiffusionPipeline.from_pretrained(tiny["sana"]).transformer
    for which in ("generator", "ema"):
        if mode == "full":  # read back from the sharded checkpoint, one network only
            bb = _backbone(tiny["sana"], "sana", device="cpu")
            net = sf.saved_network(str(out / "checkpoint"), which, bb, sf.make_config(None, mode="full"))
            assert sf.read_meta(out / "checkpoint")["step"] == 3
            two = net.state_dict()
        else:
            two = _checkpoint(out)[which]["model"]
        for k, v in ck_one[which].items():
            assert torch.allclose(two[k], v, atol=1e-5, rtol=1e-4), (which, k, (two[k] - v).abs().max())
    if mode == "full":
        changed = _sana_blocks_changed(two, teacher.state_dict())
    else:
        changed = {int(k.split(".")[1]) for k, v in two.items() if "lora_B" in k and v.abs().sum() > 0}
    assert changed == set(range(teacher.config.num_layers))
    for source in ("run", "export"):
        if source == "export":
            sf.cmd_export(str(out), "ema", "cpu")
        student = DiffusionPipeline.from_pretrained(str(out / "student")).transformer.state_dict()
        assert not any("lora" in n for n in student)
        ema = _fused(tiny, ck_one["ema"]) if mode == "lora" else ck_one["ema"]
        assert all(torch.allclose(student[k], ema[k], atol=1e-5, rtol=1e-4) for k in student), source


def _with_adam_eps(make_optimizers, eps=1e-2):
    def patched(*args):
        opts = make_optimizers(*args)
        for group in (g for opt in opts.values() for g in opt.param_groups):
            group["eps"] = eps
        return opts

    return patched


ADAM_EPS_WRAPPER = (
    """
import inspect, sys
sys.path.insert(0, {here!r})
import sid_flow as sf
"""
    + inspect.getsource(_with_adam_eps)
    + """
sf.make_optimizers = _with_adam_eps(sf.make_optimizers)
sf.main()
"""
)


def _fused(tiny, adapter_state):
    """The tiny SANA transformer's weights with a LoRA adapter's state fused in by hand: W + B A (alpha = rank: scale
    1), summed in float32 and cast to W's dtype."""
    from diffusers import DiffusionPipeline

    state = DiffusionPipeline.from_pretrained(tiny["sana"]).transformer.state_dict()
    for key, a in adapter_state.items():
        if ".lora_A." in key:
            name, b = key.split(".lora_A.")[0] + ".weight", adapter_state[key.replace("lora_A", "lora_B")]
            state[name] = (state[name].float() + b.float() @ a.float()).to(state[name].dtype)
    return state


@pytest.mark.parametrize("procs", [1, 2])
def test_sigterm_checkpoints_the_current_iteration_then_resumes_exactly(tiny, tmp_path, procs):
    """SIGTERM mid-run (a preempted job; sent to torchrun, which passes it on to its two gloo processes): the run
    finishes its iteration and checkpoints it on every rank (there is no periodic checkpoint to fall back on), one
    line says where it stopped, the exit status is non-zero; the same command resumes from that iteration, the log
    holds no step twice, and the run ends with exactly the weights of the same command run without interruption."""
    common = dict(
        resolution=32,
        device="cpu",
        train_step="uniform",
        lr_gen=1e-2,
        lr_fake=1e-2,
        ema_decay=0.5,
        save_every=0,
        iters=100,
    )
    out = tmp_path / "run"
    args = [
        os.path.join(HERE, "sid_flow.py"),
        "--teacher",
        tiny["sana"],
        *[f"--{k.replace('_', '-')}={v}" for k, v in common.items()],
        "--batch-size",
        str(2 // procs),
    ]
    cmd = [
        sys.executable,
        *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] * (procs > 1)),
        *args,
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (out / "log.jsonl").exists():  # iteration 10 logged
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    meta = sf.read_meta(out / "checkpoint")
    assert p.returncode != 0 and 10 <= meta["step"] < 100, (meta["step"], err[-2000:])
    assert f"stopped at iteration {meta['step']} of 100; {out} holds it: run the same command to continue" in err
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(10, 101, 10)), steps
    r = subprocess.run([*cmd[:-1], str(tmp_path / "whole")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    bb, full = _backbone(tiny["sana"], "sana", device="cpu"), sf.make_config(None, mode="full")
    for which in ("generator", "fake", "ema"):
        a = sf.saved_network(out / "checkpoint", which, bb, full)
        b = sf.saved_network(tmp_path / "whole" / "checkpoint", which, bb, full)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), which


def test_quality_number_ranks_samplers_and_is_cached_for_resume(tiny, tmp_path, monkeypatch):
    """The run's quality number (section 14) on a tiny SANA: finite; the teacher's own 32-step samples of other seeds
    score below its 1-step samples; the features are the empty prompt's (the samples' prompts change nothing), and on
    the reference's top QUALITY_DIMS directions the reference is N(0, I); a run logs the number at every
    evaluation and draws OUT/quality.png; on resume the reference set comes from OUT/reference.pt, the teacher draws
    nothing again."""
    monkeypatch.setattr(sf, "QUALITY_SIZE", 128)  # a quarter of the presets' set: the same code, a shorter test
    bb = _backbone(tiny["sana"], "sana")
    bb.set_prompts(TEST_PROMPTS)
    config = sf.make_config(
        None, teacher=tiny["sana"], resolution=FAMILY_RES["sana"], device=DEVICE, guidance_eval_real=2.0
    )
    q = sf.Quality(bb, config)

    def teacher(x, t):
        return bb.velocity(bb.teacher, x, t, q.cond, 2.0)

    z = bb.noise(q.noises[:, 0].shape, torch.Generator(DEVICE).manual_seed(7))  # other seeds than the reference's
    many, one = q.score(sf.euler_sample(teacher, z, 32)), q.score(sf.euler_sample(teacher, z, 1))
    assert math.isfinite(many) and 0 <= many < 0.85 * one, (many, one)  # (a random teacher: its steps differ little)
    ref = (q.features(sf.euler_sample(teacher, q.noises[:, 0], 32)) - q.mean) @ q.basis  # the reference, whitened
    assert (
        ref.shape == (128, sf.QUALITY_DIMS)
        and ref.mean(0).abs().max() < 1e-3
        and torch.allclose(torch.cov(ref.T), torch.eye(sf.QUALITY_DIMS, dtype=ref.dtype), atol=1e-3)
    )  # N(0, I) there
    x = sf.euler_sample(teacher, z, 4)
    features, q.cond = q.features(x), bb.cond_for([1] * 128)  # other prompts for each sample: the features see none
    assert torch.equal(q.features(x), features)
    run = dict(
        teacher=tiny["sana"],
        resolution=FAMILY_RES["sana"],
        device=DEVICE,
        batch_size=2,
        eval_every=1,
        out=str(tmp_path / "run"),
    )
    sf.cmd_distill(sf.make_config(None, **run, iters=2))
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [m["step"] for m in log] == [1, 2] and all(math.isfinite(m["eval"]["quality"]) for m in log)
    assert (tmp_path / "run" / "quality.png").stat().st_size > 5_000
    monkeypatch.setattr(sf, "euler_sample", lambda *a: pytest.fail("the reference set was drawn again"))
    sf.cmd_distill(sf.make_config(None, **run, iters=3))
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2, 3]


def test_quality_number_runs_on_the_toy(monkeypatch):
    """The toy's backbone takes the same number (no prompts, no image grid: the MLP's last hidden states): finite,
    whitened to QUALITY_DIMS directions, exactly 0 for the reference's own samples."""
    monkeypatch.setattr(sf, "QUALITY_SIZE", 64)
    bb = _tiny_backbone()
    q = sf.Quality(bb, sf.make_config("toy"))

    def v(x, t):
        return bb.velocity(bb.teacher, x, t, None, 1.0)

    reference = sf.euler_sample(v, q.noises[:, 0], sf.REFERENCE_STEPS)
    assert q.basis.shape == (32, sf.QUALITY_DIMS) and math.isfinite(q(bb.teacher))  # (the MLP's 32 features)
    assert q.score(reference) == pytest.approx(0.0, abs=1e-9)


def test_sigkill_mid_run_then_same_command_resumes(tmp_path):
    """A run killed with SIGKILL at an arbitrary moment (checkpointing every iteration) leaves a loadable checkpoint,
    and running the same command again continues from it to the end."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {HERE!r})
import run_toy
import sid_flow as sf
torch.set_num_threads(1)
torch.manual_seed(0)
bb = sf.ToyBackbone(run_toy.ToyMLP(width=64, depth=3))
config = sf.make_config("toy", out={str(tmp_path / "run")!r}, iters=int(sys.argv[1]), batch_size=256, save_every=1,
                     lr_schedule="constant")  # (a cosine is shaped by --iters: a resume may not change it)
print(sf.distill(config, bb, runtime=sf.Checkpoints())["step"])
""")
    p = subprocess.Popen([sys.executable, str(script), "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "run" / "checkpoint"

    def saved_step():  # the checkpoint's iteration (the previous one's, if a write is being renamed into place)
        path = next((p for p in (ckpt, f"{ckpt}.old") if os.path.exists(os.path.join(p, "meta.pt"))), None)
        return path and sf.read_meta(path)["step"]

    deadline = time.time() + 60
    while time.time() < deadline and not (saved_step() or 0) >= 3:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = saved_step()  # never half-written: the resume below reads every network and optimizer
    assert step >= 3
    r = subprocess.run([sys.executable, str(script), str(step + 5)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [f"resumed from {ckpt} at iteration {step}", str(step + 5)]


# ------------------------------------------------------------------------------------------------------------------
# 11. The digits benchmark runs (a few iterations; the benchmark itself is `python experiments/digits.py`)
# ------------------------------------------------------------------------------------------------------------------


def test_digits_mode_runs(tmp_path, monkeypatch):
    """The DiT-on-digits mode end to end at toy size: teacher, classifier, teacher rows at every step count with and
    without guidance, three SiD students through the same loop and SANA adapter, the step-cost ratio, the figure."""
    import digits  # experiments/digits.py

    for k, v in dict(teacher_iters=30, n_per_class=10, classifier_iters=50, cost_iters=1).items():
        monkeypatch.setitem(digits.DIGITS, k, v)
    m = digits.main(["--out", str(tmp_path), "--iters", "2"])
    steps = {(r["guidance"], r["steps"]) for r in m["rows"] if r["sampler"].startswith("teacher")}
    assert steps == {(w, n) for w in (1.0, 2.0) for n in (1, 2, 4, 8, 16, 32)}
    students = [r for r in m["rows"] if r["sampler"].startswith("SiD")]
    assert len(students) == 6 and all(math.isfinite(r["fd"]) and 0 <= r["acc"] <= 1 for r in students)
    assert m["step_cost"]["ratio"] > 0 and (tmp_path / "digits.png").stat().st_size > 5000
    assert json.load(open(tmp_path / "metrics.json"))["rows"] == m["rows"]
    # the Frechet distance is a distance: zero for identical features, positive for shifted ones
    f = torch.randn(500, 8, dtype=torch.float64)
    assert abs(digits.frechet_distance(f, f)) < 1e-6 and digits.frechet_distance(f, f + 1.0) == pytest.approx(
        8.0, rel=1e-6
    )


def test_guidance_study_writes_every_row_and_its_samples(tmp_path, monkeypatch):
    """--guidance-study at toy size: every strategy at four steps and one, the teacher's samplers and the Langevin
    diagnostic in one table; samples.npz holds each row's samples under the row's name (N x 1 x 8 x 8), the
    requested labels and the real digits, and re-scoring those arrays gives the table's accuracy."""
    import digits  # experiments/digits.py

    small = dict(teacher_iters=30, n_per_class=6, classifier_iters=50)
    for k, v in small.items():
        monkeypatch.setitem(digits.DIGITS, k, v)
    m = digits.main(["--guidance-study", "--out", str(tmp_path), "--iters", "2"])
    names = [r["row"] for r in m["rows"]]
    assert {f"{s}, {k}" for s in digits.STRATEGIES for k in ("4 steps", "1 step")} <= set(names)
    assert sum(n.startswith("teacher") for n in names) == 5 + len(digits.LANGEVIN_SNR)
    assert all(r["trained"] == 2 for r in m["rows"] if not r["row"].startswith("teacher"))
    npz = np.load(tmp_path / "samples.npz")
    assert set(npz.files) == set(names) | {"labels", "real"}
    assert all(npz[n].shape == (60, 1, 8, 8) for n in names) and npz["labels"].shape == (60,)
    assert npz["real"].shape[1:] == (1, 8, 8) and (tmp_path / "guidance.png").stat().st_size > 5000
    # the table is what the saved arrays score: the classifier, retrained the same way, agrees on every row
    x, y, x_h, y_h = digits.digits_split()
    clf = digits.train_classifier(x_h, y_h)
    for r in m["rows"]:
        with torch.no_grad():
            acc = (clf(torch.from_numpy(npz[r["row"]])).argmax(1) == torch.from_numpy(npz["labels"])).float().mean()
        assert acc.item() == pytest.approx(r["acc"], abs=1e-6), r["row"]
    # a second run reuses every student (nothing retrained)
    again = digits.main(["--guidance-study", "--out", str(tmp_path), "--iters", "2"])
    assert all(r["trained"] == 0 for r in again["rows"])


def test_digits_metric_study_writes_every_row_and_its_samples(tmp_path, monkeypatch):
    """--metric-study at toy size: the benchmark's twelve teacher rows, six more guided as in the losses (the reference
    sampler among them), and its students' EMA and raw generators, each
    with the run's quality number, the classifier's FD to the one reference and the accuracy; the Spearman
    correlation as scipy computes it, on the run's draw and on each evaluation draw (other seeds, other numbers);
    samples.npz holds every row's FD samples and the run's, and a fresh sf.Quality of the digits preset scores the
    saved run's samples to each row's number."""
    import digits  # experiments/digits.py
    from scipy.stats import spearmanr  # the oracle (scipy comes with scikit-learn)

    for k, v in dict(teacher_iters=30, n_per_class=6, classifier_iters=50).items():
        monkeypatch.setitem(digits.DIGITS, k, v)
    m = digits.main(["--metric-study", "--out", str(tmp_path), "--iters", "2"])
    saved = json.load(open(tmp_path / "metric-study.json"))
    assert {"reference", "rows", "spearman"} <= set(saved) and saved["rows"] == m["rows"]
    names = [r["row"] for r in saved["rows"]]
    reference = f"teacher, {sf.REFERENCE_STEPS} steps, w=2 in [0.2, 0.6]"  # (the tests' small set: small_quality_sets)
    assert len(names) == 18 + 2 * len(digits.STUDENTS) and saved["reference"] == reference and reference in names
    assert all(math.isfinite(r[k]) for r in saved["rows"] for k in ("metric", "fd_to_reference", "acc"))
    metric, fd = ([r[k] for r in saved["rows"]] for k in ("metric", "fd_to_reference"))
    assert saved["spearman"] == pytest.approx(spearmanr(metric, fd).statistic, abs=1e-9)
    draws = [[r["metric_draws"][d] for r in saved["rows"]] for d in range(digits.DRAWS)]
    assert draws[0] == metric and len({tuple(d) for d in draws}) == digits.DRAWS  # seed 0 is the run's; all differ
    assert saved["spearman_draws"] == pytest.approx([spearmanr(d, fd).statistic for d in draws], abs=1e-9)
    cost = saved["cost"]
    assert 0 < cost["share_at_eval_every"] < cost["share_preset_run"] < cost["share_digits_run"] < 1
    npz = np.load(tmp_path / "samples.npz")
    assert set(npz.files) == set(names) | {f"quality: {n}" for n in names} | {"labels", "real", "quality_labels"}
    assert all(
        npz[n].shape == (60, 1, 8, 8) and npz[f"quality: {n}"].shape == (sf.QUALITY_SIZE, 1, 8, 8) for n in names
    )
    bench = digits.DigitsBench(sf.make_config("digits", out=str(tmp_path)))  # the cached tiny teacher
    quality = sf.Quality(bench.bb, sf.make_config("digits"))
    for r in saved["rows"]:
        assert quality.score(torch.from_numpy(npz[f"quality: {r['row']}"])) == pytest.approx(r["metric"], abs=1e-9)
