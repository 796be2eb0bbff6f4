"""A low-dimensional gene embedding learnt from transcript co-location.

Transcripts are binned into square bins of about one cell (``bin_um``); the bins × genes
count matrix is normalised (each bin scaled to the median bin total, then ``log1p``),
centred per gene, and its top principal axes (eigenvectors of the genes × genes
covariance) give each gene a k-vector. Genes that are expressed together (one cell type)
get similar vectors, so spots weighted by their gene's vector show cell-type changes.

Conventions that make the result deterministic and comparable between components:

- each component is scaled so that its transcript-weighted root mean square over all
  training transcripts is 1 (a typical spot weighs about ±1, like in the density channel);
- its sign is chosen so that the loading of largest magnitude is positive (ties: the
  first gene in sorted name order);
- genes are stored sorted by name; unknown genes map to code -1 and a zero vector.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import linalg, sparse

from GeneSegNet.errors import InputError
from GeneSegNet.io.metadata import check_pixel_size

logger = logging.getLogger(__name__)

DEFAULT_BIN_UM = 10.0  # about one cell diameter
MIN_BIN_TRANSCRIPTS = 2  # bins with fewer transcripts carry no co-expression information


@dataclass(frozen=True)
class GeneEmbedding:
    """Gene name -> k-vector (dimensionless; transcript-weighted RMS 1 per component).

    ``genes``: sorted gene names, G of them; ``vectors``: float64 [G, k].
    """

    genes: tuple[str, ...]
    vectors: np.ndarray
    bin_um: float = DEFAULT_BIN_UM

    def __post_init__(self) -> None:
        vectors = np.asarray(self.vectors, dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[0] != len(self.genes):
            raise InputError(f"gene embedding: vectors of shape {vectors.shape} do not match "
                             f"{len(self.genes)} genes")
        if len(set(self.genes)) != len(self.genes):
            raise InputError("gene embedding: duplicate gene names")
        object.__setattr__(self, "vectors", vectors)

    @property
    def n_components(self) -> int:
        return int(self.vectors.shape[1])

    def encode(self, gene_names: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
        """Integer code of each gene name (index into ``genes``), -1 for unknown genes."""
        lookup = pd.Index(self.genes)
        return lookup.get_indexer(pd.Index(np.asarray(gene_names, dtype=object).astype(str)))

    def vectors_for_codes(self, codes: np.ndarray) -> np.ndarray:
        """float64 [N, k] vectors of integer codes; code -1 (unknown gene) gives zeros."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < -1 or codes.max() >= len(self.genes)):
            raise InputError(f"gene codes must lie in [-1, {len(self.genes)}), got "
                             f"[{codes.min()}, {codes.max()}]")
        padded = np.vstack([self.vectors, np.zeros((1, self.n_components))])
        return padded[np.where(codes < 0, len(self.genes), codes)]

    def to_dict(self) -> dict:
        """JSON-friendly form: {"bin_um": float, "genes": {name: [k floats]}}."""
        return {"bin_um": float(self.bin_um),
                "genes": {g: [float(v) for v in row]
                          for g, row in zip(self.genes, self.vectors, strict=True)}}

    @classmethod
    def from_dict(cls, data: dict) -> GeneEmbedding:
        try:
            items = sorted(data["genes"].items())
            bin_um = float(data.get("bin_um", DEFAULT_BIN_UM))
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise InputError(f"gene embedding: malformed dictionary ({exc})") from exc
        genes = tuple(str(g) for g, _ in items)
        width = len(items[0][1]) if items else 0
        vectors = np.array([v for _, v in items], dtype=np.float64).reshape(len(items), width)
        return cls(genes=genes, vectors=vectors, bin_um=bin_um)


def _bin_table(table: pd.DataFrame, pixel_size_um: float, bin_um: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(bin key int64 [N], gene name object [N]) for one table with x/y in pixels."""
    x_um = table["x"].to_numpy(dtype=np.float64) * pixel_size_um
    y_um = table["y"].to_numpy(dtype=np.float64) * pixel_size_um
    finite = np.isfinite(x_um) & np.isfinite(y_um)
    bx = np.floor(x_um[finite] / bin_um).astype(np.int64)
    by = np.floor(y_um[finite] / bin_um).astype(np.int64)
    if bx.size:
        bx -= bx.min()
        by -= by.min()
    key = by * (int(bx.max()) + 1 if bx.size else 1) + bx
    return key, table["gene"].to_numpy()[finite].astype(str)


def _count_matrix(tables: Iterable[pd.DataFrame], pixel_size_um: float, bin_um: float
                  ) -> tuple[sparse.csr_matrix, tuple[str, ...]]:
    """Sparse bins × genes counts over all tables (bins never shared between tables)."""
    keys, names, offset = [], [], 0
    for table in tables:
        key, gene = _bin_table(table, pixel_size_um, bin_um)
        if key.size:
            _, dense_key = np.unique(key, return_inverse=True)
            keys.append(dense_key + offset)
            offset += int(dense_key.max()) + 1
            names.append(gene)
    if not keys:
        raise InputError("gene embedding: no transcripts with finite coordinates")
    all_names = np.concatenate(names)
    genes, gene_code = np.unique(all_names, return_inverse=True)
    key = np.concatenate(keys)
    counts = sparse.csr_matrix((np.ones(key.size), (key, gene_code)),
                               shape=(offset, len(genes)))
    counts.sum_duplicates()
    return counts, tuple(str(g) for g in genes)


def _normalise(counts: sparse.csr_matrix) -> sparse.csr_matrix:
    """log1p of counts scaled to the median bin total; bins below MIN_BIN_TRANSCRIPTS dropped."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    counts = counts[totals >= MIN_BIN_TRANSCRIPTS]
    totals = totals[totals >= MIN_BIN_TRANSCRIPTS]
    if counts.shape[0] < 2:
        raise InputError(f"gene embedding: fewer than 2 bins hold >= {MIN_BIN_TRANSCRIPTS} "
                         "transcripts; use a larger bin_um or more data")
    scaled = sparse.diags(np.median(totals) / totals) @ counts
    scaled = scaled.tocsr()
    scaled.data = np.log1p(scaled.data)
    return scaled


def _top_axes(matrix: sparse.csr_matrix, n_components: int) -> np.ndarray:
    """[G, k] eigenvectors of the gene covariance with the k largest eigenvalues."""
    n_bins, n_genes = matrix.shape
    mean = np.asarray(matrix.mean(axis=0)).ravel()
    gram = (matrix.T @ matrix).toarray()
    cov = (gram - n_bins * np.outer(mean, mean)) / (n_bins - 1)
    values, axes = linalg.eigh(cov, subset_by_index=(n_genes - n_components, n_genes - 1))
    order = np.argsort(values)[::-1]
    logger.debug("gene embedding eigenvalues %s", np.round(values[order], 4))
    return axes[:, order]


def learn_gene_embedding(tables: Iterable[pd.DataFrame], pixel_size_um: float,
                         n_components: int = 3, bin_um: float = DEFAULT_BIN_UM
                         ) -> GeneEmbedding:
    """Learn a k-dimensional gene embedding from spot tables (columns x, y in px, gene).

    ``pixel_size_um`` converts positions to µm; transcripts are binned in squares of
    ``bin_um`` µm. See the module docstring for the normalisation and the conventions.
    """
    pixel_size_um = check_pixel_size(pixel_size_um, "pixel_size_um")
    if not (np.isfinite(bin_um) and bin_um > 0):
        raise InputError(f"bin_um must be a finite number > 0 µm, got {bin_um!r}")
    counts, genes = _count_matrix(tables, pixel_size_um, bin_um)
    if not 1 <= n_components <= len(genes):
        raise InputError(f"n_components must be in [1, {len(genes)}] (the number of genes), "
                         f"got {n_components}")
    axes = _top_axes(_normalise(counts), n_components)
    frequency = np.asarray(counts.sum(axis=0)).ravel()
    frequency /= frequency.sum()
    rms = np.sqrt(frequency @ axes**2)
    axes = axes / np.where(rms > 0, rms, 1.0)
    strongest = np.argmax(np.abs(axes), axis=0)  # first maximum: sorted-name tie break
    axes = axes * np.where(axes[strongest, np.arange(n_components)] < 0, -1.0, 1.0)
    logger.info("gene embedding: %d genes, %d components, %d bins of %.3g µm",
                len(genes), n_components, counts.shape[0], bin_um)
    return GeneEmbedding(genes=genes, vectors=axes, bin_um=float(bin_um))
