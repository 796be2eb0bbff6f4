"""Checks on image files before they are decoded, and conversion of images to types
that PNG can store.

A PNG or JPEG header (a few bytes) can declare 100,000 x 100,000 pixels; decoding it
would ask for tens of GiB. :func:`check_declared_size` reads the size from the header
(PNG IHDR, JPEG SOF, TIFF series metadata) and refuses images above
:data:`MAX_IMAGE_PIXELS` (``GENESEGNET_MAX_IMAGE_PIXELS`` overrides it), above OpenCV's
own decoding limit for PNG/JPEG, or whose decoded size exceeds the machine's memory.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = int(os.environ.get("GENESEGNET_MAX_IMAGE_PIXELS", 2**32))
# OpenCV refuses to decode more pixels than this (its CV_IO_MAX_IMAGE_PIXELS default)
CV2_MAX_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 2**30))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _png_size(head: bytes) -> tuple[int, int, int] | None:
    if not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR" or len(head) < 26:
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return height, width, _PNG_CHANNELS.get(colour, 4) * max(1, depth // 8)


def _jpeg_size(path: Path) -> tuple[int, int, int] | None:
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        for _ in range(10000):
            byte = f.read(1)
            while byte and byte != b"\xff":
                byte = f.read(1)
            marker = f.read(1)
            while marker == b"\xff":
                marker = f.read(1)
            if not marker:
                return None
            code = marker[0]
            if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
                continue
            raw = f.read(2)
            if len(raw) < 2:
                return None
            length = struct.unpack(">H", raw)[0]
            if code in _JPEG_SOF:
                data = f.read(6)
                if len(data) < 6:
                    return None
                _, height, width, ncomp = struct.unpack(">BHHB", data)
                return height, width, ncomp
            f.seek(length - 2, os.SEEK_CUR)
    return None


def check_pixels(shape_hw: tuple[int, int], bytes_total: int, path: Path, *,
                 decoder_limit: int | None = None) -> None:
    """Refuse an image of ``shape_hw`` needing ``bytes_total`` bytes once decoded."""
    height, width = shape_hw
    pixels = int(height) * int(width)
    mem = physical_memory()
    if pixels > MAX_IMAGE_PIXELS:
        problem = f"more than {MAX_IMAGE_PIXELS:,} (set GENESEGNET_MAX_IMAGE_PIXELS to allow)"
    elif decoder_limit is not None and pixels > decoder_limit:
        problem = (f"more than the {decoder_limit:,} pixels OpenCV decodes; store it as a "
                   "(tiled) TIFF")
    elif mem is not None and bytes_total > mem:
        problem = f"{bytes_total / 2**30:.1f} GiB decoded, more than this machine's memory"
    else:
        return
    raise InputError(f"image header declares {height:,} x {width:,} pixels: {problem}", path)


def check_declared_size(path: Path) -> None:
    """Read the size a PNG/JPEG header declares and refuse absurd ones (TIFF: see
    :func:`GeneSegNet.io.images`' TIFF reader, which checks the series shape)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
        size = _png_size(head) if head.startswith(_PNG_SIGNATURE) else None
        if size is None and head.startswith(b"\xff\xd8"):
            size = _jpeg_size(path)
    except OSError:
        return  # the decoder reports unreadable files
    if size is not None:
        height, width, bytes_per_px = size
        check_pixels((height, width), height * width * bytes_per_px, path,
                     decoder_limit=CV2_MAX_PIXELS)


def to_png_storable(image: np.ndarray) -> np.ndarray:
    """``image`` as uint8/uint16 for PNG, scaled rather than clipped or wrapped.

    uint8/uint16 are kept; bool becomes 0/255; other integers are kept as uint16 when
    they fit 0..65,535, else scaled from their range; floats within [0, 1] are scaled by
    65,535, other floats from their finite range; non-finite pixels become 0.
    """
    if image.dtype in (np.uint8, np.uint16):
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.integer):
        low, high = (int(image.min(initial=0)), int(image.max(initial=0)))
        if low >= 0 and high <= 65535:
            return image.astype(np.uint16)
        values = image.astype(np.float64)
        return np.rint((values - low) / max(high - low, 1) * 65535).astype(np.uint16)
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(image.shape, np.uint16)
    low, high = float(values[finite].min()), float(values[finite].max())
    if low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (values - low) / (high - low if high > low else 1.0)
    scaled = np.where(finite, np.clip(scaled, 0, 1), 0)
    return np.rint(scaled * 65535).astype(np.uint16)
