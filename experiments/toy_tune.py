"""toy_tune.py -- a measured search for the toy preset: each candidate distilled and scored as run_toy.py scores it.

    python experiments/toy_tune.py default                               # the toy preset itself, seed 0
    python experiments/toy_tune.py iters=1200,lr_gen=3e-3 fake_updates=1 --seeds 0 1 2
    python experiments/toy_tune.py iters=1200,betas=0.9/0.999            # Adam's betas changed (a departure)
    python experiments/toy_tune.py fake_schedule=floor0.1 --ema-warmups 4 6
    python experiments/toy_tune.py --table                               # every result so far, one markdown table

Each positional argument is one candidate: comma-separated Config overrides over PRESETS["toy"] (field=value, typed
as the field), or "default" for none. A candidate may also carry departures, each patched into sid_flow for its run:
    betas=B1/B2        both optimizers' Adam betas, instead of the official (0, 0.999)
    fake_betas=B1/B2   the fake network's alone
    gen_betas=B1/B2    the generator's alone
    gen_schedule=S     the generator's learning rate over the run, instead of the preset's cosine from 1 to 0:
                       floorF (the cosine from 1 to F), powP (the cosine to the power P), constant, or warmN (the
                       cosine times a linear warm-up over the first N iterations)
    fake_schedule=S    the fake network's, the same shapes
    t_loc=M, t_scale=S sample_t's logit-normal, sigmoid(N(M, S^2)), instead of the official (ln 2, 1.6)
    gen_batches=N      the generator update on N micro-batches of batch_size (N times the samples)
    late_batches=N@F   both networks' updates on N micro-batches from the fraction F of the run on
    gen_times=T1/.../TK  the generator's K input times, falling from 1, instead of sf.generator_times' 1 - (k-1)/K
--ema-warmups G ...: also keep, in the same run, EMAs whose warm-up is min(decay, (1 + s) / (G + s)) instead of
the candidate's ema_warmup (the toy preset's: 5), and score each: at step s such an EMA averages over about
s / (G - 1) iterations (G = 10: roughly the last tenth of the run; G = 5: the last quarter; G = 4: the last third).
For every seed the teacher is run_toy.py's (trained once, cached in ROOT/teacher-checkerboard[-seedS].pt), the
evaluation is run_toy.py's (4 replicates of 4096 scrambled-Sobol points, seeded by S), and the yardstick is the
teacher's 128-step Euler sampler; each candidate is distilled in memory (nothing written) and its EMA student scored.
One line per (candidate, seed): the student's energy distance / teacher-128's, and the seconds sf.distill took; every
line is also appended to ROOT/results.jsonl. Runs with --threads threads (default 1): set OMP_NUM_THREADS and
MKL_NUM_THREADS to the same number, so that the timings are the ones a run_toy.py run at that many threads sees.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import unittest.mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run_toy.py, sid_flow.py
import run_toy  # noqa: E402
import sid_flow as sf  # noqa: E402

DATASET = "checkerboard"
FIELDS = {f.name: getattr(f.type, "__name__", f.type) for f in dataclasses.fields(sf.Config)}  # name -> 'int', ...
# a candidate's keys that are no Config field: the departures of the docstring, patched into sf for one run
DEPARTURES = (
    "betas",
    "fake_betas",
    "gen_betas",
    "gen_schedule",
    "fake_schedule",
    "t_loc",
    "t_scale",
    "gen_batches",
    "late_batches",
    "gen_times",
)


def parse_candidate(spec):
    """'k=v,k=v' (or 'default') -> (Config overrides, {departure: value string})."""
    overrides, departures = {}, {}
    for item in [] if spec == "default" else spec.split(","):
        try:
            key, value = item.split("=", 1)
            if key in DEPARTURES:
                check_departure(key, value)
                departures[key] = value
            elif key not in FIELDS:
                raise sf.UserError(f"unknown config field {key!r} in candidate {spec!r}")
            else:
                cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true")}.get(FIELDS[key], str)
                overrides[key] = cast(value)
        except ValueError:
            raise sf.UserError(f"cannot read {item!r} in candidate {spec!r} (field=value; see --help)") from None
    if (
        "gen_times" in departures
        and len(departures["gen_times"].split("/")) != sf.make_config("toy", **overrides).steps
    ):
        raise sf.UserError(f"gen_times: one time per generator step ({spec!r})")
    if any(key.endswith("schedule") for key in departures) and overrides.get("lr_schedule", "cosine") != "cosine":
        raise sf.UserError(f"a schedule departure reshapes the preset's cosine: not with lr_schedule= ({spec!r})")
    return overrides, departures


def check_departure(key, value):
    """Fail before any training, in one line, on a departure's value the run could not use."""
    if key.endswith("betas"):
        betas = [float(b) for b in value.split("/")]
        valid = len(betas) == 2 and all(0 <= b < 1 for b in betas)
    elif key.endswith("schedule"):
        valid = schedule_shape(value) is not None
    elif key == "gen_batches":
        valid = int(value) >= 1
    elif key == "gen_times":
        times = [float(x) for x in value.split("/")]
        valid = times[0] == 1 and all(a > b > 0 for a, b in zip(times, times[1:], strict=False))
    elif key == "late_batches":
        n, fraction = value.split("@")
        valid = int(n) >= 1 and 0 <= float(fraction) <= 1
    else:
        valid = math.isfinite(float(value))
    if not valid:
        raise sf.UserError(f"{key}={value}: not a value it takes (see --help)")


SHAPES = dict(constant=None, floor=lambda f: 0 <= f <= 1, pow=lambda p: p > 0, warm=lambda n: n >= 1)


def schedule_shape(shape):
    """'floor0.1' -> ('floor', 0.1), 'constant' -> ('constant', None); None for a shape it does not take."""
    kind = next((k for k in SHAPES if shape.startswith(k)), None)
    if kind is None or (kind == "constant") != (shape == "constant"):
        return None
    number = None if kind == "constant" else float(shape[len(kind) :])
    return (kind, number) if kind == "constant" or SHAPES[kind](number) else None


def schedule_scale(kind, number, cosine, step):
    """The learning rate's factor for a shape (schedule_shape's), given the preset's cosine factor at this step."""
    if kind == "constant":
        return 1.0
    if kind == "floor":
        return number + (1 - number) * cosine
    if kind == "pow":
        return cosine**number
    return cosine * min(1.0, (step + 1) / number)  # warm


class Scheduled(dict):
    """An optimizer's param group whose 'lr', as SiD.iteration writes it (base rate x the preset's cosine), is
    rewritten by schedule_scale: the step is read back from the cosine factor."""

    def __init__(self, group, base, shape, iters):
        super().__init__(group)
        self.base, self.shape, self.iters = base, schedule_shape(shape), iters  # shape: (kind, number)

    def __setitem__(self, key, value):
        if key == "lr":
            cosine = value / self.base
            step = self.iters * math.acos(max(-1.0, min(1.0, 2 * cosine - 1))) / math.pi
            value = self.base * schedule_scale(*self.shape, cosine, step)
        super().__setitem__(key, value)


@contextlib.contextmanager
def patched(cfg, departures, ema_warmups):
    """sf patched for one run of `cfg` with the candidate's departures; yields {G: the extra EMA} (filled at the
    first step)."""
    official_make_optimizers = sf.make_optimizers
    official_ema_update = sf.ema_update
    official_generator_update = sf.SiD.generator_update
    official_iteration = sf.SiD.iteration
    extra_emas = {}

    def make_optimizers(config, generator, fake):
        opts = official_make_optimizers(config, generator, fake)
        for name, opt in opts.items():
            key = "gen" if name == "generator" else name
            betas = departures.get(f"{key}_betas", departures.get("betas"))
            if betas:
                opt.param_groups[0]["betas"] = tuple(float(b) for b in betas.split("/"))
            if f"{key}_schedule" in departures:
                shape = departures[f"{key}_schedule"]
                opt.param_groups[0] = Scheduled(opt.param_groups[0], opt.defaults["lr"], shape, config.iters)
        return opts

    loc, scale = float(departures.get("t_loc", math.log(2.0))), float(departures.get("t_scale", 1.6))

    def sample_t(n, rng):
        return torch.sigmoid(torch.randn(n, generator=rng, device=rng.device) * scale + loc)

    def ema_update(ema, net, decay, warmup, step):
        for G in ema_warmups:
            if G not in extra_emas:
                extra_emas[G] = copy.deepcopy(ema)
            official_ema_update(extra_emas[G], net, decay, G, step)
        official_ema_update(ema, net, decay, warmup, step)

    def generator_update(sid, k, gan_weight):  # on gen_batches micro-batches of the global batch
        micro_batches = sid.config.grad_accum
        sid.config.grad_accum = int(departures["gen_batches"])
        try:
            return official_generator_update(sid, k, gan_weight)
        finally:
            sid.config.grad_accum = micro_batches

    late_n, late_fraction = departures.get("late_batches", "1@1").split("@")
    late_n, late_fraction = int(late_n), float(late_fraction)
    own_micro_batches = cfg.grad_accum

    def iteration(sid, step):  # from late_batches' fraction of the run on, N micro-batches for both networks
        late = step >= late_fraction * sid.config.iters
        sid.config.grad_accum = late_n if late else own_micro_batches
        return official_iteration(sid, step)

    def generator_times(K):  # the rollout's and the evaluation's (sf.generate) alike; K checked by parse_candidate
        return [float(x) for x in departures["gen_times"].split("/")]

    patches = {"make_optimizers": make_optimizers, "ema_update": ema_update}  # sf's name -> its stand-in
    if "gen_times" in departures:
        patches["generator_times"] = generator_times
    if "t_loc" in departures or "t_scale" in departures:
        patches["sample_t"] = sample_t
    methods = {}  # sf.SiD's
    if "gen_batches" in departures:
        methods["generator_update"] = generator_update
    if "late_batches" in departures:
        methods["iteration"] = iteration
    with contextlib.ExitStack() as undo:  # every patch undone on leaving, however the run ends
        for owner, stand_ins in ((sf, patches), (sf.SiD, methods)):
            for name, stand_in in stand_ins.items():
                undo.enter_context(unittest.mock.patch.object(owner, name, stand_in))
        yield extra_emas


class Seed:
    """One seed's teacher, evaluation and teacher-128 distance, built once."""

    def __init__(self, seed, root):
        path = os.path.join(root, f"teacher-{DATASET}{f'-seed{seed}' if seed else ''}.pt")
        self.seed, (self.teacher, _) = seed, run_toy.train_teacher(DATASET, seed, path)
        self.ev = run_toy.Evaluation(DATASET, 16384 // run_toy.R, run_toy.R, seed, max_steps=4)
        euler = lambda noises: sf.euler_sample(self.teacher, noises[:, 0], 128)  # noqa: E731
        self.ref128 = self.ev.distance(self.ev.samples(euler, 1))[0]

    def score(self, net, cfg):
        """The student's (mean, standard error) energy distance over the replicates, as run_toy.py's table."""
        return self.ev.distance(self.ev.samples(lambda noises: sf.generate(net, noises, cfg.noise), cfg.steps))

    def run(self, spec, curve_points=0, ema_warmups=()):
        overrides, departures = parse_candidate(spec)
        cfg = sf.make_config("toy", **overrides, seed=self.seed)
        cfg.out, cfg.save_every = "", 0  # in memory: nothing written
        curve = []
        if curve_points:  # replicate 0 of the EMA student during the run (not timed)
            cfg.eval_every = max(1, cfg.iters // curve_points)

        def on_eval(step, gen, ema):
            t0 = time.time()
            x = sf.generate(gen if ema is None else ema, self.ev.inputs(0, cfg.steps), cfg.noise)
            d = run_toy.energy_distance(x, self.ev.data[0], run_toy.DIRECTIONS, False)
            curve.append((step, round(d / self.ref128, 3)))
            eval_seconds[0] += time.time() - t0

        eval_seconds = [0.0]
        with patched(cfg, departures, ema_warmups) as extra_emas:
            t0 = time.time()
            res = sf.distill(cfg, sf.ToyBackbone(self.teacher), on_eval=on_eval if curve_points else None)
            seconds = time.time() - t0 - eval_seconds[0]
            # scored inside: a gen_times departure is the student's sampler too
            d, se = self.score(res["ema"] if res["ema"] is not None else res["generator"], cfg)
            warmups = {G: round(self.score(ema, cfg)[0] / self.ref128, 4) for G, ema in extra_emas.items()}
        return dict(
            spec=spec,
            seed=self.seed,
            ratio=round(d / self.ref128, 4),
            se_ratio=round(se / self.ref128, 4),
            distance=d,
            teacher128=self.ref128,
            seconds=round(seconds, 1),
            threads=torch.get_num_threads(),
            mkl_cbwr=os.environ.get("MKL_CBWR"),  # "AUTO,STRICT" (run_toy.strict_sums), or None: MKL's default sums
            skipped=res["skipped"],
            curve=curve,
            config={k: v for k, v in dataclasses.asdict(cfg).items() if k in overrides},
            departures=departures,
            ema_warmup=cfg.ema_warmup,  # the G of the scored EMA (the preset's, unless the candidate sets it)
            ema_warmups=warmups,
        )


def table(path):
    """The markdown table of every line of results.jsonl, then each candidate's mean and worst over its seeds."""
    if not os.path.isfile(path):
        raise sf.UserError(f"{path}: no results yet (distil a candidate first, or give --root)")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    sums = lambda r: "strict" if "STRICT" in (r.get("mkl_cbwr") or "") else "MKL's default"  # noqa: E731
    warmup = lambda r: r.get("ema_warmup", 10)  # noqa: E731  (rows from before the setting: the preset's G was 10)
    print(
        "| candidate (overrides of the toy preset) | seed | / teacher-128 | +- | distill s | threads | sums | EMA G |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['spec']}` | {r['seed']} | {r['ratio']:.3f} | {r['se_ratio']:.3f} | {r['seconds']:.1f} "
            f"| {r['threads']} | {sums(r)} | {warmup(r)} |"
        )
    by_spec = {}
    for r in rows:  # the last result of each (candidate, seed, threads, sums, the EMA's G)
        by_spec.setdefault((r["spec"], r["threads"], sums(r), warmup(r)), {})[r["seed"]] = r["ratio"]
    print("\n| candidate | threads | sums | EMA G | seeds | mean | worst |\n|---|---|---|---|---|---|---|")
    for (spec, threads, kind, G), ratios in by_spec.items():
        if len(ratios) > 1:
            mean = sum(ratios.values()) / len(ratios)
            seeds = ", ".join(f"{s}: {v:.3f}" for s, v in sorted(ratios.items()))
            print(f"| `{spec}` | {threads} | {kind} | {G} | {seeds} | {mean:.3f} | {max(ratios.values()):.3f} |")


def main(argv=None):
    p = sf.Parser(prog="experiments/toy_tune.py", description=__doc__)
    p.add_argument("candidates", nargs="*", help="'field=value,...' over the toy preset, or 'default'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds [default: 0]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [default: 1]")
    p.add_argument("--curve", type=int, default=0, help="points of replicate 0's distance during each run [0: none]")
    p.add_argument(
        "--ema-warmups", type=float, nargs="+", default=[], help="G of extra EMAs, warm-up (1 + s)/(G + s) [none]"
    )
    p.add_argument("--root", default="out/toy-tune", help="teachers and results.jsonl [default: %(default)s]")
    p.add_argument("--table", action="store_true", help="print ROOT/results.jsonl as a table, and run nothing")
    args = p.parse_args(argv)
    if args.table:
        return table(os.path.join(args.root, "results.jsonl"))
    run_toy.strict_sums()  # as run_toy.py: the thread count changes no sum
    torch.set_num_threads(args.threads)
    os.makedirs(args.root, exist_ok=True)
    for spec in args.candidates:
        parse_candidate(spec)  # fail before any training
    if any(not G >= 1 for G in args.ema_warmups):
        raise sf.UserError(f"--ema-warmups: each G at least 1, got {args.ema_warmups}")
    for s in args.seeds:
        seed = Seed(s, args.root)
        for spec in args.candidates:
            r = seed.run(spec, args.curve, args.ema_warmups)
            with open(os.path.join(args.root, "results.jsonl"), "a") as f:
                f.write(json.dumps(r) + "\n")
            curve = " ".join(f"{step}:{ratio}" for step, ratio in r["curve"])
            print(
                f"{spec:<60} seed {s}  {r['ratio']:6.3f} +- {r['se_ratio']:.3f} x teacher-128  "
                f"{r['seconds']:6.1f} s ({r['threads']} thr)  {curve}"
                + "".join(f"  EMA warm-up G={G:g}: {v:.3f}" for G, v in r["ema_warmups"].items()),
                flush=True,
            )


if __name__ == "__main__":
    torch.set_num_threads(1)  # one thread unless --threads says otherwise
    try:
        main()
    except (sf.UserError, sf.Interrupted) as e:
        print(f"error: {e}" if isinstance(e, sf.UserError) else e, file=sys.stderr)
        sys.exit(2 if isinstance(e, sf.UserError) else 130)
