"""bench/quality_summary.py: medians and ranges over runs, rows matched across runs whose
names differ only in what varies (training minutes, the chosen expansion distance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import quality_summary


def _report(folder: Path, ours: dict[str, float], expansion_um: int, minutes: float) -> Path:
    base = {"AP@0.5": 0.8, "AP@0.75": 0.5, "AP@0.9": 0.1, "right_cell": 0.8,
            "background_in_cells": 0.79, "assignment_accuracy": 0.75}
    rows = [{"segmentation": f"nuclei expanded by {expansion_um} µm (best of 0..10)", **base},
            {"segmentation": "nuclei expansion, best distance per measure (3, 4, 5 µm)",
             **base, "AP@0.75": 0.8, "background_in_cells": 0.2},
            {"segmentation": f"genesegnet, round 1 ({minutes} min training in all)",
             **base},
            {"segmentation": f"genesegnet, round 2 ({minutes} min training in all)", **ours}]
    folder.mkdir()
    (folder / "quality_report.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_medians_ranges_and_wins(tmp_path, capsys):
    common = {"AP@0.5": 0.95, "AP@0.9": 0.12, "right_cell": 0.9,
              "background_in_cells": 0.85, "assignment_accuracy": 0.84}
    a = _report(tmp_path / "a", {**common, "AP@0.75": 0.6}, 5, 3.2)
    b = _report(tmp_path / "b", {**common, "AP@0.75": 0.9}, 6, 1.7)
    c = _report(tmp_path / "c", {**common, "AP@0.75": 0.7}, 6, 2.0)
    assert quality_summary.main([str(a), str(b), str(c)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("genesegnet, round 2"))
    assert "0.700 [0.600, 0.900]" in line and "0.950 [0.950, 0.950]" in line
    assert any(x.startswith(quality_summary.EXPANSION_BEST) for x in out.splitlines())
    # round 2 (the last round) against 5 / 6 µm expansion: better on all but background
    assert f"{a}: genesegnet, round 2 beats {quality_summary.EXPANSION_BEST} on 5 of 6" in out
    # against each measure's best: AP@0.75 0.6 < 0.8 in run a, 0.9 > 0.8 in run b
    assert (f"{a}: genesegnet, round 2 beats {quality_summary.EXPANSION_PER_MEASURE} on 4 of 6"
            " measures; not on: AP@0.75, background_in_cells") in out
    assert (f"{b}: genesegnet, round 2 beats {quality_summary.EXPANSION_PER_MEASURE} on 5 of 6"
            " measures; not on: background_in_cells") in out


def test_a_folder_without_a_report_is_named(tmp_path):
    with pytest.raises(SystemExit, match="not a quality report"):
        quality_summary.main([str(tmp_path)])


def test_every_variant_of_the_last_round_is_compared(tmp_path, capsys):
    run = _report(tmp_path / "a", {"AP@0.5": 0.95, "AP@0.75": 0.9, "AP@0.9": 0.2,
                                   "right_cell": 0.9, "background_in_cells": 0.85,
                                   "assignment_accuracy": 0.84}, 5, 3.2)
    report = json.loads((run / "quality_report.json").read_text())
    plain = report["rows"][-1]
    report["rows"] += [
        {**plain, "segmentation": "genesegnet, round 2, --augment (3.2 min training in all)",
         "background_in_cells": 0.7},
        {**plain, "segmentation": "genesegnet, round 2, network cells without inference "
                                  "refinement", "AP@0.5": 0.1}]
    (run / "quality_report.json").write_text(json.dumps(report))
    assert quality_summary.main([str(run)]) == 0
    out = capsys.readouterr().out
    best = quality_summary.EXPANSION_BEST
    assert f"{run}: genesegnet, round 2 beats {best} on 5 of 6" in out
    # the --augment row holds fewer background transcripts (0.7 < 0.79): all 6 measures
    assert f"{run}: genesegnet, round 2, --augment beats {best} on 6 of 6" in out
    assert "network cells without inference refinement beats" not in out
