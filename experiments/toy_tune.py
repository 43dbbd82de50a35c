"""toy_tune.py -- a measured search for the toy preset: each candidate distilled and scored as run_toy.py scores it.

    python experiments/toy_tune.py default                               # the toy preset itself, seed 0
    python experiments/toy_tune.py iters=1200,lr_gen=3e-3 fake_updates=1 --seeds 0 1 2
    python experiments/toy_tune.py iters=1200,betas=0.9/0.999            # Adam's betas changed (a departure)
    python experiments/toy_tune.py --table                               # every result so far, one markdown table

Each positional argument is one candidate: comma-separated Config overrides over PRESETS["toy"] (field=value, typed
as the field), or "default" for none; `betas=B1/B2` replaces the official Adam betas (0, 0.999) of both optimizers.
For every seed the teacher is run_toy.py's (trained once, cached in ROOT/teacher-checkerboard[-seedS].pt), the
evaluation is run_toy.py's (4 replicates of 4096 scrambled-Sobol points, seeded by S), and the yardstick is the
teacher's 128-step Euler sampler; each candidate is distilled in memory (nothing written) and its EMA student scored.
One line per (candidate, seed): the student's energy distance / teacher-128's, and the seconds sf.distill took; every
line is also appended to ROOT/results.jsonl. Runs with --threads threads (default 1): set OMP_NUM_THREADS and
MKL_NUM_THREADS to the same number, so that the timings are the ones a run_toy.py run at that many threads sees.
"""

import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run_toy.py, sid_flow.py
import run_toy  # noqa: E402
import sid_flow as sf  # noqa: E402

DATASET = "checkerboard"
FIELDS = {f.name: getattr(f.type, "__name__", f.type) for f in dataclasses.fields(sf.Config)}  # name -> 'int', ...


def parse_candidate(spec):
    """'k=v,k=v' (or 'default') -> (Config overrides, Adam betas or None)."""
    overrides, betas = {}, None
    for item in [] if spec == "default" else spec.split(","):
        key, value = item.split("=", 1)
        if key == "betas":
            betas = tuple(float(b) for b in value.split("/"))
        elif key not in FIELDS:
            raise sf.UserError(f"unknown config field {key!r} in candidate {spec!r}")
        else:
            cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true")}.get(FIELDS[key], str)
            overrides[key] = cast(value)
    return overrides, betas


def with_betas(betas):
    """sf.make_optimizers, or a wrapper that sets both optimizers' Adam betas to `betas`."""
    official = sf.make_optimizers
    if betas is None:
        return official

    def make_optimizers(cfg, generator, fake):
        opts = official(cfg, generator, fake)
        for opt in opts.values():
            for group in opt.param_groups:
                group["betas"] = betas
            opt.defaults["betas"] = betas
        return opts

    return make_optimizers


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

    def run(self, spec, curve_points=0):
        overrides, betas = parse_candidate(spec)
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
        sf.make_optimizers, official = with_betas(betas), sf.make_optimizers
        try:
            t0 = time.time()
            res = sf.distill(cfg, sf.ToyBackbone(self.teacher), on_eval=on_eval if curve_points else None)
            seconds = time.time() - t0 - eval_seconds[0]
        finally:
            sf.make_optimizers = official
        d, se = self.score(res["ema"] if res["ema"] is not None else res["generator"], cfg)
        return dict(
            spec=spec,
            seed=self.seed,
            ratio=round(d / self.ref128, 4),
            se_ratio=round(se / self.ref128, 4),
            distance=d,
            teacher128=self.ref128,
            seconds=round(seconds, 1),
            threads=torch.get_num_threads(),
            skipped=res["skipped"],
            curve=curve,
            config={k: v for k, v in dataclasses.asdict(cfg).items() if k in overrides},
            betas=betas,
        )


def table(path):
    """The markdown table of every line of results.jsonl, then each candidate's mean and worst over its seeds."""
    if not os.path.isfile(path):
        raise sf.UserError(f"{path}: no results yet (distil a candidate first, or give --root)")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    print("| candidate (overrides of the toy preset) | seed | / teacher-128 | +- | distill s | threads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['spec']}` | {r['seed']} | {r['ratio']:.3f} | {r['se_ratio']:.3f} | {r['seconds']:.1f} "
            f"| {r['threads']} |"
        )
    by_spec = {}
    for r in rows:  # the last result of each (candidate, seed, threads)
        by_spec.setdefault((r["spec"], r["threads"]), {})[r["seed"]] = r["ratio"]
    print("\n| candidate | threads | seeds | mean | worst |\n|---|---|---|---|---|")
    for (spec, threads), ratios in by_spec.items():
        if len(ratios) > 1:
            mean = sum(ratios.values()) / len(ratios)
            seeds = ", ".join(f"{s}: {v:.3f}" for s, v in sorted(ratios.items()))
            print(f"| `{spec}` | {threads} | {seeds} | {mean:.3f} | {max(ratios.values()):.3f} |")


def main(argv=None):
    p = sf.Parser(prog="experiments/toy_tune.py", description=__doc__)
    p.add_argument("candidates", nargs="*", help="'field=value,...' over the toy preset, or 'default'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds [default: 0]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [default: 1]")
    p.add_argument("--curve", type=int, default=0, help="points of replicate 0's distance during each run [0: none]")
    p.add_argument("--root", default="out/toy-tune", help="teachers and results.jsonl [default: %(default)s]")
    p.add_argument("--table", action="store_true", help="print ROOT/results.jsonl as a table, and run nothing")
    args = p.parse_args(argv)
    if args.table:
        return table(os.path.join(args.root, "results.jsonl"))
    torch.set_num_threads(args.threads)
    os.makedirs(args.root, exist_ok=True)
    for spec in args.candidates:
        parse_candidate(spec)  # fail before any training
    for s in args.seeds:
        seed = Seed(s, args.root)
        for spec in args.candidates:
            r = seed.run(spec, args.curve)
            with open(os.path.join(args.root, "results.jsonl"), "a") as f:
                f.write(json.dumps(r) + "\n")
            curve = " ".join(f"{step}:{ratio}" for step, ratio in r["curve"])
            print(
                f"{spec:<60} seed {s}  {r['ratio']:6.3f} +- {r['se_ratio']:.3f} x teacher-128  "
                f"{r['seconds']:6.1f} s ({r['threads']} thr)  {curve}",
                flush=True,
            )


if __name__ == "__main__":
    torch.set_num_threads(1)  # one thread unless --threads says otherwise
    try:
        main()
    except (sf.UserError, sf.Interrupted) as e:
        print(f"error: {e}" if isinstance(e, sf.UserError) else e, file=sys.stderr)
        sys.exit(2 if isinstance(e, sf.UserError) else 130)
