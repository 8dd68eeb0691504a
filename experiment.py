"""
Run configs over several seeds, resumably, and print a Markdown table of the results with per-seed paired differences
against the first config (the baseline).

    python prepare_mult.py
    python experiment.py                                       # multiplication: baseline, GAPT (paper_era), always
    python experiment.py --seeds 0 1 2 3 4 5 --jobs 2          # two runs at a time, one thread each
    python experiment.py --table_only                          # re-read finished runs, print the table again
    python experiment.py --configs config/mult_baseline.py config/mult_baseline.py,config/gapt_algorithm1.py
    python experiment.py --out_root out-text-experiment --jobs 2 --configs config/kernel_docs_baseline.py \
        config/kernel_docs_gapt.py config/kernel_docs_gapt.py+gapt_ema=0.9 config/kernel_docs_always.py

A config may carry its own overrides after `+` (one row of an ablation each); `--set` applies to every run. Every run
is `python train.py CONFIG --seed=S --out_dir=OUT_ROOT/NAME-sS`; the table is read back from each run's log.jsonl
(the final evaluation). Where the data has a test split (prepare_fineweb.py --test_tokens), text runs are also read at
their evaluation with the best validation CE (early stopping): validation chooses that step, test and the
eval_data_dirs corpora are only reported. Stopping this script (Ctrl-C, SIGTERM) stops its runs and waits for them.

Resumable: a run that finished (its log has the evaluation at max_iters) is skipped; one that was stopped resumes from
its last checkpoint (--init_from=resume), or starts again if it wrote none. Stop the script at any time and start it
again with the same arguments; add seeds or configs and only the new runs train.

Multiplication runs are tabulated by their answer metrics; text runs by validation CE and the CE on every
eval_data_dirs corpus (out-of-distribution text). Every row also has GAPT's share of steps compressing, its phase
switches counted by reason, the mean length of a compression phase, and the batch noise of one step's CE (runs with
log_interval=1). Then, per seed, each run's relative difference to the first config's run of the same seed, and for
each metric its mean, standard error, how many seeds are lower, a sign test and a sign-flip permutation test.
--figure PATH --against KEY also draws a metric (default: test CE at the early-stopping step) against a setting, e.g.
test CE against weight_decay: each seed a thin line across the rows that differ in that setting alone, the mean over
the seeds at each value a marker (plot.py's plot_against).
"""

import argparse
import ctypes
import fcntl
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np

from checkpoint import RUNTIME_KEYS, CheckpointError, read_log
from configurator import ConfigError
from gapt_versions import SWITCH_REASONS
from train import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = ["config/mult_baseline.py", "config/mult_baseline.py,config/gapt_paper_era.py",
                   "config/mult_baseline.py,config/gapt_paper_era.py+gapt_mode=always"]
PAPER = {"mult": "the paper reports a 35% lower OOD answer-CE for GAPT",
         "text": "the paper reports, for GPT-2 124M on FineWeb, MBE -50% and CE -4.8% for GAPT"}


def run_name(config, overrides):
    name = os.path.splitext(os.path.basename(config.split(",")[-1]))[0]  # the last of its config files
    return name + "".join(f"+{o.replace('=', '_')}" for o in overrides)


def parse_spec(spec):
    """'config/x.py+key=value+key2=value2' -> ('config/x.py', ['key=value', 'key2=value2']); a config may be
    several files, applied in order: 'config/a.py,config/b.py+key=value'."""
    config, *overrides = spec.split("+")
    return config, overrides


def check_identity(out_dir, identity, record=False):
    """A run is its arguments and the settings they give (config files read now: an edited file is another run):
    out_dir/run.json records those it was started with, and a call that asks for other ones in the same out_dir is
    an error naming the difference (a changed run would be tabulated as the old one)."""
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                started = json.load(f)
            assert isinstance(started, dict)
        except (ValueError, AssertionError, UnicodeDecodeError):
            sys.exit(f"error: {path} is damaged (not the JSON record experiment.py writes); if the run is this call's, "
                     f"delete that file and run this again (it is written anew), else use another --out_root")
        differing = [k for k in identity if k in started and k != "settings" and started[k] != identity[k]]
        differing += [f"settings.{k}" for k in identity["settings"] if k in started.get("settings", {})
                      and started["settings"][k] != identity["settings"][k]]  # run.json before settings: unchecked
        if differing:
            def value(record, key):
                return record["settings"][key[9:]] if key.startswith("settings.") else record.get(key)
            sys.exit(f"error: {out_dir} was started with {', '.join(f'{k}={value(started, k)!r}' for k in differing)}, "
                     f"but this call asks for {', '.join(f'{k}={value(identity, k)!r}' for k in differing)} (a "
                     f"config file edited since, or other arguments); use another --out_root for the new runs, or "
                     f"the arguments and config files of the old ones")
    elif record:  # a run starting (runs from before run.json have none, and are left unchecked)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(identity, f)
        os.replace(tmp, path)


def die_with_parent():
    """In the child before exec: SIGTERM when experiment.py dies, however it dies (SIGKILL, SIGHUP), so that no
    orphan keeps writing into the sweep (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_until_free(out_dir, seconds=60):
    """A run of an earlier call may still be exiting (its parent was killed a moment ago): wait for its lock."""
    path = os.path.join(out_dir, "lock")
    deadline = time.time() + seconds
    while os.path.exists(path):
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                f.seek(0)
                holder = f.read().strip()
        if time.time() > deadline:
            sys.exit(f"error: {out_dir} is in use by {holder or 'another process'}; stop it, then run this again")
        time.sleep(0.5)


def read_records(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    return read_log(path) if os.path.exists(path) else []


def is_finished(out_dir, max_iters=None):
    """A run is finished when this script marked it `done` or its log holds the evaluation at max_iters."""
    if os.path.exists(os.path.join(out_dir, "done")):
        return True
    evals = [r for r in read_records(out_dir) if r.get("kind") == "eval"]
    return max_iters is not None and any(r["iter"] >= max_iters for r in evals)


def final_metrics(out_dir, max_iters=None):
    """The last eval and train records of a finished run, merged, with its switches counted by reason; None if the
    run has not finished."""
    if not is_finished(out_dir, max_iters):
        return None
    records = read_records(out_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    if not evals or not trains:
        return None
    last_eval, last_train = evals[-1], trains[-1]
    gapt = last_train.get("gapt") or {}
    if "compress_steps" in last_train or gapt:  # logged by every mode since the random gate came
        compress_fraction = last_train.get("compress_steps", gapt.get("compress_steps", 0)) / last_train["iter"]
    else:  # older logs: "off" never compresses, "always" always does
        compress_fraction = float(last_train["phase"] == 2)
    switches = gapt.get("switches", 0)
    switches_logged = [r for r in records if r.get("kind") == "switch"]
    reasons = [r.get("reason", "unknown") for r in switches_logged]
    # compression phases: from each switch into phase 2 to the next switch out of it (or the end of the run)
    starts = [r["iter"] for r in switches_logged if r["phase"] == 2]
    ends = [r["iter"] for r in switches_logged if r["phase"] == 1] + [last_train["iter"]]
    phase_lengths = [min([e for e in ends if e > s] or [last_train["iter"]]) - s for s in starts]
    corpora = [k[:-3] for k in last_eval if k.endswith("_ce") and k not in ("val_ce", "train_ce", "test_ce")
               and "answer" not in k]  # the eval_data_dirs corpora (out-of-distribution text)
    best = min(evals, key=lambda r: r["val_ce"])  # early stopping: the checkpoint with the best validation CE
    return {"iter": last_eval["iter"], "id_ce": last_eval.get("id_answer_ce"),
            "ood_ce": last_eval.get("ood_answer_ce"), "id_exact": last_eval.get("id_exact"),
            "ood_exact": last_eval.get("ood_exact"), "near_ce": last_eval.get("near_answer_ce"),
            "near_exact": last_eval.get("near_exact"), "val_ce": last_eval["val_ce"],
            "mbe": last_eval["val_mbe"], "mbe_layers": last_eval["val_mbe_layers"],
            "extra_ce": {k: last_eval[f"{k}_ce"] for k in corpora},
            "extra_ce_best": {k: best.get(f"{k}_ce") for k in corpora}, "best_iter": best["iter"],
            "best_val_ce": best["val_ce"], "test_ce": last_eval.get("test_ce"), "test_ce_best": best.get("test_ce"),
            "gap": last_eval["val_ce"] - last_eval["train_ce"] if "train_ce" in last_eval else None,
            "compress_fraction": compress_fraction, "switches": switches,
            "switch_reasons": {k: reasons.count(k) for k in sorted(set(reasons))},
            "compress_phase_steps": float(np.mean(phase_lengths)) if phase_lengths else None,
            "step_ce_noise": step_ce_noise(trains),
            "id_exact_by_digits": last_eval.get("id_exact_by_digits")}


def step_ce_noise(trains):
    """The batch noise of one step's CE: the standard deviation of the difference between consecutive steps' CE, over
    √2, in the second half of the run (where the trend per step is small). Needs log_interval=1; None otherwise."""
    half = [r for r in trains if r["iter"] > trains[-1]["iter"] / 2]
    if len(half) < 10 or any(b["iter"] - a["iter"] != 1 for a, b in zip(half, half[1:])):
        return None
    return float(np.diff([r["ce"] for r in half]).std() / np.sqrt(2))


def mean_std(values, fmt):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():{fmt}} ± {values.std(ddof=1) if len(values) > 1 else 0.0:{fmt}}"


def paired_tests(diffs):
    """Two-sided p-values that the paired differences are centred on zero: the sign test (exact binomial, ties left
    out) and the sign-flip permutation test on their mean (exact up to 16 seeds, else 100,000 random flips)."""
    d = np.asarray(diffs, dtype=float)
    nonzero = d[d != 0]
    n, k = len(nonzero), int((nonzero > 0).sum())
    sign_p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n) if n else 1.0
    if len(d) <= 16:
        flips = np.array(list(itertools.product((1, -1), repeat=len(d))))
    else:
        flips = np.random.default_rng(0).choice((1, -1), size=(100_000, len(d)))
    perm_p = float(np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12))
    return sign_p, perm_p


def paired_differences(results, metrics):
    """Per seed, each run's metrics minus the first run's at the same seed (relative, in %): a Markdown table and
    one line per run with the mean ± standard deviation over the seeds both have."""
    names = list(results)
    base = results[names[0]]
    lines = ["", f"Paired differences to {names[0]} (same seed; relative change in %, negative = lower):", "",
             "| run | seed | " + " | ".join(label for label, _ in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    summary = []
    for name in names[1:]:
        diffs = []
        for seed, r in sorted(results[name].items()):
            if seed not in base:
                continue
            row = [100 * (get(r) - get(base[seed])) / abs(get(base[seed])) for _, get in metrics]
            diffs.append(row)
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{d:+.1f}%" for d in row) + " |")
        if diffs:
            d = np.array(diffs)
            spread = d.std(0, ddof=1) if len(d) > 1 else np.zeros(len(metrics))
            summary.append(f"- {name} ({len(d)} seed{'s' if len(d) > 1 else ''}): " + ", ".join(
                f"{label} {m:+.1f}% ± {s:.1f}%" + (" (beyond the spread)" if len(d) > 1 and abs(m) > s else "")
                for (label, _), m, s in zip(metrics, d.mean(0), spread)))
            if len(d) < 2:  # one seed: no standard error, no test
                continue
            for (label, _), column in zip(metrics, d.T):  # the headline metric first
                sign_p, perm_p = paired_tests(column)
                sem = column.std(ddof=1) / np.sqrt(len(column))
                summary.append(f"  {label}: mean {column.mean():+.2f}% (standard error {sem:.2f}%), lower on "
                               f"{int((column < 0).sum())} of {len(column)} seeds; sign test p = {sign_p:.3f}, "
                               f"sign-flip permutation test p = {perm_p:.3f} (two-sided)")
    return lines + [""] + summary


def table(results):
    """results: {run name: {seed: metrics}} -> Markdown: a row per run (mean ± std over seeds), then the paired
    differences of each run to the first, seed by seed."""
    runs_of = {name: list(by_seed.values()) for name, by_seed in results.items()}
    mult = all(r["ood_ce"] is not None for runs in runs_of.values() for r in runs)
    extra = sorted({k for runs in runs_of.values() for r in runs for k in r["extra_ce"]})
    split = not mult and any(r["test_ce"] is not None for runs in runs_of.values() for r in runs)
    near = mult and all(r["near_ce"] is not None for runs in runs_of.values() for r in runs)  # data since 2026-12-01
    if mult:
        task_columns = ["ID answer-CE", "OOD answer-CE", "ID exact", "OOD exact"]
        task_columns += ["near-OOD answer-CE", "near-OOD exact"] if near else []
    elif split:  # a test split: early stopping (the eval with the best val CE) beside the last step
        task_columns = ["val CE", "best val CE (step)", "test CE at best val", "test CE at end",
                        *[f"{k} CE at best val" for k in extra], *[f"{k} CE at end" for k in extra],
                        "val − train CE at end"]
    else:
        task_columns = ["val CE", *[f"{k} CE" for k in extra]]
    columns = ["run", "seeds", *task_columns, "final MBE (regularised)", "compression steps", "phase switches",
               f"switches by reason ({' / '.join(SWITCH_REASONS)})", "mean compression phase (steps)",
               "step CE noise", "final MBE per layer"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, runs in runs_of.items():
        if mult:
            task = [mean_std([r["id_ce"] for r in runs], ".3f"), mean_std([r["ood_ce"] for r in runs], ".3f"),
                    mean_std([100 * r["id_exact"] for r in runs], ".1f") + "%",
                    mean_std([100 * r["ood_exact"] for r in runs], ".1f") + "%"]
            task += [mean_std([r["near_ce"] for r in runs], ".3f"),
                     mean_std([100 * r["near_exact"] for r in runs], ".1f") + "%"] if near else []
        elif split:
            task = [mean_std([r["val_ce"] for r in runs], ".3f"),
                    f"{mean_std([r['best_val_ce'] for r in runs], '.3f')} "
                    f"({np.mean([r['best_iter'] for r in runs]):.0f})",
                    mean_std([r["test_ce_best"] for r in runs], ".3f"), mean_std([r["test_ce"] for r in runs], ".3f"),
                    *[mean_std([r["extra_ce_best"].get(k, np.nan) for r in runs], ".3f") for k in extra],
                    *[mean_std([r["extra_ce"].get(k, np.nan) for r in runs], ".3f") for k in extra],
                    mean_std([r["gap"] if r["gap"] is not None else np.nan for r in runs], ".3f")]
        else:
            task = [mean_std([r["val_ce"] for r in runs], ".3f"),
                    *[mean_std([r["extra_ce"].get(k, np.nan) for r in runs], ".3f") for k in extra]]
        reasons = " / ".join(f"{np.mean([r['switch_reasons'].get(k, 0) for r in runs]):.1f}" for k in SWITCH_REASONS)
        per_layer = np.mean([r["mbe_layers"] for r in runs], axis=0)
        phase = [r["compress_phase_steps"] for r in runs if r.get("compress_phase_steps") is not None]
        noise = [r["step_ce_noise"] for r in runs if r.get("step_ce_noise") is not None]
        lines.append("| " + " | ".join([name, str(len(runs)), *task, mean_std([r["mbe"] for r in runs], ".3f"),
                                         f"{np.mean([100 * r['compress_fraction'] for r in runs]):.0f}%",
                                         f"{np.mean([r['switches'] for r in runs]):.1f}", reasons,
                                         f"{np.mean(phase):.1f}" if phase else "—",
                                         f"{np.mean(noise):.3f}" if noise else "—",
                                         " ".join(f"{v:.2f}" for v in per_layer)]) + " |")
    by_digits = [r["id_exact_by_digits"] for runs in runs_of.values() for r in runs]
    if mult and by_digits and all(by_digits):  # ID exact match per operand lengths ("2x3": a has 2 digits, b 3)
        strata = sorted({k for d in by_digits for k in d})
        lines += ["", "ID exact match by operand lengths (mean over seeds):", "",
                  "| run | " + " | ".join(strata) + " |", "|" + "---|" * (len(strata) + 1)]
        for name, runs in runs_of.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * np.mean([r['id_exact_by_digits'].get(k, np.nan) for r in runs]):.0f}%" for k in strata) + " |")
    names = list(results)
    if len(names) > 1:
        key, what = ("ood_ce", "OOD answer-CE") if mult else ("val_ce", "validation CE")
        lines.append("")
        for name in names[1:]:  # means over the seeds both rows have, so a missing seed cannot fake a difference
            seeds = sorted(set(results[name]) & set(results[names[0]]))
            if not seeds:
                continue
            base = np.mean([results[names[0]][s][key] for s in seeds])
            change = (np.mean([results[name][s][key] for s in seeds]) - base) / base
            over = ("means over seeds" if seeds == sorted(results[name]) == sorted(results[names[0]])
                    else f"means over the seeds both have: {' '.join(map(str, seeds))}")
            lines.append(f"- {name}: {what} {abs(change):.1%} {'lower (better)' if change < 0 else 'higher (worse)'}"
                         f" than {names[0]} ({over})")
        if mult:
            metrics = [("OOD answer-CE", lambda r: r["ood_ce"]), ("ID answer-CE", lambda r: r["id_ce"]),
                       *([("near-OOD answer-CE", lambda r: r["near_ce"])] if near else []), ("MBE", lambda r: r["mbe"])]
        elif split:
            metrics = [("test CE at best val", lambda r: r["test_ce_best"]), ("test CE at end", lambda r: r["test_ce"]),
                       *[(f"{k} CE at best val", lambda r, k=k: r["extra_ce_best"][k]) for k in extra],
                       ("MBE", lambda r: r["mbe"])]
        else:
            metrics = [("val CE", lambda r: r["val_ce"]),
                       *[(f"{k} CE", lambda r, k=k: r["extra_ce"][k]) for k in extra], ("MBE", lambda r: r["mbe"])]
        lines += paired_differences(results, metrics)
        lines.append(f"- for comparison, {PAPER['mult' if mult else 'text']}")
    return "\n".join(lines)


FIGURE_METRICS = {"test_ce_best": "test CE at the early-stopping step", "test_ce": "test CE at the end",
                  "best_val_ce": "validation CE at the early-stopping step", "val_ce": "validation CE at the end",
                  "mbe": "validation MBE at the end", "ood_ce": "OOD answer CE at the end",
                  "ood_exact": "OOD exact-answer share at the end"}


def figure_series(rows, results, key, metric):
    """{label: {value of key: {seed: the metric}}}: rows whose settings differ in key alone share a series, labelled
    by the first one's name without key's override. Two rows with the same settings: one line (checked before any run
    with results={})."""
    groups = {}  # the settings other than key -> (label, {value of key: {seed: metric}})
    for config, overrides, settings in rows:
        others = repr(sorted((k, repr(v)) for k, v in settings.items() if k != key))
        label, points = groups.setdefault(others, (run_name(config, [o for o in overrides
                                                                      if o.partition("=")[0] != key]), {}))
        if settings[key] in points:
            sys.exit(f"--figure: the row {run_name(config, overrides)} has the settings of another row "
                     f"({key}={settings[key]!r}); give each row once")
        points[settings[key]] = {seed: m[metric] for seed, m in results.get(run_name(config, overrides), {}).items()
                                 if m.get(metric) is not None}
    series = {}
    for label, points in groups.values():
        while label in series:  # two groups whose names differ only in key's override or an earlier config file
            label += "'"
        if any(points.values()):
            series[label] = {x: values for x, values in points.items() if values}
    return series


def identity_of(config, overrides, train_args, seed, settings):
    return {"configs": config.split(","), "overrides": overrides, "train_args": train_args, "seed": seed,
            "settings": settings}


def default_threads(jobs):
    """torch threads per run when --threads is not given: the machine's cores shared among the runs."""
    return max(1, (os.cpu_count() or 1) // jobs)


PER_RUN_KEYS = ("seed", "out_dir", "overwrite_out_dir", "init_from", "num_threads")  # what this script sets per run


def settings_of(config, overrides, train_args):
    """The run's settings, from train.py's own config loading (files, overrides and train_args count as they do
    there), without what this script sets per run and how it runs (RUNTIME_KEYS)."""
    c = vars(load_config([*config.split(","), *[f"--{o}" for o in overrides], *train_args]))
    return {k: v for k, v in c.items() if k not in PER_RUN_KEYS and k not in RUNTIME_KEYS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--out_root", default="out-mult-experiment")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets --num_threads=THREADS)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: the machine's cores // jobs, at least 1)")
    parser.add_argument("--table_only", action="store_true", help="do not train; tabulate the finished runs")
    parser.add_argument("--figure", metavar="PATH", help="also draw --figure_metric against the setting --against: "
                        "each seed a thin line across the rows that differ in that setting alone, each mean a marker")
    parser.add_argument("--against", metavar="KEY", help="the setting on the figure's x axis (e.g. weight_decay)")
    parser.add_argument("--figure_metric", default="test_ce_best", choices=FIGURE_METRICS)
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="extra train.py arguments")
    args = parser.parse_args(argv)
    if bool(args.figure) != bool(args.against):
        parser.error("--figure and --against go together: give both (e.g. --figure wd.png --against weight_decay)")
    if args.figure:
        from plot import check_writable, image_format, plot_against, write_atomically  # matplotlib only when drawing
        fmt = image_format(args.figure, "--figure")
        args.figure += "" if os.path.splitext(args.figure)[1] else f".{fmt}"
        check_writable(args.figure, "--figure")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more runs at a time")
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        parser.error(f"--seeds lists {' '.join(map(str, repeated))} more than once; give each seed once")
    specs = [parse_spec(spec) for spec in args.configs]
    names = [run_name(config, overrides) for config, overrides in specs]
    if len(set(names)) < len(names):
        twice = ", ".join(sorted({n for n in names if names.count(n) > 1}))
        parser.error(f"two --configs give the same run name ({twice}, named after the last config file and the "
                     f"overrides): write each row once")
    for path in (p for config, _ in specs for p in config.split(",")):
        if not os.path.isfile(path):
            parser.error(f"config {path!r} not found")
    threads = args.threads or default_threads(args.jobs)
    own = sorted({a[2:].partition("=")[0] for a in args.train_args if a.startswith("--")} & set(PER_RUN_KEYS))
    if own:
        parser.error(f"--train_args sets {', '.join(own)}, which experiment.py sets for every run itself (each run "
                     f"its seed from --seeds and its own folder under --out_root): leave them out")
    runs = []
    for config, overrides in specs:
        try:
            settings = settings_of(config, overrides + args.set, args.train_args)
        except ConfigError as e:
            parser.error(f"--configs {'+'.join([config, *overrides])}: {e}")
        max_iters = settings["max_iters"]
        name = run_name(config, overrides + args.set)
        if len(name) > 200 or "/" in name:
            parser.error(f"the run name {name[:60]}... (the last config file and the overrides, --set included) is "
                         f"too long for a folder or holds a '/': pass such settings with --train_args (not named)")
        if args.figure and args.against not in settings:
            parser.error(f"--against {args.against}: no setting of that name; give a config key such as weight_decay")
        if args.figure and type(settings[args.against]) not in (int, float):  # (a bool is not a number here)
            against = settings[args.against]
            parser.error(f"--against {args.against}: not a numeric setting of --configs {'+'.join([config, *overrides])}"
                         f" ({against!r}); give a number-valued key such as weight_decay or dropout")
        for seed in args.seeds:
            out_dir = os.path.join(args.out_root, f"{name}-s{seed}")
            runs.append((config, overrides, seed, out_dir, max_iters, settings))
            check_identity(out_dir, identity_of(config, overrides + args.set, args.train_args, seed, settings))

    rows = [(config, overrides, settings) for config, overrides, seed, _, _, settings in runs if seed == args.seeds[0]]
    if args.figure:
        figure_series(rows, {}, args.against, args.figure_metric)  # two rows with the same settings: stop now
    if not args.table_only:
        pending, active = list(runs), []
        # SIGTERM as Ctrl-C: stop the runs this script started and wait for them (they resume next time)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda number, _: sys.exit(f"experiment.py stopped ({signal.Signals(number).name}); its "
                                                          f"runs resume when it is started again with the same "
                                                          f"arguments"))
        try:
            while pending or active:
                while pending and len(active) < args.jobs:
                    config, overrides, seed, out_dir, max_iters, settings = pending.pop(0)
                    if is_finished(out_dir, max_iters):
                        open(os.path.join(out_dir, "done"), "a").close()  # (killed before it marked a finished run)
                        print(f"[skip] {out_dir} is finished")
                        continue
                    os.makedirs(out_dir, exist_ok=True)
                    check_identity(out_dir, identity_of(config, overrides + args.set, args.train_args, seed, settings),
                                   record=True)
                    wait_until_free(out_dir)
                    resume = os.path.exists(os.path.join(out_dir, "ckpt.pt"))
                    cmd = [sys.executable, os.path.join(HERE, "train.py"), *config.split(","), f"--seed={seed}",
                           f"--out_dir={out_dir}", f"--num_threads={threads}",
                           *[f"--{o}" for o in overrides + args.set], *args.train_args,
                           "--init_from=resume" if resume else "--overwrite_out_dir=True"]
                    print("[resume]" if resume else "[run]", " ".join(cmd), flush=True)
                    stdout = open(os.path.join(out_dir, "stdout.txt"), "a")  # never cut: an earlier run's output stays
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    active.append((subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=env,
                                                    preexec_fn=die_with_parent), out_dir, stdout, time.time()))
                time.sleep(1)
                for item in list(active):
                    proc, out_dir, stdout, start = item
                    if proc.poll() is not None:
                        stdout.close()
                        active.remove(item)
                        if proc.returncode != 0:
                            for other in active:  # stop the rest too; they resume from their checkpoints next time
                                other[0].terminate()
                            sys.exit(f"{out_dir} failed (exit {proc.returncode}); see {out_dir}/stdout.txt")
                        open(os.path.join(out_dir, "done"), "w").close()
                        print(f"[done] {out_dir} in {time.time() - start:.0f}s", flush=True)
        finally:
            for proc, *_ in active:
                if proc.poll() is None:
                    proc.terminate()
            for proc, *_ in active:
                proc.wait()

    results = {}
    for config, overrides, seed, out_dir, max_iters, _ in runs:
        metrics = final_metrics(out_dir, max_iters)
        if metrics is None:
            print(f"[missing] {out_dir} has no finished run", file=sys.stderr)
            continue
        results.setdefault(run_name(config, overrides), {})[seed] = metrics  # rows named by their own overrides
    if args.set:
        print(f"every run: {' '.join('--' + o for o in args.set)}\n")
    if results:
        print(table(results))
    if args.figure:
        series = figure_series(rows, results, args.against, args.figure_metric)
        if not series:
            sys.exit(f"--figure {args.figure}: no finished run has {FIGURE_METRICS[args.figure_metric]} "
                     f"(--figure_metric {args.figure_metric}); nothing drawn")
        write_atomically(args.figure, lambda tmp: plot_against(series, args.against, FIGURE_METRICS[args.figure_metric],
                                                               tmp, fmt))
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:  # a damaged log.jsonl
        sys.exit(f"error: {e}")
