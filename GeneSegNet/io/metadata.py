"""Per-sample metadata: the physical pixel size and where it came from.

One JSON file per raw sample, ``<base_dir>/metadata/<sample>.json``::

    {"pixel_size_um": 0.2125, "platform": "xenium", "um_to_px": [[a, b, c], [d, e, f]],
     "source": "experiment.xenium"}

``pixel_size_um`` is the edge of one image pixel in micrometres (µm/px). ``um_to_px`` is
an optional 2x3 affine taking (x_um, y_um, 1) to (x_px, y_px) (column, row) of the image;
``None`` means the spot table is already in image pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from GeneSegNet.errors import InputError
from GeneSegNet.io.records import write_json

METADATA_DIR = "metadata"


@dataclass(frozen=True)
class SampleMetadata:
    """What is known of one sample beyond its pixels."""

    pixel_size_um: float
    platform: str = "unknown"
    um_to_px: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        check_pixel_size(self.pixel_size_um, "pixel_size_um")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["um_to_px"] = None if self.um_to_px is None else [list(r) for r in self.um_to_px]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "metadata") -> SampleMetadata:
        if not isinstance(data, dict) or "pixel_size_um" not in data:
            raise InputError(f"{where}: no 'pixel_size_um' given")
        affine = data.get("um_to_px")
        if affine is not None:
            try:
                rows = tuple(tuple(float(v) for v in row) for row in affine)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{where}: 'um_to_px' is not a 2x3 matrix of numbers") from exc
            if len(rows) != 2 or any(len(r) != 3 for r in rows):
                raise InputError(f"{where}: 'um_to_px' must be a 2x3 matrix")
            affine = rows
        try:
            pixel = float(data["pixel_size_um"])
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: 'pixel_size_um' is not a number") from exc
        try:
            return cls(pixel_size_um=pixel, platform=str(data.get("platform", "unknown")),
                       um_to_px=affine, source=str(data.get("source", "")))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc


def check_pixel_size(value: float | None, what: str) -> float:
    """``value`` as a float if it is a finite pixel size > 0 µm/px; else InputError."""
    if value is None:
        raise InputError(f"{what}: a pixel size in µm/px is needed here and none was given")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: pixel size {value!r} is not a number") from exc
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{what}: pixel size must be a finite number > 0 µm/px, got {value!r}")
    return number


def metadata_path(base_dir: str | Path, sample: str) -> Path:
    return Path(base_dir) / METADATA_DIR / f"{sample}.json"


def write_metadata(path: str | Path, meta: SampleMetadata) -> Path:
    return write_json(path, meta.to_dict())


def read_metadata(path: str | Path) -> SampleMetadata:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read metadata ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: metadata is not valid JSON ({exc})") from exc
    return SampleMetadata.from_dict(data, where=str(path))


def resolve_pixel_size(base_dir: str | Path | None, sample: str,
                       option: float | None, option_name: str = "--pixel_size") -> float | None:
    """The pixel size of ``sample``: its metadata file, or the option; both must agree.

    Returns None when neither gives one (callers that need µm raise then).
    """
    from_file = None
    path = None if base_dir is None else metadata_path(base_dir, sample)
    if path is not None and path.is_file():
        from_file = read_metadata(path).pixel_size_um
    if option is not None:
        option = check_pixel_size(option, option_name)
        if from_file is not None and not math.isclose(option, from_file, rel_tol=1e-6):
            raise InputError(f"{path}: pixel size {from_file} µm/px disagrees with "
                             f"{option_name} {option}")
        return option
    return from_file
