"""Transcript input channels: a per-slide scaled density, optional gene channels, storage.

Upstream feeds the network the pixel-wise *maximum* of truncated Gaussians (σ = 7 px,
:mod:`GeneSegNet.data.heatmap`). Chosen for sparse ISS data, it saturates at Xenium-like
densities (most tissue pixels are within a few pixels of some spot) and becomes a tissue
mask. Here the channel is a *density*: the sum of normalised Gaussian kernels, i.e.
transcripts per µm², divided by one number per slide (``slide_scale``, a typical
in-tissue density), so that 1 means "typical for this slide" whatever the platform.

Kernel: the 1-D Gaussian ``exp(-d²/2σ²)`` sampled at integer offsets |d| <= R,
R = ceil(KERNEL_TRUNCATE · σ), normalised to sum 1; the 2-D kernel is its outer product
(square support), so each spot adds exactly one transcript of mass. A spot at continuous
(row, col) pixel position lies in pixel (floor(row), floor(col)). Windows of one slide
tile seamlessly: spots outside a window but within R pixels still contribute.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import tifffile

from GeneSegNet.data.gene_embedding import GeneEmbedding
from GeneSegNet.data.heatmap import DEFAULT_SIGMA as HEATMAP_SIGMA_PX
from GeneSegNet.data.heatmap import render_heatmap
from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import atomic_path
from GeneSegNet.io.metadata import check_pixel_size

logger = logging.getLogger(__name__)

TRANSCRIPT_MODES = ("density", "heatmap")
# σ = 2 µm: small against a cell (radius ~5 µm), so a cell border or a 1-2 µm gap is blurred
# over ~2 µm only (FWHM 4.7 µm), yet the kernel's effective area 4πσ² ≈ 50 µm² holds ~15-50
# transcripts at Xenium-like in-tissue densities (0.3-1 /µm²): Poisson noise ~15-25 %.
DEFAULT_SIGMA_UM = 2.0
KERNEL_TRUNCATE = 4.0  # kernel radius in σ; the mass beyond is < 1e-4 per axis
MAX_SCALE_SPOTS = 20_000  # spots sampled to estimate the slide scale (median SE ~1 %)
HIGH_FRACTION = 0.9  # saturation: pixels at >= 0.9 x the reference value


def check_sigma(value: float, what: str = "sigma_um") -> float:
    """``value`` as a float if finite and > 0; else InputError naming ``what``."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: {value!r} is not a number") from exc
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{what} must be a finite number > 0, got {value!r}")
    return number


def kernel_radius(sigma_px: float) -> int:
    """Half-width R (px) of the square kernel support."""
    return max(1, math.ceil(KERNEL_TRUNCATE * check_sigma(sigma_px, "sigma_px")))


def gaussian_kernel_1d(sigma_px: float) -> np.ndarray:
    """float64 [2R + 1] sampled Gaussian, normalised to sum 1."""
    radius = kernel_radius(sigma_px)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    return kernel / kernel.sum()


def _kernel_sums(rows_px: np.ndarray, cols_px: np.ndarray, shape: tuple[int, int],
                 sigma_px: float, origin: tuple[int, int], weights: np.ndarray
                 ) -> np.ndarray:
    """float64 [k, H, W] sums of kernels weighted by ``weights`` [N, k] (per px²)."""
    height, width = int(shape[0]), int(shape[1])
    kernel = gaussian_kernel_1d(sigma_px)
    radius = (len(kernel) - 1) // 2
    rows = np.asarray(rows_px, dtype=np.float64)
    cols = np.asarray(cols_px, dtype=np.float64)
    if rows.shape != cols.shape or weights.shape[0] != rows.size:
        raise InputError(f"{rows.size} rows, {cols.size} cols and {weights.shape[0]} weights "
                         "do not match")
    ok = np.isfinite(rows) & np.isfinite(cols)
    local_r = np.floor(rows[ok]).astype(np.int64) - int(origin[0]) + radius
    local_c = np.floor(cols[ok]).astype(np.int64) - int(origin[1]) + radius
    pad_h, pad_w = height + 2 * radius, width + 2 * radius
    keep = (local_r >= 0) & (local_r < pad_h) & (local_c >= 0) & (local_c < pad_w)
    flat = local_r[keep] * pad_w + local_c[keep]
    kept_weights = weights[ok][keep]
    out = np.zeros((weights.shape[1], height, width), dtype=np.float64)
    if flat.size == 0:
        return out
    for channel in range(weights.shape[1]):
        canvas = np.bincount(flat, weights=kept_weights[:, channel], minlength=pad_h * pad_w)
        canvas = canvas.reshape(pad_h, pad_w)
        # Only the centre is kept, and it depends on canvas pixels alone: border is moot.
        smooth = cv2.sepFilter2D(canvas, cv2.CV_64F, kernel, kernel,
                                 borderType=cv2.BORDER_CONSTANT)
        out[channel] = smooth[radius: radius + height, radius: radius + width]
    return out


def density_map(rows_px: np.ndarray, cols_px: np.ndarray, shape: tuple[int, int],
                sigma_px: float, *, origin: tuple[int, int] = (0, 0),
                weights: np.ndarray | None = None) -> np.ndarray:
    """Sum of normalised Gaussian kernels: float32 [H, W] in transcripts per px².

    ``rows_px``, ``cols_px``: continuous spot positions (y, x) in px, in the frame of
    ``origin`` (the global (row, col) of output pixel (0, 0)); non-finite ones are ignored.
    ``weights``: optional [N] weight per spot (default 1). O(N + H·W·R).
    """
    sigma_px = check_sigma(sigma_px, "sigma_px")
    n = np.asarray(rows_px).size
    w = np.ones((n, 1)) if weights is None else np.asarray(weights, np.float64).reshape(-1, 1)
    return _kernel_sums(rows_px, cols_px, shape, sigma_px, origin, w)[0].astype(np.float32)


def sigma_in_px(sigma_um: float, pixel_size_um: float | None) -> float:
    """Kernel σ in px from σ in µm and the pixel size in µm/px (both validated)."""
    sigma_um = check_sigma(sigma_um, "sigma_um")
    return sigma_um / check_pixel_size(pixel_size_um, "pixel_size_um")


def _check_scale(slide_scale: float | None) -> float:
    if slide_scale is None:
        raise InputError("slide_scale: a per-slide density scale is needed (see "
                         "slide_density_scale) and none was given")
    return check_sigma(slide_scale, "slide_scale")


SCALE_CHUNK = 2_000  # sampled spots processed at once (bounds the memory of the pairs)
PAIR_BUDGET = 2_000_000  # (sample, point) pairs processed at once, unless one sample has more
NEAR_BUDGET = 8_000_000  # points held at once by slide_density_scale_stream


def _density_at(points: np.ndarray, sample: np.ndarray, kernel: np.ndarray,
                low: np.ndarray | None = None) -> np.ndarray:
    """float64 [S] density (per px²) of integer ``points`` [N, 2] at integer ``sample`` [S, 2].

    Points are bucketed into square blocks of R + 1 px from ``low`` (default: the points'
    minimum; one sort); as |offset| <= R, a sample only meets the points of its own and
    the 8 neighbouring blocks, summed block by block in point order.
    O(N log N + S·K), K the spots in 9 blocks.
    """
    radius = (len(kernel) - 1) // 2
    block = radius + 1
    low = points.min(axis=0) if low is None else np.asarray(low, np.float64)
    p_block = ((points - low) // block).astype(np.int64) + 1  # +1: neighbours stay >= 0
    n_cols = int(p_block[:, 1].max()) + 2
    key = p_block[:, 0] * n_cols + p_block[:, 1]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    s_block = ((sample - low) // block).astype(np.int64) + 1
    shifts = (np.arange(-1, 2)[:, None] * n_cols + np.arange(-1, 2)[None, :]).ravel()
    all_keys = (s_block[:, 0] * n_cols + s_block[:, 1])[:, None] + shifts
    pairs = (np.searchsorted(sorted_key, all_keys, side="right")
             - np.searchsorted(sorted_key, all_keys, side="left")).sum(axis=1)
    out = np.empty(len(sample))
    start = 0
    while start < len(sample):
        cum = np.cumsum(pairs[start: start + SCALE_CHUNK])
        step = max(1, int(np.searchsorted(cum, PAIR_BUDGET, side="right")))
        part = sample[start: start + step]
        keys = all_keys[start: start + step]
        first = np.searchsorted(sorted_key, keys.ravel(), side="left")
        length = np.searchsorted(sorted_key, keys.ravel(), side="right") - first
        owner = np.repeat(np.repeat(np.arange(len(part)), len(shifts)), length)
        within = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        offset = (points[order[np.repeat(first, length) + within]] - part[owner]).astype(np.int64)
        near = (np.abs(offset) <= radius).all(axis=1)
        offset = offset[near] + radius
        value = kernel[offset[:, 0]] * kernel[offset[:, 1]]
        out[start: start + len(part)] = np.bincount(owner[near], weights=value,
                                                    minlength=len(part))
        start += step
    return out


def slide_density_scale(rows_px: np.ndarray, cols_px: np.ndarray, *, pixel_size_um: float,
                        sigma_um: float = DEFAULT_SIGMA_UM, max_spots: int = MAX_SCALE_SPOTS,
                        seed: int = 0) -> float:
    """One density scale per slide (transcripts per µm²), from its whole spot table.

    The median, over a seeded random subsample of at most ``max_spots`` spots, of the
    density (as :func:`density_map` computes it) at each sampled spot's pixel: a robust
    typical in-tissue density, since spots sit where transcripts are. Exact for the
    sampled spots. Returns 1.0 (with a warning) for a slide without spots.
    """
    sigma_px = sigma_in_px(sigma_um, pixel_size_um)
    pixel_size_um = check_pixel_size(pixel_size_um, "pixel_size_um")
    rows = np.asarray(rows_px, dtype=np.float64)
    cols = np.asarray(cols_px, dtype=np.float64)
    ok = np.isfinite(rows) & np.isfinite(cols)
    points = np.column_stack([np.floor(rows[ok]), np.floor(cols[ok])])
    if len(points) == 0:
        logger.warning("slide_density_scale: no transcripts; using a scale of 1.0")
        return 1.0
    rng = np.random.default_rng(seed)
    sample = points if len(points) <= max_spots else points[
        rng.choice(len(points), size=max_spots, replace=False)]
    per_px2 = _density_at(points, sample, gaussian_kernel_1d(sigma_px))
    scale = float(np.median(per_px2)) / pixel_size_um**2
    logger.info("slide density scale: %.4g transcripts/µm² (median over %d of %d spots, "
                "σ = %.3g µm)", scale, len(sample), len(points), sigma_um)
    return scale


def slide_density_scale_stream(batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                               *, pixel_size_um: float, sigma_um: float = DEFAULT_SIGMA_UM,
                               max_spots: int = MAX_SCALE_SPOTS, seed: int = 0) -> float:
    """:func:`slide_density_scale` of a spot table too large for memory, same value.

    ``batches()`` starts a pass over the spots in file order, yielding (rows_px, cols_px)
    arrays; three passes: count and extent, the seeded sample, then only the points in the
    sampled spots' 3×3 blocks of R + 1 px (all that :func:`_density_at` sums for them, in
    the same order). Memory: the sample and those points.
    """
    sigma_px = sigma_in_px(sigma_um, pixel_size_um)
    pixel_size_um = check_pixel_size(pixel_size_um, "pixel_size_um")
    kernel = gaussian_kernel_1d(sigma_px)
    block = (len(kernel) - 1) // 2 + 1

    def points() -> Iterator[np.ndarray]:
        for rows_px, cols_px in batches():
            rows = np.asarray(rows_px, dtype=np.float64)
            cols = np.asarray(cols_px, dtype=np.float64)
            ok = np.isfinite(rows) & np.isfinite(cols)
            yield np.column_stack([np.floor(rows[ok]), np.floor(cols[ok])])

    n, low, high = 0, np.full(2, np.inf), np.full(2, -np.inf)
    for part in points():
        if len(part):
            n += len(part)
            low, high = np.minimum(low, part.min(axis=0)), np.maximum(high, part.max(axis=0))
    if n == 0:
        logger.warning("slide_density_scale: no transcripts; using a scale of 1.0")
        return 1.0
    rng = np.random.default_rng(seed)
    chosen = np.arange(n) if n <= max_spots else rng.choice(n, size=max_spots, replace=False)
    order = np.argsort(chosen, kind="stable")
    wanted, sample, seen = chosen[order], np.empty((len(chosen), 2)), 0
    for part in points():
        lo, hi = np.searchsorted(wanted, [seen, seen + len(part)])
        sample[order[lo:hi]] = part[wanted[lo:hi] - seen]
        seen += len(part)
    grid_shape = tuple(((high - low) // block).astype(np.int64) + 3)
    s_block = ((sample - low) // block).astype(np.int64) + 1
    by_row = np.argsort(s_block[:, 0], kind="stable")
    marked = np.zeros(grid_shape, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            marked[s_block[:, 0] + dr, s_block[:, 1] + dc] = True
    expected = n * marked.mean()  # near points if spots were spread evenly
    per_px2 = np.empty(len(sample))
    for group in np.array_split(by_row, max(1, math.ceil(expected / NEAR_BUDGET))):
        marked[:] = False  # the 3x3 blocks of this row band of samples
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                marked[s_block[group, 0] + dr, s_block[group, 1] + dc] = True
        near = []
        for part in points():
            p_block = ((part - low) // block).astype(np.int64) + 1
            near.append(part[marked[p_block[:, 0], p_block[:, 1]]].astype(np.int32))
        per_px2[group] = _density_at(np.concatenate(near), sample[group], kernel, low=low)
    scale = float(np.median(per_px2)) / pixel_size_um**2
    logger.info("slide density scale: %.4g transcripts/µm² (median over %d of %d spots, "
                "σ = %.3g µm, streamed)", scale, len(sample), n, sigma_um)
    return scale


def density_channel(rows_px: np.ndarray, cols_px: np.ndarray, shape: tuple[int, int], *,
                    sigma_um: float, pixel_size_um: float, slide_scale: float,
                    origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """float32 [H, W]: density in transcripts per µm² divided by ``slide_scale`` (µm⁻²)."""
    sigma_px = sigma_in_px(sigma_um, pixel_size_um)
    factor = 1.0 / (pixel_size_um**2 * _check_scale(slide_scale))
    ones = np.ones((np.asarray(rows_px).size, 1))
    out = _kernel_sums(rows_px, cols_px, shape, sigma_px, origin, ones)[0] * factor
    return out.astype(np.float32)


def gene_channels(rows_px: np.ndarray, cols_px: np.ndarray, gene_codes: np.ndarray,
                  shape: tuple[int, int], embedding: GeneEmbedding, *, sigma_um: float,
                  pixel_size_um: float, slide_scale: float, origin: tuple[int, int] = (0, 0),
                  n_channels: int | None = None) -> np.ndarray:
    """float32 [k, H, W]: kernels weighted by each spot's gene vector, / slide_scale.

    ``gene_codes``: int [N] codes from ``embedding.encode`` (-1 = unknown gene, weight 0).
    ``n_channels``: the first k components (default all). Units as :func:`density_channel`.
    """
    k = embedding.n_components if n_channels is None else int(n_channels)
    if not 0 <= k <= embedding.n_components:
        raise InputError(f"n_gene_channels={k} but the gene embedding has "
                         f"{embedding.n_components} components")
    sigma_px = sigma_in_px(sigma_um, pixel_size_um)
    factor = 1.0 / (pixel_size_um**2 * _check_scale(slide_scale))
    vectors = embedding.vectors_for_codes(np.asarray(gene_codes).ravel())[:, :k]
    out = _kernel_sums(rows_px, cols_px, shape, sigma_px, origin, vectors) * factor
    return out.astype(np.float32)


@dataclass(frozen=True)
class TranscriptInput:
    """How spots become network input channels (stored with the model).

    ``mode``: "density" (per-slide scaled kernel density, σ = ``sigma_um``) or "heatmap"
    (upstream's max of truncated Gaussians, σ = ``heatmap_sigma_px`` px, values in [0, 1]).
    ``n_gene_channels``: gene-embedding channels after channel 0 (0 = none); they use the
    density kernel (``sigma_um``) and the slide scale in either mode.
    """

    mode: str = "density"
    sigma_um: float = DEFAULT_SIGMA_UM
    n_gene_channels: int = 0
    heatmap_sigma_px: float = HEATMAP_SIGMA_PX

    def __post_init__(self) -> None:
        if self.mode not in TRANSCRIPT_MODES:
            raise InputError(f"transcript mode must be one of {TRANSCRIPT_MODES}, "
                             f"got {self.mode!r}")
        check_sigma(self.sigma_um, "sigma_um")
        check_sigma(self.heatmap_sigma_px, "heatmap_sigma_px")
        if int(self.n_gene_channels) != self.n_gene_channels or self.n_gene_channels < 0:
            raise InputError(f"n_gene_channels must be an integer >= 0, "
                             f"got {self.n_gene_channels!r}")

    @property
    def n_channels(self) -> int:
        return 1 + int(self.n_gene_channels)

    @property
    def needs_slide_scale(self) -> bool:
        """True when a pixel size and a slide scale are required to render."""
        return self.mode == "density" or self.n_gene_channels > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TranscriptInput:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"transcript input: unknown keys {sorted(unknown)}")
        return cls(**data)


def _heatmap(rows_px: np.ndarray, cols_px: np.ndarray, shape: tuple[int, int],
             sigma_px: float, origin: tuple[int, int]) -> np.ndarray:
    """Upstream's max-of-Gaussians heatmap [H, W] in [0, 1]; spots snapped by floor."""
    rows = np.asarray(rows_px, dtype=np.float64)
    cols = np.asarray(cols_px, dtype=np.float64)
    ok = np.isfinite(rows) & np.isfinite(cols)
    return render_heatmap(np.floor(rows[ok]).astype(np.int64),
                          np.floor(cols[ok]).astype(np.int64), shape, sigma=sigma_px,
                          origin=origin)


def transcript_channels(rows_px: np.ndarray, cols_px: np.ndarray,
                        gene_codes: np.ndarray | None, shape: tuple[int, int],
                        cfg: TranscriptInput, *, pixel_size_um: float | None = None,
                        slide_scale: float | None = None,
                        embedding: GeneEmbedding | None = None,
                        origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The network's transcript input: float32 [C, H, W], C = ``cfg.n_channels``.

    Channel 0 is the density (or upstream heatmap), channels 1.. the gene channels.
    Positions are px in the frame of ``origin``; ``gene_codes`` as in :func:`gene_channels`
    (only needed when ``cfg.n_gene_channels`` > 0).
    """
    height, width = int(shape[0]), int(shape[1])
    out = np.empty((cfg.n_channels, height, width), dtype=np.float32)
    if cfg.mode == "heatmap":
        out[0] = _heatmap(rows_px, cols_px, (height, width), cfg.heatmap_sigma_px, origin)
    else:
        out[0] = density_channel(rows_px, cols_px, (height, width), sigma_um=cfg.sigma_um,
                                 pixel_size_um=pixel_size_um, slide_scale=slide_scale,
                                 origin=origin)
    if cfg.n_gene_channels > 0:
        if embedding is None or gene_codes is None:
            raise InputError(f"n_gene_channels={cfg.n_gene_channels} needs a gene embedding "
                             "and gene codes")
        out[1:] = gene_channels(rows_px, cols_px, gene_codes, (height, width), embedding,
                                sigma_um=cfg.sigma_um, pixel_size_um=pixel_size_um,
                                slide_scale=slide_scale, origin=origin,
                                n_channels=cfg.n_gene_channels)
    return out


def saturation_stats(channel: np.ndarray, tissue_mask: np.ndarray | None = None, *,
                     reference: float | None = None) -> dict[str, float]:
    """How saturated a transcript channel [H, W] is.

    ``mean``; ``reference``: the representation's maximum if given (1.0 for the heatmap),
    else the map's 99.9th percentile; ``fraction_high``: fraction of pixels >=
    HIGH_FRACTION × reference; ``cv``: std / mean. With ``tissue_mask`` (e.g. true cells):
    ``mean_inside``, ``mean_outside`` and their ratio ``contrast``.
    """
    values = np.asarray(channel, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"saturation_stats expects an [H, W] map, got shape {values.shape}")
    mean = float(values.mean())
    ref = float(np.percentile(values, 99.9)) if reference is None else float(reference)
    stats = {"mean": mean, "reference": ref,
             "fraction_high": float(np.mean(values >= HIGH_FRACTION * ref)) if ref > 0 else 0.0,
             "cv": float(values.std() / mean) if mean > 0 else 0.0}
    if tissue_mask is not None:
        mask = np.asarray(tissue_mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"tissue mask shape {mask.shape} != channel shape {values.shape}")
        inside = float(values[mask].mean()) if mask.any() else float("nan")
        outside = float(values[~mask].mean()) if (~mask).any() else float("nan")
        stats.update(mean_inside=inside, mean_outside=outside,
                     contrast=inside / outside if outside > 0 else float("inf"))
    return stats


def write_transcript_channels(path: str | Path, array: np.ndarray) -> Path:
    """Write a [C, H, W] array as a float32 TIFF, atomically. Returns the path."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"transcript channels must be [C, H, W], got shape {array.shape}",
                         path)
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array.astype(np.float32, copy=False), photometric="minisblack",
                         metadata={"axes": "CYX"})
    return path


def read_transcript_channels(path: str | Path) -> np.ndarray:
    """Read a float32 [C, H, W] TIFF written by :func:`write_transcript_channels`."""
    try:
        array = tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise InputError(f"cannot read transcript channels ({exc})", path) from exc
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"expected [C, H, W] channels, got shape {array.shape}", path)
    return array
