"""toy_exact_teacher.py -- what limits the 2-D student: distil the checkerboard's EXACT velocity, not a trained one.

    python experiments/toy_exact_teacher.py              # after `python run_toy.py`: about 2 min on a CPU core
    python experiments/toy_exact_teacher.py --iters 1600 # run_toy.py's Config flags, with the toy preset's defaults

The checkerboard is a mixture of 8 unit squares Q_k = [a_k, a_k + 1) x [b_k, b_k + 1), each of mass 1/8. On the path
x_t = (1 - t) x0 + t eps (D1) write s = 1 - t. For one coordinate of a square, u ~ U[a, a + 1) and y = s u + t e with
e ~ N(0, 1), the density of y and the posterior mean of u are closed-form; with alpha = (y - s a) / t and
beta = (y - s (a + 1)) / t = alpha - s / t,

    p_a(y)      = (Phi(alpha) - Phi(beta)) / s
    E[u | y, a] = y / s - (t / s) (phi(beta) - phi(alpha)) / (Phi(alpha) - Phi(beta))    (a truncated normal's mean)

(substitute w = (y - s u) / t in the integrals over u in [a, a + 1)). A square's two coordinates are independent,
so its density is the product of theirs, the posterior over the squares is w_k(x_t) = p_k(x_t) / sum_j p_j(x_t), and
E[x0 | x_t] = sum_k w_k(x_t) (E[u | x, a_k], E[u | y, b_k]). As x_t = (1 - t) x0 + t eps and v = eps - x0 (D1, D2),
the velocity is v(x_t, t) = (x_t - E[x0 | x_t]) / t. It is computed in float64 with log-CDF differences, exact in
the far tails (|alpha| in the hundreds at small t), and autograd differentiates it: SiD's generator loss sends its
gradient through the teacher's input (D12). The script first checks E[x0 | x_t] against Monte Carlo and against
Tweedie's formula (D3) on the closed-form density.

Then it distils the exact velocity with the toy preset through sf.ToyBackbone: the generator and the fake network
start from the demo's trained MLP teacher (the student must be a network), and only the teacher inside the generator
loss is exact. It prints, with run_toy.py's own evaluation, that student beside the demo's (the trained teacher's,
same flags; the run in OUT/runs/ is shared with run_toy.py, so whichever runs second reuses it) and the trained and
exact teachers' Euler samples (the trained one's also at 1,024 steps: closer to the distribution its velocity
defines, which a perfect student would reach or pass), each with the share of its samples that falls between the
squares. The demo's teacher and student are read from (or trained into) OUT, out/toy.
"""

import copy
import dataclasses
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # sid_flow.py, run_toy.py
import run_toy  # noqa: E402
import sid_flow as sf  # noqa: E402

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_phi_diff(alpha, beta):
    """log(Phi(alpha) - Phi(beta)) for alpha > beta, without cancellation: in the upper tail through
    Phi(-beta) - Phi(-alpha), and log(-expm1(.)) when the two are close."""
    upper = beta > 0
    hi, lo = torch.where(upper, -beta, alpha), torch.where(upper, -alpha, beta)  # hi > lo, lo <= 0
    l_hi, l_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return l_hi + torch.log(-torch.expm1(l_lo - l_hi))


def square_posterior(y, s, t, a):
    """One coordinate y (B, 1) at s = 1 - t, t (B, 1), of squares starting at a (8,): (log p_a(y), E[u | y, a]),
    each (B, 8), for u ~ U[a, a + 1) and y = s u + t e."""
    alpha = (y - s * a) / t  # (B, 8)
    beta = alpha - s / t  # (B, 8) = (y - s (a + 1)) / t
    log_z = log_phi_diff(alpha, beta)  # (B, 8) log(Phi(alpha) - Phi(beta))
    mills = torch.exp(-(beta**2) / 2 - LOG_SQRT_2PI - log_z) - torch.exp(-(alpha**2) / 2 - LOG_SQRT_2PI - log_z)
    return log_z - torch.log(s), y / s - (t / s) * mills


class ExactCheckerboard(torch.nn.Module):
    """The exact velocity v(x_t, t) = (x_t - E[x0 | x_t]) / t of run_toy.checkerboard, a module like ToyMLP."""

    def __init__(self):
        super().__init__()
        corners = [(c, r + c % 2) for c in (-2, -1, 0, 1) for r in (-2, 0)]  # (a_k, b_k): as run_toy.checkerboard
        self.register_buffer("corners", torch.tensor(corners, dtype=torch.float64))  # (8, 2)

    def x0_mean(self, x_t, t):
        """E[x0 | x_t] (B, 2) in float64; t is kept below 1 - 1e-4 (at t = 1 the posterior is the prior)."""
        x, t = x_t.double(), t.double().clamp(max=1 - 1e-4)[:, None]  # (B, 2), (B, 1)
        s = 1 - t
        log_px, mx = square_posterior(x[:, :1], s, t, self.corners[:, 0])  # (B, 8) each
        log_py, my = square_posterior(x[:, 1:], s, t, self.corners[:, 1])
        w = torch.softmax(log_px + log_py, dim=1)  # (B, 8) posterior of the squares (equal priors)
        return torch.stack([(w * mx).sum(1), (w * my).sum(1)], 1)  # (B, 2)

    def forward(self, x_t, t):
        return ((x_t.double() - self.x0_mean(x_t, t)) / t.double()[:, None]).to(x_t.dtype)  # (B, 2) (D4)


def outside_squares(x):
    """The share of samples x (n, 2) outside the checkerboard's 8 squares: [-2, 2)^2 where floor(x) + floor(y) is
    even (as run_toy.checkerboard draws them). A continuous map of a Gaussian must put some mass there."""
    inside = ((x >= -2) & (x < 2)).all(1) & (torch.floor(x).sum(1) % 2 == 0)
    return 1 - inside.double().mean().item()


def log_density(x_t, t):
    """log p_t(x_t) (B,) in closed form: the mixture of the 8 squares' smoothed densities, each 1/8."""
    x, t = x_t.double(), t.double()[:, None]  # (B, 2), (B, 1)
    corners = ExactCheckerboard().corners  # (8, 2)
    log_px, _ = square_posterior(x[:, :1], 1 - t, t, corners[:, 0])  # (B, 8)
    log_py, _ = square_posterior(x[:, 1:], 1 - t, t, corners[:, 1])
    return torch.logsumexp(log_px + log_py, dim=1) - math.log(8)  # (B,)


def monte_carlo_x0_mean(x_t, t, n=1_000_000, seed=0):
    """E[x0 | x_t] by self-normalised importance sampling -- x0 drawn from the data, weighted by N(x_t; (1-t) x0,
    t^2 I) -- and its standard error: ((B, 2), (B, 2))."""
    x0 = run_toy.draw("checkerboard", n, torch.Generator().manual_seed(seed)).double()  # (n, 2)
    w = torch.softmax(-((x_t.double()[:, None] - (1 - t) * x0[None]) ** 2).sum(-1) / (2 * t**2), dim=1)  # (B, n)
    mean = w @ x0  # (B, 2)
    return mean, ((w**2) @ x0**2 - 2 * mean * (w**2 @ x0) + (w**2).sum(1, keepdim=True) * mean**2).sqrt()


def check_exact_velocity(n_points=16, n_mc=1_000_000):
    """Two independent checks of E[x0 | x_t] at points of the path, t from 0.9 down to 0.02: (the largest deviation
    from Monte Carlo in its standard errors, for t >= 0.15; the largest deviation from Tweedie's formula
    E[x0 | x_t] = (x_t + t^2 grad log p_t(x_t)) / (1 - t), the gradient by autograd of the closed-form density
    (D3))."""
    g = torch.Generator().manual_seed(1)
    mc_z, tweedie = 0.0, 0.0
    for t in (0.9, 0.6, 0.3, 0.15, 0.05, 0.02):
        x_t = (1 - t) * run_toy.draw("checkerboard", n_points, g) + t * torch.randn(n_points, 2, generator=g)
        tt = torch.full((n_points,), t, dtype=torch.float64)
        exact = ExactCheckerboard().x0_mean(x_t, tt)  # (B, 2)
        x = x_t.double().requires_grad_(True)
        (score,) = torch.autograd.grad(log_density(x, tt).sum(), x)  # (B, 2)
        tweedie = max(tweedie, (exact - (x + t**2 * score) / (1 - t)).abs().max().item())
        if t >= 0.15:  # below, too few data points fall near x_t for Monte Carlo
            mean, se = monte_carlo_x0_mean(x_t, t, n_mc)
            mc_z = max(mc_z, ((exact - mean).abs() / se).max().item())
    return mc_z, tweedie


class ExactTeacherBackbone(sf.ToyBackbone):
    """The toy backbone with the exact velocity as the teacher of the loss; the generator and the fake network start
    as copies of `init` (the demo's trained MLP), as they start from the teacher in the demo."""

    def __init__(self, init):
        super().__init__(init)  # device and sample shape from the MLP
        self.init, self.teacher = init, ExactCheckerboard().to(self.device).requires_grad_(False)

    def trainable_copy(self, dtype):
        return copy.deepcopy(self.init).to(dtype).requires_grad_(True).train()


def main(argv=None):
    p = sf.Parser(prog="experiments/toy_exact_teacher.py", description=__doc__)
    sf.add_config_flags(p, skip=run_toy.NOT_HERE + ("out", "eval_every"), presets={"toy": "toy"})
    p.add_argument(
        "--out",
        default=sf.PRESETS["toy"]["out"],
        help="run_toy.py's folder: its cached teacher, and the run under runs/ [default: %(default)s]",
    )
    args, overrides = run_toy.parse_flags(p, argv, run_toy.NOT_HERE)
    run_toy.strict_sums()  # as run_toy.py: the thread count changes no sum
    mc_z, tweedie = check_exact_velocity()
    print(
        f"exact E[x0 | x_t]: within {mc_z:.1f} standard errors of Monte Carlo (1e6 samples), within {tweedie:.0e} of "
        "Tweedie's formula on its closed-form density"
    )
    assert mc_z < 5 and tweedie < 1e-8, (mc_z, tweedie)
    config = sf.make_config("toy", **overrides)
    mlp, _ = run_toy.train_teacher("checkerboard", config.seed, os.path.join(args.out, "teacher-checkerboard.pt"))
    exact = ExactTeacherBackbone(mlp)
    ev = run_toy.Evaluation("checkerboard", 16384 // run_toy.R, run_toy.R, config.seed, max_steps=max(4, config.steps))

    def euler(velocity, steps):  # a sampler of a replicate's noises (n, K, 2): Euler from the first of them, z
        return lambda noises: sf.euler_sample(velocity, noises[:, 0], steps)

    rows = {
        "trained teacher, 128 Euler steps": ev.samples(euler(mlp, 128), 1),
        # closer to the trained teacher's own distribution (its ODE's limit), where a perfect student of it would end
        "trained teacher, 1024 Euler steps": ev.samples(euler(mlp, 1024), 1),
        "exact teacher, 128 Euler steps": ev.samples(euler(exact.teacher, 128), 1),
        "exact teacher, 4 Euler steps": ev.samples(euler(exact.teacher, 4), 1),
    }
    # the demo's student (run_toy.py with the same flags: its run is shared, reused when it has run) and the exact one
    for name, backbone in (("SiD", sf.ToyBackbone(mlp)), ("SiD exact teacher", exact)):
        vcfg = dataclasses.replace(config)
        vcfg.out, done = run_toy.run_folder(
            args.out, name, vcfg, dataset="checkerboard", teacher=run_toy.TEACHER, data_aided=False
        )
        _, res, seconds = run_toy.distil_variant(vcfg, backbone, ev, done)
        print(f"{name}: {vcfg.out}, {'reused' if seconds is None else f'{seconds:.0f} s'}")
        for kind in ("ema", "generator"):
            if res[kind] is not None:  # (no EMA with --ema-decay 0)
                rows[f"{name} student ({kind})"] = ev.samples(
                    lambda noises, net=res[kind]: sf.generate(net, noises, config.noise), config.steps
                )
    ed = {name: ev.distance(xs) for name, xs in rows.items()}
    ref = ed["trained teacher, 128 Euler steps"][0]
    print(f"\nenergy distance to the checkerboard (mean +- standard error over {run_toy.R} replicates, as run_toy.py)")
    print(f"{'sampler':<38} {'distance':>10} {'+-':>9} {'/ trained teacher-128':>22} {'outside squares':>16}")
    for name, (d, se) in ed.items():
        out = sum(outside_squares(x) for x in rows[name]) / len(rows[name])  # the share of mass between squares
        print(f"{name:<38} {d:10.6f} {se:9.6f} {d / ref:22.2f} {100 * out:15.2f}%")


if __name__ == "__main__":
    try:
        main()
    except (sf.UserError, sf.Interrupted) as e:
        print(e, file=sys.stderr)
        sys.exit(2 if isinstance(e, sf.UserError) else 130)
