"""Scoring against simulated truth: a perfect segmentation has known scores."""

from __future__ import annotations

import numpy as np
import pytest

from Analysis import compare_to_truth
from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.truth import score_folder
from GeneSegNet.io import read_label, write_label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_simulated_dataset(tmp_path_factory.mktemp("sim") / "raw", n_samples=2,
                                   cfg=TissueConfig(height=128, width=160), seed=7)


def test_truth_scores_itself_perfectly(dataset, tmp_path):
    import pandas as pd

    (tmp_path / "pred").mkdir()
    for name in ("sample_00", "sample_01"):
        cells = read_label(dataset / "truth" / f"{name}_cells.png")
        write_label(tmp_path / "pred" / f"label_{name}.png", cells)
    table = score_folder(tmp_path / "pred", dataset / "truth").set_index("sample")
    for name in ("sample_00", "sample_01"):
        row = table.loc[name]
        assert row["AP@0.5"] == row["AP@0.75"] == row["AP@0.9"] == 1.0
        spots = pd.read_csv(dataset / "truth" / f"{name}_spots.csv")
        cells = read_label(dataset / "truth" / f"{name}_cells.png")
        under = cells[spots.spotY.astype(int), spots.spotX.astype(int)]
        # Only noise transcripts that fall inside a cell are assigned wrongly.
        assert row["assignment_accuracy"] == pytest.approx((under == spots.cell_id).mean())
        assert row["transcripts_in_cells"] == (under > 0).sum()
    assert table.loc["mean", "AP@0.5"] == 1.0


def test_starting_labels_score_worse_and_script_runs(dataset, tmp_path):
    code = compare_to_truth.main(["--label_dir", str(dataset / "labels"), "--truth_dir",
                                  str(dataset / "truth"), "--out_csv", str(tmp_path / "s.csv")])
    assert code == 0
    table = score_folder(dataset / "labels", dataset / "truth").set_index("sample")
    assert table.loc["mean", "AP@0.5"] < 0.9  # expanded nuclei are not the true cells
    assert table.loc["mean", "cells_found"] < table.loc["mean", "true_cells"]  # dim nuclei


def test_no_matching_truth_is_an_error(dataset, tmp_path):
    (tmp_path / "pred").mkdir()
    write_label(tmp_path / "pred" / "other.png", np.ones((4, 4), np.int32))
    with pytest.raises(InputError, match="no label image has matching truth"):
        score_folder(tmp_path / "pred", dataset / "truth")


def test_expansion_baseline_uses_each_samples_pixel_size(dataset, tmp_path):
    """--expand_um d scores the labels expanded by d / pixel_size px (from the metadata)."""
    from skimage.segmentation import expand_labels

    from GeneSegNet.io.metadata import metadata_path, read_metadata

    expanded = tmp_path / "expanded"
    expanded.mkdir()
    for name in ("sample_00", "sample_01"):
        pixel = read_metadata(metadata_path(dataset, name)).pixel_size_um
        labels = read_label(dataset / "labels" / f"{name}.png")
        write_label(expanded / f"{name}.png", expand_labels(labels, distance=3.0 / pixel))
    by_option = score_folder(dataset / "labels", dataset / "truth", expand_um=3.0)
    by_hand = score_folder(expanded, dataset / "truth")
    assert by_option.drop(columns="sample").equals(by_hand.drop(columns="sample"))
    assert by_option.set_index("sample").loc["mean", "right_cell"] > score_folder(
        dataset / "labels", dataset / "truth").set_index("sample").loc["mean", "right_cell"]
    with pytest.raises(InputError, match="expand_um"):
        score_folder(dataset / "labels", dataset / "truth", expand_um=-1.0)
