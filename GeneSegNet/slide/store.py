"""On-disk state of out-of-core whole-slide inference: a lazy image and a zarr run store.

Lazy image (:class:`LazyImage`): a slide read one region at a time from a zarr array, a
tiled (OME-)TIFF through tifffile's ``aszarr`` (pyramid level 0), or, for formats without
tiles (png, jpg), from memory. It is picklable (dask workers reopen the file).

Run store (:class:`SlideStore`), one zarr v3 group per slide, ``<save_dir>/label_<name>.zarr``:

- ``field`` [3, H, W] canvas dtype (float16/float32), chunks [3, C, C]: blended dY, dX and
  cell-probability logit;
- ``done_field`` [nr, nc] uint8, one chunk per element: 1 when field chunk (i, j) is final;
- ``blocks/b<k>`` [h, w] uint32: the cells kept by mask block k (ids 1..n, in the order of
  the block's own ids), over the block grown by its halo; attribute ``n``;
- ``done_blocks`` [n_blocks] uint8, one chunk per element: 1 when block k is stored;
- ``labels`` [H, W] int32, chunks [C, C]: the merged label image (ids 1..K, raster order
  of first appearance), complete when the group attribute ``labels_done`` is true.

The group attribute ``settings_hash`` (SHA-256 of the run's settings, image and spot
files, model weights and store layout) is written when the store is created; a store
whose hash differs is refused (:class:`GeneSegNet.errors.InputError`), so a resumed run never
mixes results of two settings. Completion markers are written after the data they mark,
so a run that stops at any point resumes without recomputing finished chunks or blocks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

STORE_FORMAT = 1  # bump when the layout or the meaning of a stored array changes
DEFAULT_CHUNK = 1024  # px; field and label chunks are C x C
LAZY_SUFFIXES = (".tif", ".tiff", ".zarr")


class LazyImage:
    """Read-only [H, W] or [H, W, C] image read region by region (see module docstring).

    Parameters
    ----------
    path : a ``.zarr`` array (or group holding array ``0``), a TIFF, or any image
        :func:`GeneSegNet.io.read_image` reads (then held in memory).
    channels : image channels the network takes (1 grey, 3 BGR); a lazy source with
        other channels raises InputError.
    """

    def __init__(self, path: str | Path, channels: int = 1) -> None:
        self.path = Path(path)
        self.channels = int(channels)
        self._array: Any = None
        # tifffile's zarr store reads through one file handle (seek, then read): threads of
        # one process (dask workers with processes=False) must not interleave their reads
        self._lock = threading.Lock()
        array = self._open()
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def lazy(self) -> bool:
        """True when regions are read from disk (False: an in-memory image)."""
        with self._lock:
            return not isinstance(self._open(), np.ndarray)

    def _open(self) -> Any:
        if self._array is not None:
            return self._array
        import zarr

        suffix = self.path.suffix.lower()
        try:
            if suffix == ".zarr":
                node = zarr.open(str(self.path), mode="r")
                array = node if isinstance(node, zarr.Array) else node["0"]
            elif suffix in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(self.path) as tif:
                    series = tif.series[0]
                    axes = series.axes
                store = tifffile.imread(self.path, aszarr=True, series=0, level=0)
                array = zarr.open(store, mode="r")
                if axes not in ("YX", "YXS", "YXC"):
                    raise InputError(f"lazy reads take TIFF axes YX or YXS, got {axes!r}",
                                     self.path)
            else:
                from GeneSegNet.io import read_image

                array = read_image(self.path, "gray" if self.channels == 1 else "color")
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr and tifffile raise many types
            raise InputError(f"cannot open the image lazily ({exc})", self.path) from exc
        n_chan = 1 if array.ndim == 2 else int(array.shape[2])
        if array.ndim not in (2, 3) or n_chan != self.channels:
            raise InputError(f"image of shape {tuple(array.shape)}: the model takes "
                             f"{self.channels} image channel(s) [H, W(, C)]", self.path)
        self._array = array
        return array

    def __getitem__(self, key) -> np.ndarray:
        with self._lock:
            return np.asarray(self._open()[key])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        if not isinstance(state["_array"], np.ndarray):
            state["_array"] = None  # reopened by the worker
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def channel(self, c: int) -> LazyChannel:
        """[H, W] view of channel ``c`` (the image itself when it has no channel axis)."""
        return LazyChannel(self, c)

    def identity(self) -> dict[str, Any]:
        """What identifies the source file for the settings hash (path, size, mtime)."""
        stat = self.path.stat()
        size = stat.st_size if self.path.is_file() else sum(
            p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {"path": str(self.path.resolve()), "bytes": size, "mtime_ns": stat.st_mtime_ns}


class LazyChannel:
    """One channel [H, W] of a :class:`LazyImage`: ``lazy_rows`` tells
    :func:`GeneSegNet.data.normalize.local_levels` to read it by row bands."""

    lazy_rows = True

    def __init__(self, image: LazyImage, c: int) -> None:
        self.image, self.c = image, int(c)
        self.shape = image.shape[:2]
        self.dtype = image.dtype
        self.ndim = 2

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (2 - len(key))
        if self.image.ndim == 2:
            return self.image[key]
        return self.image[(*key, self.c)]


def channel_percentiles_lazy(image: LazyImage, sample_pixels: int, lower: float = 1.0,
                             upper: float = 99.0, rows_per_step: int = 1024) -> np.ndarray:
    """Per-channel (lower, upper) percentiles, float32 [C, 2], of exactly the subsample
    ``image[::s, ::s]`` of :func:`GeneSegNet.slide.windows.channel_percentiles`, read in
    row bands (memory: one band plus the subsample)."""
    import math

    height, width = image.shape[:2]
    step = max(1, math.ceil(math.sqrt(height * width / sample_pixels)))
    band = max(step, (rows_per_step // step) * step)
    parts = []
    for r0 in range(0, height, band):
        part = image[r0 : min(r0 + band, height) : step, ::step]
        parts.append(part if part.ndim == 3 else part[:, :, None])
    sub = np.concatenate(parts)
    return np.stack([np.percentile(sub[:, :, c].astype(np.float32), [lower, upper])
                     for c in range(sub.shape[2])]).astype(np.float32)


def settings_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the JSON of ``record`` (sorted keys) plus the store format."""
    text = json.dumps({"store_format": STORE_FORMAT, **record}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_digest(net) -> str:
    """SHA-256 of a network's parameters and buffers (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        arr = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}{arr.shape}{arr.dtype}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk (or another write error) under ``path`` into InputError; what
    was marked finished stays valid, so the run resumes after the problem is fixed."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise InputError(f"cannot write the run store ({exc.strerror or exc}); finished "
                             "chunks and blocks are kept: free space (or fix permissions) "
                             "and rerun to resume", path) from exc
        raise


class SlideStore:
    """The zarr run store of one slide (see module docstring).

    Parameters
    ----------
    path : the store folder (``.zarr``).
    shape : (H, W) of the slide.
    settings : everything that determines the results (hashed).
    canvas_dtype : "float16" or "float32".
    chunk : field and label chunk edge (px).
    """

    def __init__(self, path: str | Path, shape: tuple[int, int], settings: dict[str, Any],
                 canvas_dtype: str = "float16", chunk: int = DEFAULT_CHUNK) -> None:
        import zarr

        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk = int(chunk)
        self.hash = settings_hash({"settings": settings, "shape": self.shape,
                                   "canvas_dtype": canvas_dtype, "chunk": self.chunk})
        self.grid = (-(-self.shape[0] // self.chunk), -(-self.shape[1] // self.chunk))
        if self.path.exists():
            try:
                group = zarr.open_group(str(self.path), mode="r+")
                found = group.attrs.get("settings_hash")
            except Exception:  # noqa: BLE001 - any unreadable store is refused
                found = None
            if found != self.hash:
                raise InputError(
                    "this run store was left by a run with other settings (or is not a "
                    f"GeneSegNet run store: settings hash {str(found)[:12]}, this run "
                    f"{self.hash[:12]}); it is never mixed with this run's results: delete "
                    "it or choose another --save_dir", self.path)
            logger.info("%s: resuming (same settings)", self.path)
            self.group = group
            return
        with disk_errors(self.path):
            group = zarr.open_group(str(self.path), mode="w")
            group.create_array("field", shape=(3, *self.shape), dtype=canvas_dtype,
                               chunks=(3, self.chunk, self.chunk), fill_value=0)
            group.create_array("done_field", shape=self.grid, dtype="uint8", chunks=(1, 1),
                               fill_value=0)
            group.attrs.update({"settings": json.loads(json.dumps(settings, default=str)),
                                "labels_done": False})
            group.attrs["settings_hash"] = self.hash  # last: the store is now valid
        self.group = group

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("group")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import zarr

        self.__dict__.update(state)
        self.group = zarr.open_group(str(self.path), mode="r+")

    # ---------------------------------------------------------------- field
    @property
    def field(self):
        """zarr array [3, H, W] of the blended network outputs."""
        return self.group["field"]

    def chunk_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Pixels (r0, r1, c0, c1) of field chunk (i, j)."""
        c = self.chunk
        return (i * c, min((i + 1) * c, self.shape[0]), j * c, min((j + 1) * c, self.shape[1]))

    def field_done(self) -> np.ndarray:
        """bool [nr, nc]: field chunks already final."""
        return self.group["done_field"][:].astype(bool)

    def write_field_chunk(self, i: int, j: int, values: np.ndarray) -> None:
        """Write final field chunk (i, j) [3, h, w], then its marker."""
        r0, r1, c0, c1 = self.chunk_box(i, j)
        self.field[:, r0:r1, c0:c1] = values
        self.group["done_field"][i, j] = 1

    # ---------------------------------------------------------------- blocks
    def ensure_blocks(self, n_blocks: int) -> None:
        """Create the block marker array (once)."""
        if "done_blocks" not in self.group:
            self.group.create_array("done_blocks", shape=(max(n_blocks, 1),), dtype="uint8",
                                    chunks=(1,), fill_value=0)
            self.group.require_group("blocks")

    def blocks_done(self) -> np.ndarray:
        """bool [n_blocks]: mask blocks already stored."""
        return self.group["done_blocks"][:].astype(bool)

    def write_block(self, k: int, cells: np.ndarray, truncated: int) -> None:
        """Store block k's kept cells [h, w] uint32 (ids 1..n), then its marker."""
        n = int(cells.max(initial=0))
        name = f"blocks/b{k}"
        if name in self.group:
            del self.group[name]
        arr = self.group.create_array(name, shape=cells.shape, dtype="uint32",
                                      chunks=cells.shape if cells.size else (1, 1),
                                      fill_value=0)
        if n:
            arr[...] = cells
        arr.attrs.update({"n": n, "truncated": int(truncated)})
        self.group["done_blocks"][k] = 1

    def read_block(self, k: int) -> tuple[np.ndarray, int, int]:
        """(cells [h, w] uint32, n, truncated) of block k."""
        arr = self.group[f"blocks/b{k}"]
        n = int(arr.attrs["n"])
        return (arr[...] if n else None), n, int(arr.attrs["truncated"])

    # ---------------------------------------------------------------- labels
    def fresh_labels(self):
        """A new, all-zero label array [H, W] int32 (replacing a partial one)."""
        if "labels" in self.group:
            del self.group["labels"]
        self.group.attrs["labels_done"] = False
        return self.group.create_array("labels", shape=self.shape, dtype="int32",
                                       chunks=(self.chunk, self.chunk), fill_value=0)

    @property
    def labels_done(self) -> bool:
        return bool(self.group.attrs.get("labels_done", False))

    @property
    def labels(self):
        """zarr array [H, W] int32 of the merged label image."""
        return self.group["labels"]

    def finish(self, n_cells: int) -> None:
        """Mark the label image complete and drop the per-block results."""
        self.group.attrs.update({"labels_done": True, "n_cells": int(n_cells)})
        if "blocks" in self.group:
            shutil.rmtree(self.path / "blocks", ignore_errors=True)
