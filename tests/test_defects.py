"""Guards for the package-layout defects of issue 14 item 5: console scripts resolve,
--verbose stays within the project, scripts log under their own names, one spot->pixel
rule, an earlier run's refined labels are moved aside, not deleted."""

from __future__ import annotations

import ast
import importlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from GeneSegNet.errors import InputError
from GeneSegNet.io.spots import spot_pixels
from GeneSegNet.log import setup_logging
from GeneSegNet.mapping import lookup_cell_ids
from GeneSegNet.training.label_folders import MARKER, claim_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    [*ROOT.glob("GeneSeg_*.py"), *(ROOT / "preprocess").glob("*.py"),
     *(ROOT / "Inference").glob("*.py"), *(ROOT / "Analysis").glob("*.py")]
)


def test_every_console_script_resolves_to_a_callable():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_simulate_console_script_writes_a_dataset(tmp_path):
    from GeneSegNet.commands.simulate import main

    out = tmp_path / "raw"
    argv = ["--out_dir", str(out), "--n_samples", "1", "--height", "96", "--width", "96"]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} >= {"images", "labels", "spots"}
    assert main(argv) == 2  # exists, no --overwrite


@pytest.fixture
def restore_logging():
    names = ["", "GeneSegNet", "numba"]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_verbose_is_the_projects_debug_only(restore_logging):
    setup_logging(verbose=True)
    assert not logging.getLogger("numba.core.ssa").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("some.other.library").isEnabledFor(logging.DEBUG)
    for name in ("GeneSegNet.dynamics.masks", "GeneSegNet.scripts.GeneSeg_train"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG)
    setup_logging(verbose=False)
    assert not logging.getLogger("GeneSegNet.dynamics.masks").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("GeneSegNet.dynamics.masks").isEnabledFor(logging.INFO)


def _logger_names(path: Path) -> list[str]:
    """String arguments of every ``logging.getLogger("...")`` call in a file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger" and node.args
                and isinstance(node.args[0], ast.Constant)):
            names.append(node.args[0].value)
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_log_under_their_own_name(script):
    for name in _logger_names(script):
        assert name == f"GeneSegNet.scripts.{script.stem}"
    assert not (ROOT / "GeneSegNet" / "scripts").exists()  # so no package module has it


def test_spot_pixel_rule_at_the_image_edges():
    height, width = 4, 6
    x = np.array([-0.5, -1e-9, 0.0, width - 1e-9, width, 2.5, np.nan, np.inf, 1.0])
    y = np.array([1.0, 1.0, 1.0, 1.0, 1.0, height - 1e-9, 1.0, 1.0, -0.25])
    rows, cols, inside = spot_pixels(x, y, (height, width))
    np.testing.assert_array_equal(
        inside, [False, False, True, True, False, True, False, False, False])
    np.testing.assert_array_equal(rows, [1, 1, height - 1])
    np.testing.assert_array_equal(cols, [0, width - 1, 2])
    assert rows.dtype == cols.dtype == np.int64
    labels = np.arange(1, height * width + 1).reshape(height, width)
    ids, finite, mapped_inside = lookup_cell_ids(labels, x, y)
    np.testing.assert_array_equal(mapped_inside, inside)
    np.testing.assert_array_equal(ids[inside], labels[rows, cols])
    assert (ids[~inside] == 0).all()
    np.testing.assert_array_equal(finite, np.isfinite(x) & np.isfinite(y))


def test_earlier_runs_newlabels_are_moved_aside_not_deleted(tmp_path):
    target = tmp_path / "s1" / "newlabels"
    target.mkdir(parents=True)
    (target / MARKER).write_text(json.dumps({"run_id": "earlier", "round": 1}))
    (target / "0_label.png").write_bytes(b"old labels")
    rc = SimpleNamespace(overwrite_newlabels=False, refined_name="newlabels")
    with pytest.raises(InputError, match="overwrite_newlabels"):
        claim_folder(target, rc, "this_run", dry_run=False)
    rc.overwrite_newlabels = True
    assert claim_folder(target, rc, "this_run", dry_run=True) is not None
    assert (target / "0_label.png").exists()  # a dry run moves nothing
    claim_folder(target, rc, "this_run", dry_run=False)
    assert not target.exists()
    (backup,) = target.parent.glob("newlabels.backup_*")
    assert (backup / "0_label.png").read_bytes() == b"old labels"
