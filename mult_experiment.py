"""
Run multiplication configs over several seeds and print a Markdown table of the results (the paper's OOD experiment).

    python prepare_mult.py
    python mult_experiment.py                                  # baseline, GAPT, always; seeds 0 1 2
    python mult_experiment.py --seeds 0 1 2 3 --jobs 2         # two runs at a time, one thread each
    python mult_experiment.py --table_only                     # re-read finished runs, print the table again
    python mult_experiment.py --configs config/mult_gapt.py config/mult_gapt.py+mbe_center=True+mbe_floor=0.5

A config may carry its own overrides after `+` (one row of an ablation each); `--set` applies to every run. Every run
is `python train.py CONFIG --seed=S --out_dir=OUT_ROOT/NAME-sS`; the table is read back from each run's log.jsonl
(the final evaluation). Model selection uses nothing here: all numbers are at the last step. Any config works: runs
without the multiplication metrics (a text config) are tabulated by their validation CE.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = ["config/mult_baseline.py", "config/mult_gapt.py", "config/mult_always.py"]


def run_name(config, overrides):
    name = os.path.splitext(os.path.basename(config))[0]
    return name + "".join(f"+{o.replace('=', '_')}" for o in overrides)


def parse_spec(spec):
    """'config/x.py+key=value+key2=value2' -> ('config/x.py', ['key=value', 'key2=value2'])"""
    config, *overrides = spec.split("+")
    return config, overrides


def final_metrics(out_dir):
    """The last eval record and the last train record of a run, merged; None if the run has not finished (the
    script marks a finished run with a file named `done`)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path) or not os.path.exists(os.path.join(out_dir, "done")):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    if not evals or not trains:
        return None
    last_eval, last_train = evals[-1], trains[-1]
    gapt = last_train.get("gapt")
    if gapt is not None:
        compress_fraction, switches = gapt["compress_steps"] / last_train["iter"], gapt["switches"]
    else:  # "off" never compresses, "always" always does
        compress_fraction, switches = float(last_train["phase"] == 2), 0
    return {"iter": last_eval["iter"], "id_ce": last_eval.get("id_answer_ce"),
            "ood_ce": last_eval.get("ood_answer_ce"), "id_exact": last_eval.get("id_exact"),
            "ood_exact": last_eval.get("ood_exact"), "val_ce": last_eval["val_ce"],
            "mbe": last_eval["val_mbe"], "mbe_layers": last_eval["val_mbe_layers"],
            "compress_fraction": compress_fraction, "switches": switches,
            "id_exact_by_digits": last_eval.get("id_exact_by_digits")}


def mean_std(values, fmt):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():{fmt}} ± {values.std(ddof=1) if len(values) > 1 else 0.0:{fmt}}"


def table(results):
    """results: {run name: [metrics per seed]} -> Markdown table, plus the OOD-CE (multiplication) or validation-CE
    (text) change of each run against the first."""
    mult = all(r["ood_ce"] is not None for runs in results.values() for r in runs)
    task_columns = ["ID answer-CE", "OOD answer-CE", "ID exact", "OOD exact"] if mult else ["val CE"]
    columns = ["run", "seeds", *task_columns, "final MBE (regularised)", "compression steps", "phase switches",
               "final MBE per layer"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, runs in results.items():
        if mult:
            task = [mean_std([r["id_ce"] for r in runs], ".3f"), mean_std([r["ood_ce"] for r in runs], ".3f"),
                    mean_std([100 * r["id_exact"] for r in runs], ".1f") + "%",
                    mean_std([100 * r["ood_exact"] for r in runs], ".1f") + "%"]
        else:
            task = [mean_std([r["val_ce"] for r in runs], ".3f")]
        per_layer = np.mean([r["mbe_layers"] for r in runs], axis=0)
        lines.append("| " + " | ".join([name, str(len(runs)), *task, mean_std([r["mbe"] for r in runs], ".3f"),
                                         f"{np.mean([100 * r['compress_fraction'] for r in runs]):.0f}%",
                                         f"{np.mean([r['switches'] for r in runs]):.1f}",
                                         " ".join(f"{v:.2f}" for v in per_layer)]) + " |")
    names = list(results)
    by_digits = [r["id_exact_by_digits"] for runs in results.values() for r in runs]
    if mult and by_digits and all(by_digits):  # ID exact match per operand lengths ("2x3": a has 2 digits, b 3)
        strata = sorted({k for d in by_digits for k in d})
        lines += ["", "ID exact match by operand lengths (mean over seeds):", "",
                  "| run | " + " | ".join(strata) + " |", "|" + "---|" * (len(strata) + 1)]
        for name, runs in results.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * np.mean([r['id_exact_by_digits'].get(k, np.nan) for r in runs]):.0f}%" for k in strata) + " |")
    if len(names) > 1:
        key, what = ("ood_ce", "OOD answer-CE") if mult else ("val_ce", "validation CE")
        base = np.mean([r[key] for r in results[names[0]]])
        lines.append("")
        for name in names[1:]:
            change = (np.mean([r[key] for r in results[name]]) - base) / base
            paper = " (the paper reports a 35% OOD improvement for GAPT)" if mult else ""
            lines.append(f"- {name}: {what} {abs(change):.1%} {'lower (better)' if change < 0 else 'higher (worse)'}"
                         f" than {names[0]}{paper}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--out_root", default="out-mult-experiment")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets --num_threads=THREADS)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: 2 // jobs, at least 1)")
    parser.add_argument("--table_only", action="store_true", help="do not train; tabulate the finished runs")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="extra train.py arguments")
    args = parser.parse_args(argv)
    specs = [parse_spec(spec) for spec in args.configs]
    for config, _ in specs:
        if not os.path.isfile(config):
            parser.error(f"config {config!r} not found")
    threads = args.threads or max(1, 2 // args.jobs)
    runs = [(config, overrides, seed, os.path.join(args.out_root, f"{run_name(config, overrides + args.set)}-s{seed}"))
            for config, overrides in specs for seed in args.seeds]

    if not args.table_only:
        pending, active = list(runs), []
        while pending or active:
            while pending and len(active) < args.jobs:
                config, overrides, seed, out_dir = pending.pop(0)
                if final_metrics(out_dir) is not None:
                    print(f"[skip] {out_dir} is finished")
                    continue
                os.makedirs(out_dir, exist_ok=True)
                log_path = os.path.join(out_dir, "log.jsonl")
                if os.path.exists(log_path):
                    os.remove(log_path)  # an unfinished run starts again from scratch
                cmd = [sys.executable, os.path.join(HERE, "train.py"), config, f"--seed={seed}",
                       f"--out_dir={out_dir}", f"--num_threads={threads}", *[f"--{o}" for o in overrides + args.set],
                       *args.train_args]
                print("[run]", " ".join(cmd), flush=True)
                stdout = open(os.path.join(out_dir, "stdout.txt"), "w")
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                active.append((subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=env), out_dir,
                               stdout, time.time()))
            time.sleep(1)
            for item in list(active):
                proc, out_dir, stdout, start = item
                if proc.poll() is not None:
                    stdout.close()
                    active.remove(item)
                    if proc.returncode != 0:
                        sys.exit(f"{out_dir} failed (exit {proc.returncode}); see {out_dir}/stdout.txt")
                    open(os.path.join(out_dir, "done"), "w").close()
                    print(f"[done] {out_dir} in {time.time() - start:.0f}s", flush=True)

    results = {}
    for config, overrides, seed, out_dir in runs:
        metrics = final_metrics(out_dir)
        if metrics is None:
            print(f"[missing] {out_dir} has no finished run", file=sys.stderr)
            continue
        results.setdefault(run_name(config, overrides), []).append(metrics)  # rows named by their own overrides
    if args.set:
        print(f"every run: {' '.join('--' + o for o in args.set)}\n")
    print(table(results))


if __name__ == "__main__":
    main()
