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
