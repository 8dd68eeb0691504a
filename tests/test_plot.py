import csv
import json
import math

import pytest

import plot


def synthetic_log(path, with_align=True, with_gapt=True):
    records = []
    phase = 1
    for it in range(0, 201, 10):
        if with_gapt and it in (50, 120):
            phase = 2 if it == 50 else 1
            records.append({"kind": "switch", "iter": it, "phase": phase, "from_phase": 3 - phase})
        if it % 50 == 0:
            records.append({"kind": "eval", "iter": it, "phase": phase, "val_ce": 3 - it / 100,
                            "val_mbe": 1.0, "val_mbe_layers": [1.2, 1.0, 0.8]})
        if it:
            records.append({"kind": "train", "iter": it, "phase": phase, "loss": 3 - it / 100, "ce": 3 - it / 100,
                            "mbe": 1 + 0.1 * math.sin(it), "mbe_layers": [1.2, 1.0, 0.8],
                            "gapt": {"phase": phase} if with_gapt else None})
        if with_align:
            records.append({"kind": "align", "iter": it, "phase": phase, "align_cos": math.sin(it / 20),
                            "align_cos_blocks": [0.1, 0.2, None], "align_ms": 3.0})
    path.mkdir()
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_compression_spans():
    records = [{"kind": "train", "iter": i, "phase": 1} for i in (10, 20)]
    assert plot.compression_spans(records) == []
    records += [{"kind": "switch", "iter": 20, "phase": 2}, {"kind": "switch", "iter": 35, "phase": 1},
                {"kind": "switch", "iter": 50, "phase": 2}, {"kind": "train", "iter": 60, "phase": 2}]
    assert plot.compression_spans(records) == [(20, 35), (50, 60)]
    always = [{"kind": "train", "iter": i, "phase": 2} for i in (10, 20, 30)]
    assert plot.compression_spans(always) == [(9, 30)]


def test_plot_and_csv(tmp_path):
    gapt = synthetic_log(tmp_path / "gapt")
    base = synthetic_log(tmp_path / "base", with_align=False, with_gapt=False)
    png, table = tmp_path / "fig.png", tmp_path / "series.csv"
    plot.main([gapt, base, "-o", str(png), "--csv", str(table)])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 2_000_000
    rows = list(csv.DictReader(open(table)))
    assert list(rows[0]) == plot.CSV_COLUMNS
    assert {r["run"] for r in rows} == {"gapt", "base"}
    assert any(r["kind"] == "align" and r["align_cos"] for r in rows)


def test_a_log_without_alignment_or_phases_still_plots(tmp_path):
    base = synthetic_log(tmp_path / "plain", with_align=False, with_gapt=False)
    png = tmp_path / "plain.png"
    plot.main([base, "-o", str(png)])
    assert png.stat().st_size > 10_000


def test_alignment_summary():
    records = [{"kind": "align", "iter": i, "align_cos": v} for i, v in enumerate([0.5, -0.1, -0.2, 0.3, None, 0.1])]
    assert plot.alignment_summary(records)[:3] == (5, 2, 0.6)
    assert plot.alignment_summary(records, transient=2)[:3] == (3, 1, 2 / 3)
    assert plot.alignment_summary(records)[3] == pytest.approx(1.2 / 5)
    assert plot.alignment_summary([])[:2] == (0, 0)


def test_moving_average_and_smoothed_summary():
    assert plot.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    records = [{"kind": "align", "iter": i, "align_cos": v} for i, v in enumerate([1.0, -1.0, 1.0, -1.0, 1.0])]
    assert plot.alignment_summary(records)[1] == 4
    assert plot.alignment_summary(records, smooth=2)[1] == 1  # 1, 0, 0, 0, 0: the noise averages out
