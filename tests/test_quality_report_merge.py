"""bench/quality_report.py --resume adds to an earlier report instead of replacing it."""

from __future__ import annotations

from bench.quality_report import merge_rows


def _row(name: str, value: float) -> dict:
    return {"segmentation": name, "AP@0.5": value}


def test_a_resumed_run_keeps_the_rows_it_did_not_score_again():
    earlier = [_row("true cells (reference)", 1.0),
               _row("nuclei expanded by 6 µm (best of 0..10)", 0.80),
               _row("genesegnet, round 2 (3.3 min training in all)", 0.90),
               _row("heatmap, round 2 (1.8 min training in all)", 0.70)]
    new = [_row("true cells (reference)", 1.0),
           _row("nuclei expanded by 5 µm (best of 0..10)", 0.81),
           _row("genesegnet, round 2, --augment (3.3 min training in all)", 0.95),
           _row("heatmap, round 2 (2.0 min training in all)", 0.75)]
    merged = merge_rows(new, earlier)
    # this run's rows first and as scored now; of the earlier ones only the round-2 row
    # without --augment, which this run did not score (same rows matched across training
    # minutes and the chosen expansion distance)
    assert merged == [*new, earlier[2]]


def test_a_first_run_writes_its_rows_only():
    rows = [_row("genesegnet, round 1 (1.0 min training in all)", 0.5)]
    assert merge_rows(rows, []) == rows
