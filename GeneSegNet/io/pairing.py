"""Pairing of images, labels and spot tables by sample name.

The sample name of a file is its name without the format extension (``.ome.tif``,
``.csv.gz``... included) and without one of the role's known affixes (for example
``label_`` as written by the inference script, or ``_label``). Files are never paired by
sorted position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from GeneSegNet.errors import InputError

MULTI_EXTENSIONS = (".ome.tiff", ".ome.tif", ".csv.gz")


def strip_extension(path: str | Path) -> str:
    """File name without its format extension."""
    name = Path(path).name
    for ext in MULTI_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def sample_name(
    path: str | Path, prefixes: Sequence[str] = (), suffixes: Sequence[str] = ()
) -> str:
    """Sample name of a file: the stem minus the first matching prefix and suffix."""
    name = strip_extension(path)
    for prefix in prefixes:
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
            break
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return name


def list_files(folder: str | Path, extensions: Iterable[str]) -> list[Path]:
    """Files in ``folder`` (not recursive) whose name ends with one of ``extensions``,
    sorted by name. A missing folder raises ``InputError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder not found", folder)
    exts = tuple(e.lower() for e in extensions)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(exts)
    )


def index_by_sample(files: Iterable[Path], prefixes: Sequence[str] = (),
                    suffixes: Sequence[str] = (), prefer: Sequence[str] = ()) -> dict[str, Path]:
    """Map sample name -> file.

    Two files with the same sample name are an error, unless both extensions appear in
    ``prefer`` (for example the same label saved as ``.png`` and ``.mat`` by inference):
    then the file whose extension comes first in ``prefer`` is used.
    """
    rank = {ext.lower(): i for i, ext in enumerate(prefer)}
    index: dict[str, Path] = {}
    for path in files:
        name = sample_name(path, prefixes, suffixes)
        if name in index:
            old, new = rank.get(index[name].suffix.lower()), rank.get(path.suffix.lower())
            if old is None or new is None or old == new:
                raise InputError(f"two files share the sample name {name!r}: "
                                 f"{index[name].name} and {path.name}", path.parent)
            if new < old:
                index[name] = path
            continue
        index[name] = path
    return index


def pair_samples(
    groups: dict[str, dict[str, Path]], required: Sequence[str] | None = None
) -> list[tuple[str, dict[str, Path]]]:
    """Join several sample-name indexes into one list of (name, {role: path}).

    ``groups`` maps a role ("images", "labels", "spots") to its index. Every sample must
    appear in every role listed in ``required`` (all roles by default); otherwise an
    ``InputError`` lists the unpaired files. The result is sorted by sample name.
    """
    roles = list(groups) if required is None else list(required)
    names = set().union(*(groups[r].keys() for r in roles)) if roles else set()
    problems = []
    for name in sorted(names):
        missing = [r for r in roles if name not in groups[r]]
        if missing:
            present = [str(groups[r][name]) for r in roles if name in groups[r]]
            problems.append(f"{', '.join(present)} has no matching file in {', '.join(missing)}")
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InputError(f"unpaired files: {shown}{more}")
    return [
        (name, {r: idx[name] for r, idx in groups.items() if name in idx}) for name in sorted(names)
    ]
