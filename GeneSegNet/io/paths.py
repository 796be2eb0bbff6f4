"""The one check that keeps outputs away from inputs.

Every script calls :func:`check_output_not_input` with the paths it will write and the
paths it reads before anything is written, so that no choice of paths (equal folders,
``..``, symbolic links) can overwrite or delete input data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

PathsArg = Mapping[str, "str | Path | None"] | Iterable["str | Path | None"]


def _named(paths: PathsArg) -> list[tuple[str, Path]]:
    items = paths.items() if isinstance(paths, Mapping) else ((str(p), p) for p in paths)
    return [(name, Path(p)) for name, p in items if p is not None]


def resolved(path: str | Path) -> Path:
    """Absolute path with ``..`` and every symbolic link resolved (also for paths that do
    not exist yet: their existing part is resolved)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_not_input(outputs: PathsArg, inputs: PathsArg, *,
                           replaced: bool = False) -> None:
    """Refuse outputs that are, or lie inside, an input path.

    Parameters
    ----------
    outputs, inputs : paths (files or folders), either a mapping from a name shown in the
        message (e.g. ``"--save_dir"``) to a path, or an iterable of paths; None entries
        are skipped. Paths are compared after resolving ``..`` and symbolic links, so a
        link to an input folder counts as that folder.
    replaced : the outputs are folders that may be deleted or replaced as a whole (e.g.
        with ``--overwrite``): then an output that *contains* an input is refused too.

    Raises
    ------
    InputError : naming the output, the input and the problem.
    """
    ins = [(name, p, resolved(p)) for name, p in _named(inputs)]
    for out_name, out in _named(outputs):
        real_out = resolved(out)
        for in_name, given_in, real_in in ins:
            if real_out == real_in:
                problem = "is the same path as"
            elif _inside(real_out, real_in):
                problem = "lies inside"
            elif replaced and _inside(real_in, real_out):
                problem = "would be replaced and contains"
            else:
                continue
            label = out_name if out_name == str(out) else f"{out_name} {out}"
            raise InputError(
                f"output {label} {problem} the input {in_name} ({given_in}); refusing to "
                "write there (inputs are never overwritten or deleted): choose another "
                "output path",
                out,
            )


def crop_input_folders(*roots: str | Path | None) -> list[Path]:
    """The input folders (images/, labels/, spots/, HeatMaps/, newlabels/) of every sample
    folder of the crop-layout ``roots`` (missing roots are skipped)."""
    from GeneSegNet.io.layout import INPUT_FOLDERS

    found: list[Path] = []
    for root in roots:
        if root is None or not Path(root).is_dir():
            continue
        for sample in sorted(Path(root).iterdir()):
            if sample.is_dir():
                found.extend(sample / name for name in sorted(INPUT_FOLDERS)
                             if (sample / name).exists())
    return found


def raw_input_folders(root: str | Path) -> list[Path]:
    """The input folders of a raw-layout ``root`` (images/, labels/, spots/, metadata/,
    controls/), whether or not they exist."""
    return [Path(root) / name for name in ("images", "labels", "spots", "metadata", "controls")]


def check_sample_name(name: str) -> str:
    """A sample name that is a plain file name (no folder separators, not ``.``/``..``)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or not name.isprintable():
        raise InputError(f"sample name {name!r} must be a plain name (no '/', not '.' or '..')")
    return name
