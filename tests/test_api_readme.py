"""The README's Python API example runs as written on a tiny synthetic image and an
untrained tiny network, and the top-level import stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from GeneSegNet.model.checkpoint import save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_stays_light():
    code = ("import sys, GeneSegNet; heavy = [m for m in ('torch', 'anndata', 'shapely', "
            "'GeneSegNet.api') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_readme_example_runs(tmp_path, monkeypatch):
    import torch

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", GeneSegUNet(NetConfig(nbase=(8, 16), diam_mean=16.0)))
    rng = np.random.default_rng(0)
    image = np.zeros((96, 96), np.uint16)
    yy, xx = np.mgrid[:96, :96]
    for cy, cx in ((25, 25), (25, 70), (70, 40)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 80] = 3000
    image += rng.integers(0, 200, image.shape).astype(np.uint16)
    tifffile.imwrite(tmp_path / "dapi.tif", image)
    pd.DataFrame({"x": rng.uniform(0, 96, 300), "y": rng.uniform(0, 96, 300),
                  "gene": rng.choice(["Actb", "Gapdh", "NegControlProbe_1", "Gène,\"x\""],
                                     300)}).to_csv(tmp_path / "spots.csv", index=False)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_api_block(), str(README), "exec"), namespace)  # noqa: S102
    result, table = namespace["result"], namespace["table"]
    assert result.labels.shape == (96, 96)
    assert result.cell_probability.shape == (96, 96)
    assert list(table.columns[:4]) == ["cell_id", "spotX", "spotY", "gene"]
    assert {"cell_probability", "boundary_distance_um", "nearest_cell_id"} <= set(table.columns)
    assert (tmp_path / "api_out" / "demo.csv").is_file()
    assert (tmp_path / "api_out" / "demo_qc" / "qc.html").is_file()
    back = pd.read_csv(tmp_path / "api_out" / "demo.csv")
    assert sorted(back["gene"].unique()) == sorted(pd.read_csv("spots.csv")["gene"].unique())


def test_sopa_method_returns_labels(tmp_path):
    import GeneSegNet as gsn

    save_checkpoint(tmp_path / "m.pt", GeneSegUNet(NetConfig(nbase=(8, 16), diam_mean=16.0)))
    method = gsn.sopa_method(tmp_path / "m.pt")
    image = np.zeros((2, 48, 64), np.float32)
    image[0, 10:20, 10:20] = 1.0
    image[1, 12, 12] = 3
    labels = method(image)
    assert labels.shape == (48, 64) and labels.dtype.kind in "iu"
    with pytest.raises(ValueError):
        method(image[0])


def _density_model(path: Path) -> Path:
    """A tiny untrained network with the input GeneSeg_train.py gives its models: one
    DAPI channel, the transcript density and 2 gene channels, local image normalisation,
    recorded in the checkpoint with the training settings the inference reads."""
    import torch

    from GeneSegNet.data.gene_embedding import GeneEmbedding
    from GeneSegNet.data.model_input import CHECKPOINT_KEY, ModelInput
    from GeneSegNet.data.transcripts import TranscriptInput

    genes = tuple(f"Gene{i:02d}" for i in range(30))
    vectors = np.random.default_rng(1).normal(size=(len(genes), 2))
    model_input = ModelInput(TranscriptInput(mode="density", n_gene_channels=2),
                             GeneEmbedding(genes, vectors), 0.5, "local", 24)
    torch.manual_seed(2)
    net = GeneSegUNet(NetConfig(nchan=1 + model_input.n_transcripts, nbase=(8, 16, 16, 16)))
    return save_checkpoint(path, net, extra={CHECKPOINT_KEY: model_input.to_dict()},
                           train_config={"heatmap_mode": "fixed",
                                         "flow_target_mode": "isolated"})


@pytest.mark.parametrize("refine,smooth_um", [(True, 1.0), (False, 0.0), (False, 1.5)])
def test_segment_with_a_density_model_matches_the_inference_script(tmp_path, refine,
                                                                     smooth_um):
    """gsn.segment on a model with density and gene channels (the default of training)
    renders the model's own input and gives the inference script's cells, with and without
    the transcript refinement and the outline smoothing."""
    import GeneSegNet as gsn
    from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
    from GeneSegNet.io import read_image, read_label
    from tests.tiny_runs import inference_runner

    # dense enough (3 /µm² in cells) that the refinement places borders
    raw = write_simulated_dataset(tmp_path / "raw", 1, TissueConfig(
        height=160, width=220, transcripts_per_um2=3.0), seed=4)
    model = _density_model(tmp_path / "density.pt")
    flags = ["--diameter", "0", "--confidence_threshold", "-3", "--flow_threshold", "0",
             "--no_heatmap", "--canvas_dtype", "float32",  # the API keeps float32 canvases
             "--smooth_um", str(smooth_um)]
    if not refine:
        flags.append("--no_transcript_refine")
    assert inference_runner(raw, model, *flags)(tmp_path / "cli") == 0
    want = read_label(tmp_path / "cli" / "label_sample_00.png")

    loaded = gsn.load_model(model)
    assert loaded.n_image_channels == 1
    spots = pd.read_csv(raw / "spots" / "sample_00.csv").rename(
        columns={"spotX": "x", "spotY": "y"})
    result = gsn.segment(loaded, read_image(raw / "images" / "sample_00.png"), spots,
                         pixel_size_um=0.5, cellprob_threshold=-3.0, flow_threshold=0.0,
                         transcript_refine=refine, smooth_um=smooth_um)
    assert want.max() > 3, "the untrained network should still give several cells here"
    np.testing.assert_array_equal(result.labels, want)
    if refine:  # the refinement did move borders here
        raw_cells = gsn.segment(loaded, read_image(raw / "images" / "sample_00.png"), spots,
                                pixel_size_um=0.5, cellprob_threshold=-3.0, flow_threshold=0.0,
                                transcript_refine=False, smooth_um=0.0)
        assert (raw_cells.labels != result.labels).mean() > 0.01
    assert result.settings["transcript_mode"] == "density"
    assert result.settings["transcript_refine"] is refine
    assert result.settings["smooth_um"] == smooth_um


def test_segment_with_a_density_model_needs_the_pixel_size_and_genes(tmp_path):
    import GeneSegNet as gsn
    from GeneSegNet.errors import InputError

    loaded = gsn.load_model(_density_model(tmp_path / "density.pt"))
    spots = pd.DataFrame({"x": [5.0], "y": [6.0], "gene": ["Gene01"]})
    with pytest.raises(InputError, match="pixel_size_um"):
        gsn.segment(loaded, np.zeros((64, 64), np.float32), spots)
    with pytest.raises(InputError, match="smooth_um"):
        gsn.segment(loaded, np.zeros((64, 64), np.float32), spots, pixel_size_um=0.5,
                    smooth_um=-1.0)
    with pytest.raises(InputError, match="no column gene"):  # the gene channels need it
        gsn.segment(loaded, np.zeros((64, 64), np.float32), spots.drop(columns="gene"),
                    pixel_size_um=0.5)


def test_sopa_method_with_a_density_model(tmp_path):
    """sopa's count channel reaches a density model as unknown-gene spots; the pixel size
    goes through segment_kwargs and is required."""
    import GeneSegNet as gsn
    from GeneSegNet.errors import InputError

    model = _density_model(tmp_path / "density.pt")
    image = np.zeros((2, 64, 80), np.float32)
    image[0, 10:30, 10:30] = 1.0
    image[1] = np.random.default_rng(0).poisson(0.3, (64, 80))
    labels = gsn.sopa_method(model, pixel_size_um=0.5, cellprob_threshold=-3.0)(image)
    assert labels.shape == (64, 80) and labels.max() > 0
    with pytest.raises(InputError, match="pixel_size_um"):
        gsn.sopa_method(model)(image)
