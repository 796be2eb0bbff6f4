"""JSON run records: plain-JSON conversion and atomic writing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from GeneSegNet.io.atomic import atomic_path


def json_ready(obj: Any) -> Any:
    """``obj`` with dict keys as str, tuples as lists, paths as str, numpy scalars as
    Python numbers and non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (see :func:`json_ready`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(data), indent=2) + "\n", encoding="utf-8")
    return path
