"""toy_seeds.py -- error bars that include training: the demo's headline student over several training seeds.

    python experiments/toy_seeds.py                    # seeds 0, 1, 2: 1.5-2.5 min per seed not yet run, 2 cores
    python experiments/toy_seeds.py --seeds 0 1 2 3 4  # more seeds; any other flag goes to run_toy.py as it is

`python run_toy.py --seed S` draws everything from S: the teacher's initial weights and training data, every draw of
the distillation, and the evaluation's scrambled Sobol sets. Seed 0 is the default demo, reused from OUT (out/toy)
when it has run; seed S > 0 runs in OUT/seed-S (its own teacher). Each run's table is printed as run_toy.py prints it;
then one line per seed and the mean +- standard deviation over the seeds (training and evaluation together) beside
the evaluation's own standard error (the mean over the seeds of each run's +- column).
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run_toy.py, sid_flow.py
import torch  # noqa: E402

import run_toy  # noqa: E402
import sid_flow as sf  # noqa: E402

STUDENT, TEACHER_128 = "SiD (4 steps, EMA)", "teacher 128 steps"


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="experiments/toy_seeds.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds [default: 0 1 2]")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (torch.set_num_threads); the default OUT becomes out/toy-threads-N, so that a run "
        "at another thread count is trained anew, not reused: with run_toy.py's strict sums it prints the same "
        "digits [default: torch's, one per core]",
    )
    p.add_argument(
        "--out",
        help=f"seed 0's folder; seed S's is OUT/seed-S [default: {sf.PRESETS['toy']['out']}]",
    )
    args, rest = p.parse_known_args(argv)
    run_toy.strict_sums()  # before the first MKL call, which set_num_threads may be
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or (f"out/toy-threads-{args.threads}" if args.threads else sf.PRESETS["toy"]["out"])
    rows = {}
    for s in args.seeds:
        out = args.out if s == 0 else os.path.join(args.out, f"seed-{s}")
        m = run_toy.main(["--seed", str(s), "--out", out, *rest])
        ed, se = m["energy_distance"], m["standard_error"]
        rows[s] = (ed[STUDENT], se[STUDENT], ed[TEACHER_128], ed[STUDENT] / ed[TEACHER_128])
    threads = torch.get_num_threads()
    print(f"\n{STUDENT} over training seeds (python run_toy.py --seed S {' '.join(rest)}), {threads} thread(s):")
    print(f"{'seed':>6} {'distance':>10} {'+- (eval)':>10} {'teacher-128':>12} {'/ teacher-128':>14}")
    for s, (d, e, t, r) in rows.items():
        print(f"{s:>6} {d:10.6f} {e:10.6f} {t:12.6f} {r:14.2f}")
    (d, d_sd), (t, t_sd), (r, r_sd) = (mean_std([row[i] for row in rows.values()]) for i in (0, 2, 3))
    e = sum(row[1] for row in rows.values()) / len(rows)
    print(f"{'mean':>6} {d:10.6f} {e:10.6f} {t:12.6f} {r:14.2f}")
    print(f"{'std':>6} {d_sd:10.6f} {'':>10} {t_sd:12.6f} {r_sd:14.2f}")
    print(
        f"over {len(rows)} seeds the student's distance is {d:.6f} +- {d_sd:.6f} (std), {r:.2f} +- {r_sd:.2f} times "
        f"its own teacher-128's; the evaluation alone contributes +- {e:.6f}"
    )


if __name__ == "__main__":
    try:
        main()
    except (sf.UserError, sf.Interrupted) as e:
        print(e, file=sys.stderr)
        sys.exit(2 if isinstance(e, sf.UserError) else 130)
