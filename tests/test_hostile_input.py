"""Hostile and broken input (issue 10): no code execution, no input lost, no traceback,
no silent wrong result.

Every script case asserts: exit status 2 (or 0 for a clean result), one error line that
names the offending file or flag, no traceback, the input tree unchanged (hashed before
and after) and no partial output. The slow fault cases (kills at random times, a real
full disk) are in ``bench/fault_cases.py``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import GeneSeg_test
import GeneSeg_train
from Analysis import compare_to_truth, generate_MappingRelationships
from GeneSegNet.cli import run_reporting_errors
from GeneSegNet.commands import simulate as simulate_cmd
from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
from GeneSegNet.data.transforms import normalize99
from GeneSegNet.errors import InputError
from GeneSegNet.io import atomic as atomic_mod
from GeneSegNet.io import read_image, read_label, write_image
from GeneSegNet.io.atomic import TEMP_PREFIX, atomic_path, staged_directory
from GeneSegNet.io.paths import check_output_not_input
from GeneSegNet.model.checkpoint import load_checkpoint, save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from Inference import slidingwindows_gradient
from preprocess import Generate_Image_Label_locationMap as preprocess_script
from tests.test_recursive import write_dataset

REPO = Path(__file__).resolve().parents[1]
MARKER_NAME = "PAYLOAD_RAN"


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tree_hash(*roots: Path) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            digest.update(str(path).encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A raw dataset (simulated), a crop dataset and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("hostile")
    raw = write_simulated_dataset(root / "raw", 1, TissueConfig(height=128, width=128), seed=2)
    crops = root / "crops"
    write_dataset(crops, {"s": 1}, seed=1)
    torch.manual_seed(0)
    model = save_checkpoint(root / "tiny.pt", GeneSegUNet(NetConfig(nbase=(8, 16, 16))))
    labels = raw / "labels"
    return {"root": root, "raw": raw, "crops": crops, "model": model, "labels": labels,
            "spots": raw / "spots", "truth": raw / "truth"}


@dataclass
class Case:
    """One hostile run: ``build(world, tmp) -> (main, argv, offending)``."""

    name: str
    build: Callable[[dict[str, Path], Path], tuple[Callable, list[str], str]]
    expect: str = "error"  # "error": exit 2 via the script; "parser": argparse exit 2


def _npy_payload(folder: Path, name: str, marker: Path) -> Path:
    path = folder / name
    np.save(path, np.array({"masks": Payload(marker)}, dtype=object), allow_pickle=True)
    return path


def _hostile_labels(world: dict[str, Path], tmp: Path, maker: Callable[[Path], Path]) -> Path:
    folder = tmp / "labels_in"
    folder.mkdir()
    maker(folder)
    return folder


def _mapping(label_dir: Path, world: dict[str, Path], tmp: Path, *extra: str):
    argv = ["--label_dir", str(label_dir), "--spot_dir", str(world["spots"]),
            "--save_dir", str(tmp / "mapping_out"), *extra]
    return generate_MappingRelationships.main, argv


def case_pickled_label_mapping(world, tmp):
    folder = _hostile_labels(world, tmp, lambda f: _npy_payload(f, "sample_00.npy",
                                                                  tmp / MARKER_NAME))
    main, argv = _mapping(folder, world, tmp)
    return main, argv, "sample_00.npy"


def case_pickled_label_truth(world, tmp):
    folder = _hostile_labels(world, tmp, lambda f: _npy_payload(f, "sample_00.npy",
                                                                  tmp / MARKER_NAME))
    argv = ["--label_dir", str(folder), "--truth_dir", str(world["truth"])]
    return compare_to_truth.main, argv, "sample_00.npy"


def case_pickled_label_preprocess(world, tmp):
    raw = tmp / "raw"
    for sub in ("images", "spots"):
        (raw / sub).mkdir(parents=True)
        for f in (world["raw"] / sub).iterdir():
            (raw / sub / f.name).write_bytes(f.read_bytes())
    (raw / "labels").mkdir()
    _npy_payload(raw / "labels", "sample_00.npy", tmp / MARKER_NAME)
    argv = ["--base_dir", str(raw), "--save_crop_dir", str(tmp / "crops_out"), "--n_crops", "1",
            "--crop_size", "64"]
    return preprocess_script.main, argv, "sample_00.npy"


def case_pickled_checkpoint(world, tmp):
    path = tmp / "evil.pt"
    torch.save({"format": "GeneSegNet-checkpoint", "payload": Payload(tmp / MARKER_NAME)}, path)
    argv = ["--test_dir", str(world["crops"]), "--pretrained_model", str(path),
            "--savedir", str(tmp / "test_out")]
    return GeneSeg_test.main, argv, "evil.pt"


def case_mapping_save_dir_is_spot_dir(world, tmp):
    main, argv = _mapping(world["labels"], world, tmp)
    argv[argv.index("--save_dir") + 1] = str(world["spots"])
    return main, argv, str(world["spots"])


def case_mapping_save_dir_dotdot(world, tmp):
    main, argv = _mapping(world["labels"], world, tmp)
    argv[argv.index("--save_dir") + 1] = str(world["spots"] / ".." / "spots" / "sub")
    return main, argv, "spots"


def case_mapping_save_dir_symlink(world, tmp):
    link = tmp / "link_to_spots"
    link.symlink_to(world["spots"], target_is_directory=True)
    main, argv = _mapping(world["labels"], world, tmp)
    argv[argv.index("--save_dir") + 1] = str(link)
    return main, argv, "link_to_spots"


def case_truth_csv_over_truth_file(world, tmp):
    target = next(world["truth"].glob("*.csv"))
    argv = ["--label_dir", str(world["labels"]), "--truth_dir", str(world["truth"]),
            "--out_csv", str(target)]
    return compare_to_truth.main, argv, target.name


def case_preprocess_output_is_input_sample_images(world, tmp):
    raw = tmp / "raw"
    for sub in ("images", "labels", "spots"):
        (raw / sub).mkdir(parents=True)
        for f in (world["raw"] / sub).iterdir():
            new = f.name.replace("sample_00", "images")
            (raw / sub / new).write_bytes(f.read_bytes())
    argv = ["--base_dir", str(raw), "--save_crop_dir", str(raw), "--overwrite", "--n_crops", "1",
            "--crop_size", "64"]
    return preprocess_script.main, argv, "images"


def case_inference_existing_save_dir(world, tmp):
    out = tmp / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--root_dir", str(world["raw"]), "--save_dir", str(out), "--model_file",
            str(world["model"])]
    return slidingwindows_gradient.main, argv, "existing"


def case_inference_save_dir_in_images(world, tmp):
    argv = ["--root_dir", str(world["raw"]), "--save_dir", str(world["raw"] / "images" / "o"),
            "--model_file", str(world["model"])]
    return slidingwindows_gradient.main, argv, "images"


def case_png_size_bomb(world, tmp):
    folder = tmp / "labels_in"
    folder.mkdir()
    good = folder / "sample_00.png"
    write_image(good, np.zeros((4, 4), np.uint8))
    data = bytearray(good.read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
    good.write_bytes(bytes(data))
    main, argv = _mapping(folder, world, tmp)
    return main, argv, "sample_00.png"


def case_label_ids_above_int32(world, tmp):
    folder = tmp / "labels_in"
    folder.mkdir()
    labels = np.zeros((128, 128), np.uint64)
    labels[10:20, 10:20] = 2**32 + 1  # would wrap onto id 1
    labels[30:40, 30:40] = 1
    tifffile.imwrite(folder / "sample_00.tif", labels)
    main, argv = _mapping(folder, world, tmp)
    return main, argv, "sample_00.tif"


def case_z_stack_image(world, tmp):
    raw = tmp / "raw"
    for sub in ("labels", "spots"):
        (raw / sub).mkdir(parents=True)
        for f in (world["raw"] / sub).iterdir():
            (raw / sub / f.name).write_bytes(f.read_bytes())
    (raw / "images").mkdir()
    tifffile.imwrite(raw / "images" / "sample_00.tif", np.zeros((160, 128, 128), np.uint8),
                     metadata=None)
    argv = ["--base_dir", str(raw), "--save_crop_dir", str(tmp / "crops_out"), "--n_crops", "1",
            "--crop_size", "64"]
    return preprocess_script.main, argv, "sample_00.tif"


def case_nan_checkpoint(world, tmp):
    net = GeneSegUNet(NetConfig(nbase=(8, 16, 16)))
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    path = save_checkpoint(tmp / "nan.pt", net)
    argv = ["--test_dir", str(world["crops"]), "--pretrained_model", str(path),
            "--savedir", str(tmp / "test_out")]
    return GeneSeg_test.main, argv, "nan.pt"


def case_huge_architecture(world, tmp):
    path = tmp / "huge.pt"
    cfg = NetConfig(nbase=(8, 16)).to_dict()
    cfg["nbase"] = [100_000, 100_000, 100_000]
    torch.save({"format": "GeneSegNet-checkpoint", "version": 1, "net_config": cfg,
                "state_dict": {}}, path)
    argv = ["--test_dir", str(world["crops"]), "--pretrained_model", str(path),
            "--savedir", str(tmp / "test_out")]
    return GeneSeg_test.main, argv, "huge.pt"


def case_tiny_diameter(world, tmp):
    argv = ["--test_dir", str(world["crops"]), "--pretrained_model", str(world["model"]),
            "--savedir", str(tmp / "test_out"), "--diameter", "0.01"]
    return GeneSeg_test.main, argv, "--diameter"


def _parser_case(main_name: str, *flags: str):
    def build(world, tmp):
        base = {
            "preprocess": (preprocess_script.main, ["--base_dir", str(world["raw"]),
                                                    "--save_crop_dir", str(tmp / "o")]),
            "inference": (slidingwindows_gradient.main, [
                "--root_dir", str(world["raw"]), "--save_dir", str(tmp / "o"),
                "--model_file", str(world["model"])]),
            "train": (GeneSeg_train.main, ["--train_dir", str(world["crops"]),
                                           "--save_model_dir", str(tmp / "o")]),
            "test": (GeneSeg_test.main, ["--test_dir", str(world["crops"]),
                                         "--pretrained_model", str(world["model"])]),
            "mapping": (generate_MappingRelationships.main, [
                "--label_dir", str(world["labels"]), "--spot_dir", str(world["spots"]),
                "--save_dir", str(tmp / "o")]),
            "simulate": (simulate_cmd.main, ["--out_dir", str(tmp / "o")]),
        }[main_name]
        return base[0], [*base[1], *flags], flags[0]

    return build


CASES = [
    Case("pickled_label_mapping", case_pickled_label_mapping),
    Case("pickled_label_compare_to_truth", case_pickled_label_truth),
    Case("pickled_label_preprocess", case_pickled_label_preprocess),
    Case("pickled_checkpoint_test", case_pickled_checkpoint),
    Case("mapping_save_dir_is_spot_dir", case_mapping_save_dir_is_spot_dir),
    Case("mapping_save_dir_dotdot_inside_spots", case_mapping_save_dir_dotdot),
    Case("mapping_save_dir_symlink_to_spots", case_mapping_save_dir_symlink),
    Case("truth_out_csv_over_truth_file", case_truth_csv_over_truth_file),
    Case("preprocess_overwrite_sample_named_images", case_preprocess_output_is_input_sample_images),
    Case("inference_existing_save_dir", case_inference_existing_save_dir),
    Case("inference_save_dir_inside_images", case_inference_save_dir_in_images),
    Case("png_header_100000_squared", case_png_size_bomb),
    Case("label_ids_above_int32", case_label_ids_above_int32),
    Case("z_stack_of_160_planes", case_z_stack_image),
    Case("checkpoint_nan_weights", case_nan_checkpoint),
    Case("checkpoint_huge_architecture", case_huge_architecture),
    Case("diameter_0.01", case_tiny_diameter),
    *[
        Case(f"parser_{script}_{'_'.join(flags)}", _parser_case(script, *flags), "parser")
        for script, flags in [
            ("preprocess", ("--n_crops", "0")),
            ("preprocess", ("--sigma", "0")),
            ("preprocess", ("--split", "0", "0", "0")),
            ("preprocess", ("--spot_scale", "0")),
            ("preprocess", ("--spot_scale", "-2")),
            ("preprocess", ("--pixel_size", "0")),
            ("preprocess", ("--transcript_sigma_um", "0")),
            ("preprocess", ("--crop_size", "4")),
            ("simulate", ("--height", "0")),
            ("inference", ("--block_size", "0")),
            ("inference", ("--window", "0")),
            ("inference", ("--diameter", "nan")),
            ("inference", ("--batch_size", "0")),
            ("train", ("--learning_rate", "nan")),
            ("train", ("--n_epochs", "0")),
            ("train", ("--output_filename", "images")),
            ("test", ("--tile_overlap", "1.5")),
            ("test", ("--niter", "-1")),
            ("mapping", ("--spot_scale", "0")),
            ("mapping", ("--pixel_size", "inf")),
        ]
    ],
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case: Case, world, tmp_path, caplog, capsys):
    main, argv, offending = case.build(world, tmp_path)
    inputs = [world["raw"], world["crops"], world["model"].parent / "tiny.pt"]
    local_inputs = [p for p in tmp_path.iterdir()]
    before = tree_hash(*inputs, *local_inputs)
    caplog.set_level(logging.INFO)
    if case.expect == "parser":
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert offending in err and "Traceback" not in err
    else:
        code = main(argv)  # an uncaught exception (a traceback) fails the test here
        assert code == 2
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        line = errors[0].getMessage()
        assert "\n" not in line and offending in line, line
        assert not any(r.exc_info for r in caplog.records)  # no traceback logged
    assert not (tmp_path / MARKER_NAME).exists(), "code planted in a data file ran"
    assert tree_hash(*inputs, *local_inputs) == before, "an input changed"
    for out in ("mapping_out", "crops_out", "test_out", "o"):
        written = tmp_path / out
        assert not written.exists() or not any(
            p.is_file() and p.suffix not in (".log",) for p in written.rglob("*")
        ), f"partial output in {written}"
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*")), "temporary files left behind"


# ------------------------------------------------------------------ no code from pickles
def test_restricted_npy_reads_cellpose_dicts_and_refuses_payloads(tmp_path):
    masks = np.arange(12, dtype=np.uint16).reshape(3, 4)
    seg = {"masks": masks, "outlines": np.zeros((3, 4)), "filename": "x.png",
           "chan_choose": [0, 0], "est_diam": np.float64(30.0), "ismanual": np.array([True])}
    np.save(tmp_path / "ok_seg.npy", seg, allow_pickle=True)
    np.testing.assert_array_equal(read_label(tmp_path / "ok_seg.npy"), masks)
    marker = tmp_path / MARKER_NAME
    path = _npy_payload(tmp_path, "evil.npy", marker)
    with pytest.raises(InputError, match="unsafe") as info:
        read_label(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_unsafe_checkpoint_message_says_unsafe(tmp_path):
    marker = tmp_path / MARKER_NAME
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="unsafe checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------ outputs vs inputs
def test_output_not_input_resolves_links_and_dotdot(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    for out in (data, data / "x", tmp_path / "link" / "y", data / ".." / "data"):
        with pytest.raises(InputError, match="input"):
            check_output_not_input({"--out": out}, {"--in": data})
    check_output_not_input({"--out": tmp_path / "other"}, {"--in": data})
    with pytest.raises(InputError, match="contains"):
        check_output_not_input({"--out": tmp_path}, {"--in": data}, replaced=True)


# ------------------------------------------------------------------ file-system errors
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_become_one_line(code, world, tmp_path, monkeypatch, caplog):
    def refuse(final):
        raise OSError(code, os.strerror(code), str(final))

    monkeypatch.setattr(atomic_mod, "temp_file", refuse)
    main, argv = _mapping(world["labels"], world, tmp_path)
    before = tree_hash(world["raw"])
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "mapping_out" in errors[0] and os.strerror(code) in errors[0]
    assert tree_hash(world["raw"]) == before


def test_run_reporting_errors_memory_and_os_errors(caplog):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/x/out.png")

    assert run_reporting_errors(full) == 2
    assert "/x/out.png" in caplog.text and "disk is full" in caplog.text


# ------------------------------------------------------------------ umask and temporaries
@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        with staged_directory(tmp_path / "folder") as stage:
            (stage / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "folder").stat().st_mode & 0o777 == dir_mode


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic_mod._host()
    stale = tmp_path / f"{TEMP_PREFIX}{host}.{dead.pid}.abcd.out.png"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f"{TEMP_PREFIX}{host}.{dead.pid}.ef01.sample.partial"
    stale_dir.mkdir()
    alive = tmp_path / f"{TEMP_PREFIX}{host}.{os.getpid()}.1234.other.png"
    alive.write_bytes(b"mine")
    other_host = tmp_path / f"{TEMP_PREFIX}elsewhere.{dead.pid}.5678.x.png"
    other_host.write_bytes(b"theirs")
    atomic_mod._cleaned.discard(tmp_path.resolve())
    with atomic_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("ok")
    assert not stale.exists() and not stale_dir.exists()
    assert alive.exists() and other_host.exists()


# ------------------------------------------------------------------ silent wrong results
def test_a_few_nan_pixels_do_not_blank_the_image(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (160, 160)).astype(np.float32)
    clean = normalize99(image)
    holed = image.copy()
    holed.flat[rng.choice(image.size, 100, replace=False)] = np.nan
    out = normalize99(holed)
    assert np.isfinite(out).all()
    finite = np.isfinite(holed)
    assert np.abs(out[finite] - clean[finite]).max() < 0.02
    tifffile.imwrite(tmp_path / "nan.tif", holed)
    read = read_image(tmp_path / "nan.tif")
    assert np.isfinite(read).all() and np.array_equal(read[finite], holed[finite])


@pytest.mark.parametrize("image", [
    np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64),
    np.linspace(0, 100_000, 64 * 64).astype(np.int32).reshape(64, 64),
], ids=["float_0_1", "int32_wide"])
def test_float_and_int32_images_are_scaled_not_clipped(tmp_path, image):
    write_image(tmp_path / "x.png", image)
    back = read_image(tmp_path / "x.png")
    assert back.dtype == np.uint16 and back.max() == 65535 and back.min() == 0
    assert len(np.unique(back)) > 1000  # not saturated into a few values


def test_z_stack_with_axes_is_max_projected(tmp_path, caplog):
    stack = np.zeros((5, 32, 32), np.uint16)
    stack[3, 10, 10] = 900
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    image = read_image(tmp_path / "z.tif")
    assert image.shape == (32, 32) and image[10, 10] == 900
    assert "maximum projection" in caplog.text
