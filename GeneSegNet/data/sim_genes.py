"""Gene panel, cell-type expression profiles and transcript placement of the simulator."""

from __future__ import annotations

import numpy as np
import pandas as pd

from GeneSegNet.data.sim_config import TissueConfig

SPOT_DECIMALS = 2  # spot coordinates are written with this many decimals (px)


def gene_names(cfg: TissueConfig) -> np.ndarray:
    """(n_genes,) names Gene00.. or Gene000.. (housekeeping first, then each type's markers)."""
    digits = max(2, len(str(cfg.n_genes - 1)))
    return np.array([f"Gene{g:0{digits}d}" for g in range(cfg.n_genes)])


def marker_genes(cfg: TissueConfig, cell_type: int) -> np.ndarray:
    """Gene indices of the markers of ``cell_type``."""
    start = cfg.n_housekeeping + cell_type * cfg.markers_per_type
    return np.arange(start, start + cfg.markers_per_type)


def gene_profiles(cfg: TissueConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_cell_types, n_genes) expression probabilities, each row summing to 1.

    A type draws ``marker_share`` of its transcripts from its own markers,
    ``housekeeping_share`` from the housekeeping genes shared by all types, and the rest
    from every other gene (other types' markers included, a weak leakage).
    """
    housekeeping = np.arange(cfg.n_housekeeping)
    hk_weights = rng.lognormal(0.0, 0.5, size=cfg.n_housekeeping)
    profiles = np.zeros((cfg.n_cell_types, cfg.n_genes))
    for t in range(cfg.n_cell_types):
        own = marker_genes(cfg, t)
        rest = np.setdiff1d(np.arange(cfg.n_genes), np.concatenate([housekeeping, own]))
        mark = rng.lognormal(0.0, 0.5, size=own.size)
        other = rng.lognormal(0.0, 0.5, size=rest.size)
        profiles[t, housekeeping] = cfg.housekeeping_share * hk_weights / hk_weights.sum()
        profiles[t, own] = cfg.marker_share * mark / mark.sum()
        profiles[t, rest] = (1 - cfg.marker_share - cfg.housekeeping_share) * other / other.sum()
    return profiles


def _inside(values: np.ndarray, size: int) -> np.ndarray:
    """Coordinates truncated to SPOT_DECIMALS, kept strictly inside [0, size)."""
    scale = 10 ** SPOT_DECIMALS  # an exact integer, so a value >= c never drops below c
    steps = np.clip(np.floor(values * scale), 0, size * scale - 1)
    return steps / scale


def place_transcripts(cfg: TissueConfig, cells: np.ndarray, types: np.ndarray,
                      profiles: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Transcripts with columns x, y (px, float, x = column), gene, cell_id (0 = background).

    Each cell gets Poisson(``transcripts_per_um2`` * its area in µm²) transcripts,
    uniform over its pixels, genes drawn from its type's profile; background transcripts
    (``noise_fraction`` of all) are uniform over the image with uniform genes. Every
    coordinate satisfies 0 <= x < W and 0 <= y < H.
    """
    height, width = cells.shape
    per_px = cfg.transcripts_per_um2 * cfg.pixel_size_um ** 2
    flat = cells.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(0, len(types) + 1))
    xs, ys, gs, ids = [], [], [], []
    for cell_id in range(1, len(types)):
        pixels = order[bounds[cell_id]: bounds[cell_id + 1]]
        if pixels.size == 0:
            continue
        count = rng.poisson(per_px * pixels.size)
        chosen = rng.choice(pixels, size=count)
        ys.append(chosen // width + rng.uniform(0, 1, count))
        xs.append(chosen % width + rng.uniform(0, 1, count))
        gs.append(rng.choice(cfg.n_genes, size=count, p=profiles[types[cell_id]]))
        ids.append(np.full(count, cell_id))
    n_cell_spots = int(sum(len(i) for i in ids))
    n_noise = int(round(n_cell_spots * cfg.noise_fraction / (1 - cfg.noise_fraction)))
    ys.append(rng.uniform(0, height, n_noise))
    xs.append(rng.uniform(0, width, n_noise))
    gs.append(rng.integers(0, cfg.n_genes, n_noise))
    ids.append(np.zeros(n_noise, dtype=np.int64))
    table = pd.DataFrame({
        "x": _inside(np.concatenate(xs), width),
        "y": _inside(np.concatenate(ys), height),
        "gene": gene_names(cfg)[np.concatenate(gs).astype(np.int64)],
        "cell_id": np.concatenate(ids).astype(np.int64),
    })
    return table.iloc[rng.permutation(len(table))].reset_index(drop=True)
