"""The density transcript input and local normalisation, wired end to end (issue 9 items 1, 2, 5).

Tiny simulated data (``dense`` preset, 0.2125 µm/px): crops written in density mode read back
equal to :func:`transcript_channels` of the raw sample at each crop's origin; checkpoints
round-trip the model input; a whole-slide window equals the crop rendering of the same
region; pixel-size errors name the option/file; local normalisation of a training crop equals
the slide window's on the same pixels away from the crop edge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.crops import CropConfig, load_raw_sample, prepare_dataset
from GeneSegNet.data.dataset import load_sample_folder, network_input
from GeneSegNet.data.model_input import CHECKPOINT_KEY, ModelInput, model_input_from_meta
from GeneSegNet.data.normalize import local_levels, normalize_local
from GeneSegNet.data.sample_info import read_sample_info
from GeneSegNet.data.simulate import preset_config, write_simulated_dataset
from GeneSegNet.data.transcripts import TranscriptInput, slide_density_scale, transcript_channels
from GeneSegNet.data.transforms import InputNorm, normalize_input
from GeneSegNet.errors import InputError
from GeneSegNet.io import layout as lay
from GeneSegNet.io import spot_pixels
from GeneSegNet.io.metadata import metadata_path
from GeneSegNet.model.checkpoint import load_checkpoint, save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.slide.plan import SlideConfig
from GeneSegNet.slide.windows import SlideTranscripts, SpotIndex, _GlobalInputs, window_transcripts

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96  # crop side (px)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model_input") / "raw"
    cfg = preset_config("dense", height=240, width=260)
    return write_simulated_dataset(out, n_samples=2, cfg=cfg, seed=3)


@pytest.fixture(scope="module")
def density_crops(raw: Path) -> Path:
    out = raw.parent / "crops_density"
    prepare_dataset(raw, out, CropConfig(n_crops=3, crop_size=SIZE), gene_channels=2)
    return out


def _pixel_size(raw: Path, name: str) -> float:
    return json.loads(metadata_path(raw, name).read_text())["pixel_size_um"]


def test_density_crops_equal_rendering_of_raw_sample_at_origin(raw, density_crops):
    name = "sample_00"
    folder = density_crops / name
    info = read_sample_info(folder)
    assert info is not None and info.transcripts.mode == "density"
    assert info.transcripts.n_gene_channels == 2 and info.embedding is not None
    assert info.pixel_size_um == pytest.approx(_pixel_size(raw, name))
    # one embedding for the run: both samples store the same
    other = read_sample_info(density_crops / "sample_01")
    assert other.embedding.genes == info.embedding.genes
    np.testing.assert_array_equal(other.embedding.vectors, info.embedding.vectors)
    crops = load_sample_folder(folder)
    assert len(crops) == 3
    paths = {"images": next((raw / "images").glob(f"{name}.*")),
             "labels": next((raw / "labels").glob(f"{name}.*")),
             "spots": next((raw / "spots").glob(f"{name}*"))}
    sample = load_raw_sample(name, paths)
    height, width = sample.image.shape[:2]
    rows, cols, inside = spot_pixels(sample.spots["x"], sample.spots["y"], (height, width))
    codes = info.embedding.encode(sample.spots["gene"].to_numpy()[inside])
    scale = slide_density_scale(rows, cols, pixel_size_um=info.pixel_size_um,
                                sigma_um=info.transcripts.sigma_um)
    assert info.slide_scale == pytest.approx(scale)
    offsets = pd.read_csv(folder / lay.CROPS_TABLE)
    for crop in crops:
        r0, c0 = offsets.loc[offsets["crop"] == int(crop.key), ["row_offset", "col_offset"]
                             ].to_numpy()[0]
        assert crop.origin == (r0, c0)
        assert crop.pixel_size_um == info.pixel_size_um
        assert len(crop.spot_genes) == len(crop.spots_xy)
        want = transcript_channels(rows, cols, codes, (SIZE, SIZE), info.transcripts,
                                   pixel_size_um=info.pixel_size_um, slide_scale=scale,
                                   embedding=info.embedding, origin=(r0, c0))
        assert crop.transcripts.shape == (3, SIZE, SIZE)
        np.testing.assert_allclose(crop.transcripts, want, rtol=0, atol=1e-6)
        x = network_input(crop)
        assert x.shape == (1 + 3, SIZE, SIZE)  # grey + density + 2 gene channels
        # transcript channels are not normalised; the upstream heatmap PNG is still written
        norm = InputNorm(image_norm="percentile", transcript_mode="density", n_transcripts=3)
        np.testing.assert_array_equal(normalize_input(x, norm)[1:], want)
    assert (folder / lay.HEATMAP_ALL_DIR / lay.heatmap_name(crops[0].key)).is_file()


def test_heatmap_mode_is_upstream_and_missing_pixel_size_is_refused(raw, tmp_path):
    out = tmp_path / "crops_heat"
    prepare_dataset(raw, out, CropConfig(n_crops=2, crop_size=SIZE),
                    transcript_input="heatmap")
    crops = load_sample_folder(out / "sample_00")
    assert crops[0].transcripts is None
    assert network_input(crops[0]).shape == (2, SIZE, SIZE)
    assert not (out / "sample_00" / lay.TRANSCRIPTS_DIR).exists()
    # a raw set without metadata: density is refused naming the option and the file
    bare = tmp_path / "bare"
    for sub in ("images", "labels", "spots"):
        (bare / sub).mkdir(parents=True)
        for f in (raw / sub).glob("sample_00*"):
            (bare / sub / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="--pixel_size") as err:
        prepare_dataset(bare, tmp_path / "x", CropConfig(n_crops=2, crop_size=SIZE),
                        transcript_input="density")
    assert "metadata" in str(err.value)
    assert not (tmp_path / "x").exists()
    # auto falls back to the heatmap without a pixel size
    prepare_dataset(bare, tmp_path / "auto", CropConfig(n_crops=2, crop_size=SIZE))
    assert read_sample_info(tmp_path / "auto" / "sample_00").transcripts.mode == "heatmap"


def test_pixel_size_option_must_agree_with_metadata(raw, tmp_path):
    wrong = 2 * _pixel_size(raw, "sample_00")
    with pytest.raises(InputError, match="disagrees with --pixel_size"):
        prepare_dataset(raw, tmp_path / "c", CropConfig(n_crops=2, crop_size=SIZE),
                        pixel_size=wrong)
    assert not (tmp_path / "c").exists()


def test_checkpoint_round_trips_model_input(density_crops, tmp_path):
    info = read_sample_info(density_crops / "sample_00")
    model = ModelInput(info.transcripts, info.embedding, info.pixel_size_um, "local", 80)
    net = GeneSegUNet(NetConfig(nchan=1 + model.n_transcripts, nbase=(4, 8)))
    path = save_checkpoint(tmp_path / "m.pt", net, extra={CHECKPOINT_KEY: model.to_dict()})
    _, meta = load_checkpoint(path)
    back = model_input_from_meta(meta)
    assert back.transcripts == model.transcripts
    assert back.embedding.genes == model.embedding.genes
    np.testing.assert_allclose(back.embedding.vectors, model.embedding.vectors)
    assert (back.pixel_size_um, back.image_norm, back.norm_scale_px) == (
        model.pixel_size_um, "local", 80)
    # an old checkpoint: upstream heatmap input, percentile normalisation
    old = save_checkpoint(tmp_path / "old.pt", GeneSegUNet(NetConfig(nchan=2, nbase=(4, 8))))
    upstream = model_input_from_meta(load_checkpoint(old)[1])
    assert upstream.transcripts == TranscriptInput(mode="heatmap", n_gene_channels=0)
    assert upstream.image_norm == "percentile" and upstream.embedding is None


def test_slide_window_equals_crop_rendering_and_local_norm(raw, density_crops):
    name = "sample_00"
    info = read_sample_info(density_crops / name)
    crop = load_sample_folder(density_crops / name)[1]
    paths = {"images": next((raw / "images").glob(f"{name}.*")),
             "spots": next((raw / "spots").glob(f"{name}*"))}
    sample = load_raw_sample(name, paths)
    image = sample.image.astype(np.float32)
    rows, cols, inside = spot_pixels(sample.spots["x"], sample.spots["y"], image.shape)
    codes = info.embedding.encode(sample.spots["gene"].to_numpy()[inside])
    index = SpotIndex(rows, cols, image.shape, bin_size=32, codes=codes)
    st = SlideTranscripts(info.transcripts, info.embedding, info.pixel_size_um,
                          slide_density_scale(rows, cols, pixel_size_um=info.pixel_size_um,
                                              sigma_um=info.transcripts.sigma_um))
    r0, c0 = crop.origin
    window = window_transcripts(index, r0, c0, (SIZE, SIZE), st)
    np.testing.assert_allclose(window, crop.transcripts, rtol=0, atol=1e-6)
    # whole-slide global inputs: same transcript channels, image by the slide's levels
    scale = 32
    ev = EvalConfig(image_norm="local", transcript_mode="density", n_transcripts=3,
                    norm_scale_px=scale)
    inputs = _GlobalInputs(image[:, :, None], index, SlideConfig(window=SIZE, evaluation=ev),
                           st)
    slide_x = inputs(r0, c0)
    np.testing.assert_allclose(slide_x[1:], crop.transcripts, rtol=0, atol=1e-6)
    crop_x = normalize_input(network_input(crop), ev.input_norm(), origin=crop.origin)
    # local levels: blocks wholly inside the crop get the slide's levels, so pixels more
    # than 1.5 blocks from the crop edge (interpolated from such blocks only) agree to
    # float32 rounding (1e-4); nearer the edge the crop estimates cut blocks from fewer
    # pixels (compared with a loose bound only)
    inner = slice(int(1.5 * scale), SIZE - int(1.5 * scale))
    np.testing.assert_allclose(crop_x[0, inner, inner], slide_x[0, inner, inner], atol=1e-4)
    assert np.median(np.abs(crop_x[0] - slide_x[0])) < 0.2
    # an aligned crop's grid equals the slide grid on its blocks
    aligned = normalize_local(image[64:192, 64:192], scale_px=scale, origin=(64, 64))
    grid = local_levels(image, scale)
    assert grid.low.shape == (-(-image.shape[0] // scale), -(-image.shape[1] // scale))
    from GeneSegNet.data.normalize import apply_levels

    full = apply_levels(image[64:192, 64:192], grid, (64, 64))
    np.testing.assert_allclose(aligned[48:-48, 48:-48], full[48:-48, 48:-48], atol=1e-4)


def test_slide_refuses_missing_pixel_size(tmp_path):
    from GeneSegNet.slide.pipeline import SlideRunConfig, slide_pixel_size

    model = ModelInput(TranscriptInput(mode="density"))
    with pytest.raises(InputError, match="--pixel_size") as err:
        slide_pixel_size("s1", SlideRunConfig(metadata_dir=tmp_path), model)
    assert "metadata/s1.json" in str(err.value)
    assert slide_pixel_size("s1", SlideRunConfig(metadata_dir=tmp_path), ModelInput()) is None
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "s1.json").write_text('{"pixel_size_um": 0.5}')
    with pytest.raises(InputError, match="disagrees"):
        slide_pixel_size("s1", SlideRunConfig(metadata_dir=tmp_path, pixel_size_um=0.4), model)
    assert slide_pixel_size("s1", SlideRunConfig(metadata_dir=tmp_path), model) == 0.5


def test_end_to_end_density_run(raw, tmp_path):
    """simulate (dense) -> preprocess -> 2 epochs -> whole-slide inference, all exit 0."""
    import subprocess
    import sys

    crops, run, out = tmp_path / "crops", tmp_path / "run", tmp_path / "inf"
    py = sys.executable
    steps = [
        [py, str(ROOT / "preprocess/Generate_Image_Label_locationMap.py"), "--base_dir",
         str(raw), "--save_crop_dir", str(crops), "--n_crops", "3", "--crop_size", "96",
         "--gene_channels", "1"],
        [py, str(ROOT / "GeneSeg_train.py"), "--train_dir", str(crops),
         "--save_model_dir", str(run), "--recursive_num", "1", "--n_epochs", "2",
         "--nbase", "4", "8", "--train_tile_size", "64", "--diam_mean", "17",
         "--batch_size", "4"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
    model = next((run / "models").glob("*_last.pt"))
    _, meta = load_checkpoint(model)
    mi = model_input_from_meta(meta)
    assert mi.transcripts.mode == "density" and mi.n_transcripts == 2
    assert mi.image_norm == "local" and mi.norm_scale_px == 68
    assert meta["net_config"]["nchan"] == 3
    cmd = [py, str(ROOT / "Inference/slidingwindows_gradient.py"), "--root_dir", str(raw),
           "--save_dir", str(out), "--model_file", str(model), "--window", "96",
           "--diameter", "17"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "label_sample_00.png").is_file()
