"""Out-of-core and dask whole-slide inference: equal to in memory, resumable, safe."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import tifffile
import torch
import zarr

from GeneSegNet.errors import InputError
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.slide.blockwise import block_grid, reconstruct_blockwise
from GeneSegNet.slide.outofcore import (
    LazyInputs,
    MaskSettings,
    blend_field_serial,
    blocks_serial,
    merge_blocks,
)
from GeneSegNet.slide.plan import SlideConfig, plan_windows
from GeneSegNet.slide.store import LazyImage, SlideStore
from GeneSegNet.slide.windows import SpotIndex, predict_slide
from tests.test_blockwise import network_like, tissue

SHAPE = (300, 250)
CFG = SlideConfig(window=128, overlap=32, evaluation=EvalConfig(diameter=34.0, batch_size=3))
MS = MaskSettings(block_size=96, halo=24)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A grey image (as a tiled TIFF and as zarr), its spots and a tiny network."""
    rng = np.random.default_rng(0)
    image = (rng.random(SHAPE) * 200).astype(np.uint8)
    folder = tmp_path_factory.mktemp("slide")
    tifffile.imwrite(folder / "img.tif", image, tile=(64, 64))
    zarr.create_array(str(folder / "img.zarr"), data=image, chunks=(100, 100))
    rows, cols = rng.integers(0, SHAPE[0], 800), rng.integers(0, SHAPE[1], 800)
    index = SpotIndex(rows, cols, SHAPE, bin_size=64)
    torch.manual_seed(0)
    net = GeneSegUNet(NetConfig(nchan=2, nbase=(4, 8))).eval()
    return image, folder, index, net


def window_plan(net):
    return plan_windows(SHAPE, CFG, diam_mean=34.0, diam_labels=34.0,
                        size_multiple=net.config.size_multiple)


def store_field(store_dir, image_path, index, net, chunk=64):
    store = SlideStore(store_dir, SHAPE, {"test": 1}, CFG.canvas_dtype, chunk=chunk)
    inputs = LazyInputs(LazyImage(image_path, 1), index, CFG)
    blend_field_serial(net, inputs, window_plan(net), store, CFG, "cpu")
    return store


@pytest.mark.parametrize("source", ["img.tif", "img.zarr"])
def test_field_equals_in_memory_bit_for_bit(slide, tmp_path, source):
    image, folder, index, net = slide
    expected = predict_slide(net, image, index, CFG, diam_mean=34.0, diam_labels=34.0,
                             device="cpu").field
    store = store_field(tmp_path / "s.zarr", folder / source, index, net)
    assert LazyImage(folder / source, 1).lazy
    np.testing.assert_array_equal(store.field[:], expected)
    assert store.field_done().all()


def test_local_normalisation_levels_equal_in_memory(slide, tmp_path):
    image, folder, index, net = slide
    cfg = SlideConfig(window=128, overlap=32, evaluation=EvalConfig(
        diameter=34.0, batch_size=3, image_norm="local", norm_scale_px=40))
    expected = predict_slide(net, image, index, cfg, diam_mean=34.0, diam_labels=34.0,
                             device="cpu").field
    store = SlideStore(tmp_path / "s.zarr", SHAPE, {}, "float16", chunk=64)
    inputs = LazyInputs(LazyImage(folder / "img.tif", 1), index, cfg)
    blend_field_serial(net, inputs, window_plan(net), store, cfg, "cpu")
    np.testing.assert_array_equal(store.field[:], expected)


def synthetic_store(path, seed=1):
    flows, logits = network_like(tissue(max(SHAPE), 16.0, seed), 0.3, seed)
    field = np.concatenate([flows, logits[None]])[:, : SHAPE[0], : SHAPE[1]].astype(np.float16)
    store = SlideStore(path, SHAPE, {"synthetic": seed}, "float16", chunk=64)
    store.field[:] = field
    store.group["done_field"][:] = 1
    return store, field


def test_blocks_and_merge_equal_reconstruct_blockwise(tmp_path):
    store, field = synthetic_store(tmp_path / "s.zarr")
    expected = reconstruct_blockwise(field[:2], field[2], block_size=MS.block_size,
                                     halo=MS.halo)
    assert blocks_serial(store, MS) == len(block_grid(SHAPE, MS.block_size))
    n = merge_blocks(store, MS)
    assert n == expected.max() > 20
    np.testing.assert_array_equal(store.labels[:], expected)


def test_resume_recomputes_only_unfinished_work(slide, tmp_path):
    image, folder, index, net = slide
    store = store_field(tmp_path / "s.zarr", folder / "img.tif", index, net)
    full = store.field[:]
    store.group["done_field"][1, 2] = 0  # as if the run stopped before this chunk
    store.field[:, 64:128, 128:192] = 7.0
    inputs = LazyInputs(LazyImage(folder / "img.tif", 1), index, CFG)
    again = SlideStore(tmp_path / "s.zarr", SHAPE, {"test": 1}, CFG.canvas_dtype, chunk=64)
    ran = blend_field_serial(net, inputs, window_plan(net), again, CFG, "cpu")
    assert 0 < ran < len(range(0, len(window_plan(net).starts), 3))
    np.testing.assert_array_equal(again.field[:], full)

    blocks, _ = synthetic_store(tmp_path / "b.zarr")
    blocks.ensure_blocks(len(block_grid(SHAPE, MS.block_size)))
    for k in (0, 3):
        from GeneSegNet.slide.outofcore import block_cells

        block_cells(blocks, k, MS)
    assert blocks_serial(blocks, MS) == len(block_grid(SHAPE, MS.block_size)) - 2


def test_store_of_other_settings_is_refused(tmp_path):
    SlideStore(tmp_path / "s.zarr", SHAPE, {"flow_threshold": 0.4})
    with pytest.raises(InputError, match="other settings"):
        SlideStore(tmp_path / "s.zarr", SHAPE, {"flow_threshold": 0.5})
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(InputError, match="other settings"):
        SlideStore(tmp_path / "junk.zarr", SHAPE, {})


def test_full_disk_is_an_input_error(slide, tmp_path, monkeypatch):
    from GeneSegNet.slide.outofcore import segment_slide_out_of_core

    image, folder, index, net = slide
    store = SlideStore(tmp_path / "s.zarr", SHAPE, {}, "float16", chunk=64)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SlideStore, "write_field_chunk", full)
    with pytest.raises(InputError, match="No space left.*rerun to resume"):
        segment_slide_out_of_core(net, LazyImage(folder / "img.tif", 1), index, store,
                                  window_plan(net), CFG, MS, device="cpu")


def test_dask_local_cluster_matches_in_process_bit_for_bit(slide, tmp_path):
    from GeneSegNet.slide.distributed import DaskExecutor, DaskSettings, dask_client

    image, folder, index, net = slide
    serial = store_field(tmp_path / "serial.zarr", folder / "img.tif", index, net)
    settings = DaskSettings(workers=2, processes=False)
    inputs = LazyInputs(LazyImage(folder / "img.tif", 1), index, CFG)
    with dask_client(settings) as client:
        ex = DaskExecutor(client, settings)
        store = SlideStore(tmp_path / "dask.zarr", SHAPE, {"test": 1}, "float16", chunk=64)
        ex._field(net, inputs, window_plan(net), store, CFG)
        np.testing.assert_array_equal(store.field[:], serial.field[:])
        # masks: dask blocks on a field with real cells vs the in-process blocks
        a, _ = synthetic_store(tmp_path / "a.zarr")
        b, _ = synthetic_store(tmp_path / "b.zarr")
        blocks_serial(a, MS)
        ex._blocks(b, MS)
    assert merge_blocks(a, MS) == merge_blocks(b, MS) > 20
    np.testing.assert_array_equal(a.labels[:], b.labels[:])


def test_unreachable_scheduler_is_an_input_error():
    from GeneSegNet.slide.distributed import DaskSettings, dask_client

    with pytest.raises(InputError, match="cannot reach the dask scheduler"):
        with dask_client(DaskSettings(scheduler="tcp://127.0.0.1:9", timeout_s=1)):
            pass


def test_script_out_of_core_equals_in_memory_resumes_and_refuses_other_settings(tmp_path):
    from GeneSegNet.io import read_label
    from tests.tiny_runs import inference_runner, tiny_slides

    raw, model = tiny_slides(tmp_path)
    run = inference_runner(raw, model, "--confidence_threshold", "-2")

    assert run(tmp_path / "mem", "--out_of_core", "off") == 0
    assert run(tmp_path / "ooc", "--out_of_core", "on") == 0
    expected = read_label(tmp_path / "mem" / "label_sample_00.png")
    np.testing.assert_array_equal(read_label(tmp_path / "ooc" / "label_sample_00.png"), expected)
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "ooc" / "label_sample_00.zarr" / "labels"))[:], expected)
    assert (tmp_path / "ooc" / "slidingwindows_gradient_config.json").is_file()
    assert run(tmp_path / "ooc", "--out_of_core", "on") == 0  # a plain rerun resumes
    assert run(tmp_path / "ooc", "--out_of_core", "on", "--flow_threshold", "0.2") == 2
    assert run(tmp_path / "dask", "--dask_workers", "2", "--dask_threads",
               "--out_of_core_pixels", "1000") == 0
    big = tifffile.imread(tmp_path / "dask" / "label_sample_00.tif")
    np.testing.assert_array_equal(big, expected)
    assert not (tmp_path / "dask" / "label_sample_00.png").exists()


def test_out_of_core_warns_that_outlines_are_not_smoothed(tmp_path, caplog):
    """With a pixel size the in-memory run smooths outlines; out of core it cannot (it
    never holds the whole label image), says so, and equals the unsmoothed run."""
    from GeneSegNet.io import read_label
    from tests.tiny_runs import inference_runner, tiny_slides

    raw, model = tiny_slides(tmp_path)
    run = inference_runner(raw, model, "--confidence_threshold", "-2", "--pixel_size", "0.5")
    assert run(tmp_path / "plain", "--out_of_core", "off", "--smooth_um", "0") == 0
    with caplog.at_level("WARNING"):
        assert run(tmp_path / "ooc", "--out_of_core", "on") == 0
    assert "out of core: the outline smoothing not run" in caplog.text
    np.testing.assert_array_equal(read_label(tmp_path / "ooc" / "label_sample_00.png"),
                                  read_label(tmp_path / "plain" / "label_sample_00.png"))
