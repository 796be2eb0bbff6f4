"""Reading ``.npy`` files that hold pickled objects without running code from them.

``np.load(allow_pickle=True)`` unpickles whatever the file names: a planted object whose
``__reduce__`` calls ``os.system`` runs as soon as the file is read. Cellpose's
``_seg.npy`` files are pickled dicts of arrays, so a label reader needs pickles, but only
plain data. :func:`load_npy_restricted` reads the ``.npy`` header itself and unpickles
the body with :class:`RestrictedUnpickler`, which admits numpy arrays, dtypes and
scalars and plain containers (dict, list, tuple, set, str, bytes, numbers, None) and
refuses every other global before it is imported.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

# (module, name) pairs a pickled numpy array / dict of arrays needs; nothing else.
_ALLOWED_GLOBALS = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "bytearray"),
        ("collections", "OrderedDict"),
    }
)
# numpy pickles dtypes as numpy.dtype + a type code; scalar types appear as
# ``numpy.dtypes.Float64DType`` etc. in numpy >= 2 only via dtype reduce, which stays
# within numpy.dtype.


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle refers to a global outside the allowed set."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of plain numpy data."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{module}.{name}")


def _check_array(obj: Any, depth: int = 0) -> None:
    """Refuse ndarray subclasses smuggled in through ``_reconstruct``."""
    if depth > 50:
        raise UnsafePickleError("nesting deeper than 50 levels")
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            raise UnsafePickleError(type(obj).__name__)
        if obj.dtype == object:
            for item in obj.flat:
                _check_array(item, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            _check_array(value, depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            _check_array(value, depth + 1)


def load_npy_restricted(path: str | Path) -> Any:
    """Load a ``.npy`` file; a pickled (object) body is read with :class:`RestrictedUnpickler`.

    Returns the array (an object array of shape () holding e.g. a dict for Cellpose's
    ``_seg.npy``). Raises InputError naming the file when the pickle refers to anything
    but plain data ("unsafe"), or when the file is not a readable ``.npy``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            obj = RestrictedUnpickler(f).load()
    except UnsafePickleError as exc:
        raise InputError(
            f"unsafe .npy file: its pickle refers to {exc}, which loading would have to "
            "import and run; refusing it (only arrays and plain data are accepted)",
            path,
        ) from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise InputError(f"cannot read .npy file ({type(exc).__name__}: {exc})", path) from None
    _check_array_or_refuse(obj, path)
    return np.asarray(obj) if not isinstance(obj, np.ndarray) else obj


def _check_array_or_refuse(obj: Any, path: Path) -> None:
    try:
        _check_array(obj)
    except UnsafePickleError as exc:
        raise InputError(f"unsafe .npy file: it holds {exc}; only plain data is accepted",
                         path) from None
