"""Transcript-guided growth of pseudo-labels between recursive training rounds.

Starting labels are nuclei, but a cell is about twice its nucleus' diameter; its
cytoplasm shows only through its transcripts. ``grow_labels`` lets every cell claim
the territory its transcripts support:

1. Density: spot counts per pixel smoothed by a Gaussian whose width adapts to the
   density (about ``density_kernel_count`` transcripts under the kernel), in
   transcripts/µm². The cell level is the median density on the input labels, the
   background level a low quantile of the density far from any label (or of the
   whole image when there is no such area); the foreground is the density above
   ``background + foreground_fraction * (cell - background)``.
2. Assignment: each spot outside the labels goes to the candidate cell (its
   ``n_neighbours`` nearest cells within ``max_growth_um`` of their label) that
   maximises ``log p_cell(gene) - 0.5 * (distance / distance_scale_um)**2``, or stays
   unclaimed when ``log p_all(gene) - other_penalty`` is higher. ``p_cell`` is the
   gene profile of the transcripts inside the cell (smoothed toward the global
   profile by ``profile_pseudocount``); a second iteration re-estimates it from the
   grown cells.
3. Pixels: a seeded watershed from the labels and the assigned spots (unclaimed
   spots seed a blocking region) over the foreground within ``max_growth_um`` of a
   label; a cell keeps only the grown pieces connected to its input pixels, so it
   never shrinks or vanishes.
4. New cells: the unclaimed foreground, cut into cell-sized pieces by a
   distance-transform watershed, becomes new cells where a piece has at least
   ``new_cell_min_area_um2`` and ``new_cell_min_transcripts``.

``merge_with_previous`` builds the next round's labels from the model's prediction
and the previous labels; ``label_stats`` summarises labels for the run manifest.
Coordinates: spots at continuous (row, col) pixels; a spot's pixel is
``(floor(row), floor(col))``; spots outside the image are ignored.
"""


from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max
from skimage.measure import label as connected_components
from skimage.segmentation import watershed

from GeneSegNet.errors import InputError
from GeneSegNet.growth.density import (
    border_by_distance,
    check_labels,
    estimate_levels,
    pooled_growth_um,
    spot_counts,
    spot_pixels_in,
)
from GeneSegNet.growth.nuclear import regrow_from_nuclei
from GeneSegNet.growth.params import GrowParams

logger = logging.getLogger(__name__)


def _log_profiles(cell_of_spot: np.ndarray, genes: np.ndarray, n_ids: int, n_genes: int,
                  pseudocount: float) -> np.ndarray:
    """(n_ids, n_genes) log gene probabilities; row 0 = global profile of all spots."""
    overall = np.bincount(genes, minlength=n_genes).astype(np.float64) + 0.5
    overall /= overall.sum()
    table = np.zeros((n_ids, n_genes))
    np.add.at(table, (cell_of_spot, genes), 1.0)
    table[1:] += pseudocount * overall
    table[1:] /= table[1:].sum(axis=1, keepdims=True)
    table[0] = overall
    return np.log(table)


def _cell_geometry(labels: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_ids, 2) centroids (row, col) px and (n_ids,) equivalent radii px; NaN if absent."""
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n_ids).astype(np.float64)
    rr, cc = np.indices(labels.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre_r = np.bincount(flat, rr.ravel(), minlength=n_ids) / area
        centre_c = np.bincount(flat, cc.ravel(), minlength=n_ids) / area
    radius = np.sqrt(area / np.pi)
    return np.stack([centre_r, centre_c], axis=1), radius


def _colour_cells(labels: np.ndarray, reach_px: float) -> tuple[np.ndarray, int]:
    """Colour classes (n_ids,) int (0 for absent ids) such that two cells whose reach
    zones (label + ``reach_px``) may touch never share a colour; and the colour count."""
    n_ids = int(labels.max()) + 1
    centres, radius = _cell_geometry(labels, n_ids)
    present = np.flatnonzero((np.arange(n_ids) > 0) & (radius > 0))
    colour = np.zeros(n_ids, dtype=np.int64)
    if present.size == 0:
        return colour, 0
    # a label fits in a disc around its centroid of radius <= its half extent; use the
    # bounding-box half diagonal as a safe bound
    slices = ndimage.find_objects(labels)
    extent = np.zeros(n_ids)
    for i in present:
        s = slices[i - 1]
        span_r, span_c = s[0].stop - s[0].start, s[1].stop - s[1].start
        extent[i] = np.hypot(span_r, span_c)
    tree = cKDTree(centres[present])
    limit = 2 * extent[present].max() + 2 * reach_px + 2
    pairs = tree.query_pairs(limit, output_type="ndarray")
    a, b = present[pairs[:, 0]], present[pairs[:, 1]]
    gap = np.hypot(*(centres[a] - centres[b]).T)
    close = gap <= extent[a] + extent[b] + 2 * reach_px + 2
    a, b = a[close], b[close]
    neighbours: list[list[int]] = [[] for _ in range(n_ids)]
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        neighbours[i].append(j)
        neighbours[j].append(i)
    order = sorted(present.tolist(), key=lambda i: -len(neighbours[i]))
    for i in order:
        used = {int(colour[j]) for j in neighbours[i]}
        c = 1
        while c in used:
            c += 1
        colour[i] = c
    return colour, int(colour.max())


def _territories(labels: np.ndarray, colour: np.ndarray, n_colours: int, reach_px: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per colour class: (K, H, W) int32 id of the class' cell within reach (0 = none)
    and (K, H, W) float32 distance px to that cell's label."""
    ids = np.zeros((n_colours,) + labels.shape, dtype=np.int32)
    dist = np.zeros((n_colours,) + labels.shape, dtype=np.float32)
    for k in range(n_colours):
        own = colour[labels] == k + 1
        d, (near_r, near_c) = ndimage.distance_transform_edt(~own, return_indices=True)
        reach = d <= reach_px
        ids[k] = np.where(reach, labels[near_r, near_c], 0)
        dist[k] = d
    return ids, dist


def _assign(labels: np.ndarray, spot_ids: np.ndarray, spot_dist_um: np.ndarray,
            rows: np.ndarray, cols: np.ndarray, genes: np.ndarray, log_p: np.ndarray,
            params: GrowParams) -> np.ndarray:
    """Cell id of each spot (0 = unclaimed); spots inside a label keep that label.

    ``spot_ids``/``spot_dist_um``: (N, K) candidate cell (0 = none) and its distance
    in µm, one per colour class."""
    out = labels[rows, cols].copy()
    todo = np.flatnonzero(out == 0)
    if todo.size == 0 or spot_ids.shape[1] == 0:
        return out
    cand, gap_um = spot_ids[todo], spot_dist_um[todo]
    g = genes[todo]
    score = log_p[cand, g[:, None]] - 0.5 * (gap_um / params.distance_scale_um) ** 2
    score = np.where(cand > 0, score, -np.inf)
    best = np.argmax(score, axis=1)
    pick = np.arange(todo.size)
    other = log_p[0, g] - params.other_penalty
    out[todo] = np.where(score[pick, best] > other, cand[pick, best], 0)
    return out


def _keep_connected(grown: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Drop the grown pieces of a cell that do not touch its input pixels."""
    pieces = connected_components(grown, background=0, connectivity=1)
    keep = np.zeros(int(pieces.max()) + 1, dtype=bool)
    keep[np.unique(pieces[labels > 0])] = True
    keep[0] = False
    return np.where(keep[pieces], grown, 0)


def trim_to_foreground(labels: np.ndarray, foreground: np.ndarray, core_depth_px: float
                       ) -> np.ndarray:
    """Cells (H, W) cut back to their core plus the connected foreground pixels.

    The core of a cell is its pixels farther than ``core_depth_px`` from any pixel of
    another id (background included); a cell without core pixels is returned whole.
    """
    boundary = np.zeros(labels.shape, dtype=bool)
    boundary[:-1] |= labels[:-1] != labels[1:]
    boundary[1:] |= labels[1:] != labels[:-1]
    boundary[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    depth = ndimage.distance_transform_edt(~boundary)
    core = (labels > 0) & (depth > core_depth_px)
    has_core = np.zeros(int(labels.max()) + 1, dtype=bool)
    has_core[labels[core]] = True
    keep_whole = ~has_core[labels] & (labels > 0)
    anchor = np.where(core | keep_whole, labels, 0)
    trimmed = np.where(foreground | core | keep_whole, labels, 0)
    return _keep_connected(trimmed, anchor)


def _fill_small_holes(grown: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill enclosed background holes up to ``max_area_px`` with the nearest cell."""
    holes = ndimage.binary_fill_holes(grown > 0) & (grown == 0)
    if not holes.any():
        return grown
    hole_ids, n_holes = ndimage.label(holes)
    sizes = np.bincount(hole_ids.ravel(), minlength=n_holes + 1)
    small = (sizes <= max_area_px)
    small[0] = False
    fill = small[hole_ids]
    if not fill.any():
        return grown
    _, (near_r, near_c) = ndimage.distance_transform_edt(grown == 0, return_indices=True)
    out = grown.copy()
    out[fill] = grown[near_r[fill], near_c[fill]]
    return out


def _grow_once(labels: np.ndarray, territory: np.ndarray, dist_um: np.ndarray,
               colour: np.ndarray, foreground: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               cell_of_spot: np.ndarray, sigma_px: float, params: GrowParams,
               pixel_size_um: float, distance_only: bool = False) -> np.ndarray:
    """Label the foreground pixels within reach; (H, W) int64.

    Among the cells that reach a pixel, the one with the highest smoothed density of its
    assigned spots times the distance prior ``exp(-0.5 * (d / distance_scale_um)**2)``
    wins; it takes the pixel if its (unweighted) density beats that of the unclaimed
    spots."""
    shape = labels.shape
    if distance_only:  # nearest cell within reach, inside the foreground
        grown = np.zeros(shape, dtype=np.int64)
        best = np.full(shape, np.inf)
        for k in range(territory.shape[0]):
            win = (territory[k] > 0) & (dist_um[k] < best)
            grown[win] = territory[k][win]
            best[win] = dist_um[k][win]
        grown[labels > 0] = labels[labels > 0]  # no foreground cut: too noisy this sparse
        grown = _keep_connected(grown, labels)
        grown = _fill_small_holes(grown, params.max_hole_area_um2 / pixel_size_um ** 2)
        grown[labels > 0] = labels[labels > 0]
        return grown
    unclaimed = spot_counts(rows[cell_of_spot == 0], cols[cell_of_spot == 0], shape)
    unclaimed = ndimage.gaussian_filter(unclaimed, sigma_px)
    best_score = np.zeros(shape)
    best_evidence = np.zeros(shape)
    grown = np.zeros(shape, dtype=np.int64)
    spot_colour = colour[cell_of_spot]
    for k in range(territory.shape[0]):
        mine = spot_colour == k + 1
        evidence = ndimage.gaussian_filter(spot_counts(rows[mine], cols[mine], shape), sigma_px)
        score = evidence * np.exp(-0.5 * (dist_um[k] / params.distance_scale_um) ** 2)
        win = (territory[k] > 0) & (score > best_score)
        grown[win] = territory[k][win]
        best_score[win] = score[win]
        best_evidence[win] = evidence[win]
    grown[~foreground | (best_evidence <= unclaimed)] = 0
    grown[labels > 0] = labels[labels > 0]
    grown = _keep_connected(grown, labels)
    grown = _fill_small_holes(grown, params.max_hole_area_um2 / pixel_size_um ** 2)
    grown[labels > 0] = labels[labels > 0]
    return grown


def _new_cells(grown: np.ndarray, foreground: np.ndarray, counts: np.ndarray,
               pixel_size_um: float, params: GrowParams) -> np.ndarray:
    """(H, W) int64 new cells (ids from 1) in the unclaimed foreground."""
    pixel_area = pixel_size_um ** 2
    free = foreground & (grown == 0)
    free = ndimage.binary_opening(free, structure=np.ones((3, 3), dtype=bool))
    regions, n = ndimage.label(free)
    if n == 0:
        return regions.astype(np.int64)
    if params.new_cell_diameter_um is not None:
        diameter_um = params.new_cell_diameter_um
    elif grown.max() > 0:
        areas = np.bincount(grown.ravel())[1:]
        diameter_um = 2 * np.sqrt(np.median(areas[areas > 0]) * pixel_area / np.pi)
    else:
        diameter_um = 4 * params.max_growth_um
    cell_area_px = np.pi * (diameter_um / 2) ** 2 / pixel_area
    sizes = np.bincount(regions.ravel(), minlength=n + 1)
    big = sizes > 1.5 * cell_area_px
    big[0] = False
    if big.any():
        region_big = np.where(big[regions], regions, 0)
        dist = ndimage.distance_transform_edt(region_big > 0)
        min_distance = max(1, int(round(0.35 * diameter_um / pixel_size_um)))
        peaks = peak_local_max(dist, min_distance=min_distance, labels=region_big,
                               exclude_border=False)
        seeds = np.zeros(regions.shape, dtype=np.int64)
        seeds[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1) + n
        pieces = watershed(-dist, seeds, mask=region_big > 0)
        regions = np.where(big[regions], pieces, regions)
    ids, dense = np.unique(regions, return_inverse=True)
    dense = dense.reshape(regions.shape)
    area_um2 = np.bincount(dense.ravel(), minlength=ids.size) * pixel_area
    n_spots = np.bincount(dense.ravel(), counts.ravel(), minlength=ids.size)
    ok = (area_um2 >= params.new_cell_min_area_um2) & \
        (n_spots >= params.new_cell_min_transcripts) & (ids > 0)
    new_id = np.zeros(ids.size, dtype=np.int64)
    new_id[ok] = np.arange(1, int(ok.sum()) + 1)
    return new_id[dense]


def grow_labels(labels: np.ndarray, rows_px: np.ndarray, cols_px: np.ndarray,
                gene_codes: np.ndarray, *, pixel_size_um: float,
                params: GrowParams | None = None) -> np.ndarray:
    """Grow every cell into the territory its transcripts support; add new cells.

    Parameters
    ----------
    labels : ndarray (H, W), integer
        Input cells (e.g. expanded nuclei), 0 = background.
    rows_px, cols_px : ndarray (N,), float
        Spot coordinates in pixels (row = y, col = x); pixel = (floor(row), floor(col)).
    gene_codes : ndarray (N,), integer
        Gene index of each spot (0..n_genes-1).
    pixel_size_um : float
        µm per pixel.

    Returns
    -------
    ndarray (H, W), int32
        Every input cell with its id and at least its input pixels (with
        ``params.trim_to_foreground``: at least its core, see :func:`trim_to_foreground`),
        plus new cells numbered after ``labels.max()``.
    """
    params = params or GrowParams()
    labels = check_labels(labels, "labels")
    if pixel_size_um <= 0:
        raise InputError(f"pixel_size_um must be positive, got {pixel_size_um}")
    genes_all = np.asarray(gene_codes)
    if genes_all.shape != np.shape(rows_px) or not np.issubdtype(genes_all.dtype, np.integer):
        raise InputError("gene_codes must be integer codes, one per spot")
    rows, cols, inside = spot_pixels_in(rows_px, cols_px, labels.shape)
    genes = genes_all[inside].astype(np.int64)
    if genes.size and genes.min() < 0:
        raise InputError("gene_codes must be >= 0")
    levels = estimate_levels(labels, rows_px, cols_px, pixel_size_um=pixel_size_um,
                             params=params)
    foreground = levels.density_per_um2 > levels.threshold_per_um2
    if params.trim_to_foreground:
        labels = trim_to_foreground(labels, foreground, params.max_growth_um / pixel_size_um)
    counts = spot_counts(rows, cols, labels.shape)
    n_ids = int(labels.max()) + 1
    n_genes = int(genes.max()) + 1 if genes.size else 1
    reach_px = params.max_growth_um / pixel_size_um
    distance_only = border_by_distance(levels.cell_per_um2, params)
    if distance_only:  # too sparse for per-cell borders: grow as far as the pooled profile
        reach_um = pooled_growth_um(labels, rows, cols, pixel_size_um, params)
        reach_px = reach_um / pixel_size_um
    colour, n_colours = _colour_cells(labels, reach_px)
    territory, dist_px = _territories(labels, colour, n_colours, reach_px)
    spot_ids = territory[:, rows, cols].T.astype(np.int64)  # (N, K)
    spot_dist_um = dist_px[:, rows, cols].T.astype(np.float64) * pixel_size_um
    dist_um = dist_px * np.float32(pixel_size_um)
    del dist_px
    sigma_px = levels.sigma_um / pixel_size_um
    grown = labels.copy()
    for _ in range(max(1, params.n_iterations) if n_colours else 0):
        log_p = _log_profiles(grown[rows, cols], genes, n_ids, n_genes,
                              params.profile_pseudocount)
        cell_of_spot = _assign(labels, spot_ids, spot_dist_um, rows, cols, genes, log_p,
                               params)
        grown = _grow_once(labels, territory, dist_um, colour, foreground, rows, cols, cell_of_spot,
                           sigma_px, params, pixel_size_um, distance_only=distance_only)
    new = _new_cells(grown, foreground, counts, pixel_size_um, params)
    out = np.where(new > 0, new + (n_ids - 1), grown)
    if logger.isEnabledFor(logging.DEBUG):  # np.unique sorts the whole image
        logger.debug("grow_labels: %d input cells, %d new cells; density /µm² cell %.3g, "
                     "background %.3g; borders by %s", len(np.unique(labels)) - 1,
                     int(new.max()), levels.cell_per_um2, levels.background_per_um2,
                     "distance" if distance_only else "transcripts")
    return out.astype(np.int32)


def regrow_whole_cells(labels: np.ndarray, rows_px: np.ndarray, cols_px: np.ndarray,
                       gene_codes: np.ndarray, *, pixel_size_um: float,
                       params: GrowParams | None = None,
                       image: np.ndarray | None = None) -> np.ndarray:
    """Labels that are whole cells already (a model's cells) brought to their transcripts.

    Where the transcripts can place borders (:func:`border_by_distance` is False), each
    cell is trimmed to its transcript territory and grown again (:func:`grow_labels` with
    ``trim_to_foreground``), so a model's slight over- or under-reach does not compound
    over rounds. Where they are too sparse, borders can only go by distance: with the
    nuclear stain ``image`` ((H, W) or (H, W, C) on the labels' grid) each cell is redrawn
    as its nucleus grown by the pooled transcript reach
    (:func:`GeneSegNet.growth.nuclear.regrow_from_nuclei`); without it the labels are
    returned unchanged. Returns int32 (H, W).
    """
    params = params or GrowParams()
    labels = check_labels(labels, "labels")
    levels = estimate_levels(labels, rows_px, cols_px, pixel_size_um=pixel_size_um,
                             params=params)
    if border_by_distance(levels.cell_per_um2, params):
        if image is not None:
            return regrow_from_nuclei(labels, image, rows_px, cols_px,
                                      pixel_size_um=pixel_size_um, params=params)
        logger.debug("regrow_whole_cells: %.3g transcripts/µm² in cells, too sparse to "
                     "place borders, and no image; cells kept as they are",
                     levels.cell_per_um2)
        return labels.astype(np.int32)
    return grow_labels(labels, rows_px, cols_px, gene_codes, pixel_size_um=pixel_size_um,
                       params=replace(params, trim_to_foreground=True))
