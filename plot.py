"""
Plot one or more runs from their log.jsonl: CE, MBE, the CE/MBE gradient alignment and the GAPT phase.

    python plot.py out-mult-baseline out-mult-gapt -o mult.png
    python plot.py out-mult-gapt -o gapt.png --csv gapt.csv        # also dump the merged series

Panels share the step axis: (1) train CE, validation CE and the CE of every eval_data_dirs corpus (dotted),
(2) mean MBE of the regularised layers (train and validation) with the per-layer validation MBE as thin lines,
(3) the cosine between the gradients of CE and MBE (align_interval runs), with a zero line, (4) the phase.
Compression phases are shaded on every panel, in each run's colour. Runs overlay with a legend.
"""

import argparse
import csv
import errno
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from checkpoint import CheckpointError, read_log  # noqa: E402

CSV_COLUMNS = ["run", "iter", "kind", "phase", "loss", "ce", "mbe", "val_ce", "val_mbe", "align_cos", "align_ms"]


# the fields plot() reads in each kind of record, and whether each is a number or a list of numbers
FIELDS = {"train": {"iter": "number", "ce": "number", "mbe": "number", "phase": "number"},
          "eval": {"iter": "number", "val_ce": "number", "val_mbe": "number", "val_mbe_layers": "numbers"},
          "align": {"iter": "number"}, "switch": {"iter": "number", "phase": "number"}}


def read_run(out_dir):
    """A run's log records (out_dir, or its log.jsonl); a log that is not train.py's is one line (sys.exit)."""
    path = os.path.join(out_dir, "log.jsonl") if os.path.isdir(out_dir) else out_dir
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found (pass run directories that hold a log.jsonl)")
    try:
        records = read_log(path)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot read {path} ({e.strerror}); pass a run directory (or log.jsonl) you may read")
    check_records(path, records)
    return records


def check_records(path, records):
    """Exits with one line naming the first record that lacks a field plot() reads (a log of another program)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    layers = None
    for r in records:
        for key, kind in FIELDS.get(r.get("kind"), {}).items():
            value = r.get(key)
            ok = number(value) if kind == "number" else (isinstance(value, list) and all(number(v) for v in value)
                                                         and layers in (None, len(value)))
            if not ok:
                sys.exit(f"error: {path}: the {r.get('kind')!r} record of iter {r.get('iter')!r} has no usable "
                         f"{key!r} ({'a number' if kind == 'number' else 'a list of numbers, one per layer'}): is "
                         f"this the log.jsonl of a train.py run? Pass run directories that hold one")
            if kind == "numbers":
                layers = len(value)
        if r.get("kind") == "align" and not (r.get("align_cos") is None or number(r.get("align_cos"))):
            sys.exit(f"error: {path}: the 'align' record of iter {r.get('iter')!r} has a non-numeric 'align_cos': is "
                     f"this the log.jsonl of a train.py run? Pass run directories that hold one")


def image_format(output, option="-o"):
    """The output's format from its extension (png where it has none, as matplotlib does); one line if Agg cannot
    write it."""
    ext = os.path.splitext(output)[1][1:].lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if ext and ext not in supported:
        sys.exit(f"error: {option} {output}: {ext!r} is not an image format matplotlib can write; end the name with "
                 f"one of {', '.join('.' + f for f in sorted(supported))} (e.g. .png)")
    return ext or "png"


def check_writable(path, option):
    """Exits with one line if path cannot be written: its folder is missing or read-only, or it is a folder."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        sys.exit(f"error: {option} {path}: the folder {folder} does not exist; create it first (mkdir -p {folder}) "
                 f"or write elsewhere")
    if os.path.isdir(path):
        sys.exit(f"error: {option} {path} is a folder; give a file name (e.g. {os.path.join(path, 'gapt.png')})")
    if not os.access(folder, os.W_OK):
        sys.exit(f"error: {option} {path}: you may not write into {folder}; write elsewhere")


def write_atomically(path, write):
    """write(tmp) then rename tmp to path: an existing file is replaced only by a complete one; a failure is one line
    and leaves no temporary file behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        sys.exit(f"error: cannot write {path} ({e.strerror}): " + (
            f"the disk holding {os.path.dirname(os.path.abspath(path))} is full; free space there, or write elsewhere"
            if full else "write elsewhere"))
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def compression_spans(records):
    """[(start, end)] step ranges trained in phase 2: from the switch records when the run has them (exact), else
    from the phase of each train record (to the log interval)."""
    trains = [r for r in records if r.get("kind") == "train"]
    if not trains:
        return []
    switches = [(r["iter"], r["phase"]) for r in records if r.get("kind") == "switch"]
    changes = switches or [(r["iter"] - 1, r["phase"]) for r in trains]  # a train record covers its step
    spans, start, phase = [], 0, 1
    for it, new_phase in changes:
        if phase == 2 and new_phase != 2:
            spans.append((start, it))
        if new_phase == 2 and phase != 2:
            start = it
        phase = new_phase
    if phase == 2:
        spans.append((start, trains[-1]["iter"]))
    return spans


def plot(runs, output, smooth=1, fmt=None):
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, records) in enumerate(runs):
        color = colors[k % len(colors)]
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        align = [r for r in records if r.get("kind") == "align" and r.get("align_cos") is not None]
        if train:
            axes[0].plot([r["iter"] for r in train], [r["ce"] for r in train], color=color, label=f"{label} train")
            axes[1].plot([r["iter"] for r in train], [r["mbe"] for r in train], color=color, label=f"{label} train")
        if evals:
            axes[0].plot([r["iter"] for r in evals], [r["val_ce"] for r in evals], color=color, ls="--", marker=".",
                         label=f"{label} val")
            for key in sorted(k for k in evals[-1] if k.endswith("_ce") and k != "val_ce" and "answer" not in k):
                axes[0].plot([r["iter"] for r in evals if key in r], [r[key] for r in evals if key in r], color=color,
                             ls=":", marker="x", label=f"{label} {key[:-3]} (eval)")  # train, test, other corpora
            axes[1].plot([r["iter"] for r in evals], [r["val_mbe"] for r in evals], color=color, ls="--",
                         marker=".", label=f"{label} val")
            for layer in range(len(evals[0]["val_mbe_layers"])):
                axes[1].plot([r["iter"] for r in evals], [r["val_mbe_layers"][layer] for r in evals], color=color,
                             lw=0.6, alpha=0.5)
        if align:
            steps, cos = [r["iter"] for r in align], [r["align_cos"] for r in align]
            if smooth > 1:
                axes[2].plot(steps, cos, color=color, lw=0.5, alpha=0.35)
                axes[2].plot(steps, moving_average(cos, smooth), color=color, lw=1.5,
                             label=f"{label} (mean of {smooth})")
            else:
                axes[2].plot(steps, cos, color=color, lw=0.9, label=label)
        spans = compression_spans(records)
        for start, end in spans:
            for ax in axes:
                ax.axvspan(start, end, color=color, alpha=0.12, lw=0)
        phase_x, phase_y = [0], [1]
        for start, end in spans:
            phase_x += [start, start, end, end]
            phase_y += [1, 2, 2, 1]
        if train:
            phase_x.append(train[-1]["iter"])
            phase_y.append(phase_y[-1])
            axes[3].plot(phase_x, phase_y, color=color, label=label)
    if not any(r.get("kind") == "align" for _, records in runs for r in records):
        axes[2].text(0.5, 0.5, "no gradient alignment in these logs (train with align_interval > 0)",
                     transform=axes[2].transAxes, ha="center", va="center", color="gray")
    axes[0].set_ylabel("cross-entropy")
    axes[1].set_ylabel("MBE (nats)")
    axes[2].set_ylabel("cos(∇CE, ∇MBE)")
    axes[2].axhline(0.0, color="black", lw=0.8)
    axes[3].set_ylabel("phase")
    axes[3].set_yticks([1, 2], ["memorize", "compress"])
    axes[3].set_ylim(0.7, 2.3)
    axes[3].set_xlabel("optimizer step")
    for ax in axes[:3]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_title("shaded: compression phases")
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=100, format=fmt)
    finally:
        plt.close(fig)


def plot_against(series, key, metric, output, fmt=None):
    """A metric against one setting (experiment.py --figure): series {label: {x: {seed: value}}}. Each seed is a thin
    line across the values of x it has, the mean over the seeds at each x a large marker with their count beside it
    (means over different seeds are not joined). Log x when x spans 10x or more."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = sorted({x for points in series.values() for x in points})
    for k, (label, points) in enumerate(series.items()):
        color, marker = colors[k % len(colors)], "os^Dv<>p"[k % 8]
        for seed in sorted({seed for values in points.values() for seed in values}):
            line = [(x, points[x][seed]) for x in sorted(points) if seed in points[x]]
            ax.plot(*zip(*line), color=color, lw=0.8, alpha=0.35, marker=".", ms=4)
        for x, values in points.items():
            mean = sum(values.values()) / len(values)
            ax.plot([x], [mean], color=color, marker=marker, ms=8, ls="none",
                    label=label if x == min(points) else None)
            ax.annotate(f"{len(values)}", (x, mean), textcoords="offset points", xytext=(6, 4), fontsize=7,
                        color=color)
    if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title("thin lines: one seed each; markers: the mean over the seeds at that value (their count beside it)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=100, format=fmt)
    finally:
        plt.close(fig)


def moving_average(values, window):
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def alignment_summary(records, transient=0, smooth=1):
    """Number of alignment points after `transient` steps, how many sign changes the global cosine (its moving
    average over `smooth` points) makes there, and the fraction of positive values: the paper's
    memorization-compression cycle is a cosine that keeps changing sign during plain training."""
    cos = [r["align_cos"] for r in records if r.get("kind") == "align" and r.get("align_cos") is not None]
    iters = [r["iter"] for r in records if r.get("kind") == "align" and r.get("align_cos") is not None]
    cos = [v for v, it in zip(moving_average(cos, smooth), iters) if it >= transient]
    changes = sum(1 for a, b in zip(cos, cos[1:]) if (a > 0) != (b > 0))
    positive = sum(1 for v in cos if v > 0) / len(cos) if cos else float("nan")
    mean_abs = sum(abs(v) for v in cos) / len(cos) if cos else float("nan")
    return len(cos), changes, positive, mean_abs


def write_csv(runs, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for label, records in runs:
            for r in records:
                writer.writerow({"run": label, **{k: r.get(k, "") for k in CSV_COLUMNS if k != "run"}})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (out_dir) or log.jsonl files")
    parser.add_argument("-o", "--output", default="gapt.png")
    parser.add_argument("--labels", nargs="*", help="legend labels (default: the directory names)")
    parser.add_argument("--csv", help="also write the merged series to this CSV file")
    parser.add_argument("--smooth", type=int, default=1, help="also draw a moving average of this many alignment "
                        "points, and count the sign changes of that average")
    parser.add_argument("--transient", type=int, default=0,
                        help="leave the first steps out of the printed alignment summary")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error("--labels needs one label per run")
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    fmt = image_format(args.output)  # every argument checked before anything is read or drawn
    output = args.output if os.path.splitext(args.output)[1] else f"{args.output}.{fmt}"
    check_writable(output, "-o")
    if args.csv:
        check_writable(args.csv, "--csv")
    runs = [(label, read_run(r)) for label, r in zip(labels, args.runs)]  # reads only: no lock, nothing written there
    write_atomically(output, lambda tmp: plot(runs, tmp, args.smooth, fmt))
    args.output = output
    print(f"wrote {args.output}")
    for label, records in runs:
        for window in sorted({1, args.smooth}):
            points, changes, positive, mean_abs = alignment_summary(records, args.transient, window)
            if points:
                what = "the cosine" if window == 1 else f"its moving average over {window} points"
                print(f"{label}: {points} gradient-alignment points from step {args.transient}: {what} changes sign "
                      f"{changes} times, positive {positive:.0%} of the time, mean |value| {mean_abs:.3f}")
    if args.csv:
        write_atomically(args.csv, lambda tmp: write_csv(runs, tmp))
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
