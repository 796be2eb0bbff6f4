"""Constants of the transcript-guided growth (:mod:`GeneSegNet.growth.grow`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GrowParams:
    """Constants of the transcript-guided growth (lengths in µm, areas in µm²)."""

    max_growth_um: float = 5.0  # farthest a cell grows beyond its input label
    growth_scale_um: float | None = None  # distance prior width; None: max_growth_um / 2
    density_kernel_count: float = 8.0  # expected transcripts under the density kernel
    density_sigma_min_um: float = 1.0
    density_sigma_max_um: float = 4.0
    background_quantile: float = 0.05  # of the density far from any label
    background_margin_um: float = 3.0  # "far" = beyond max_growth_um + this margin
    min_background_fraction: float = 0.05  # of the image, else the whole image is used
    foreground_fraction: float = 0.5  # threshold between background and cell level
    profile_pseudocount: float = 10.0  # transcripts of global profile added to each cell
    other_penalty: float = 1.0  # log-odds a spot needs to join a cell rather than none
    n_neighbours: int = 4  # candidate cells per spot
    n_iterations: int = 2  # assignment rounds (profiles re-estimated from grown cells)
    max_hole_area_um2: float = 10.0  # enclosed background holes up to this are filled
    new_cell_min_area_um2: float = 30.0
    new_cell_min_transcripts: int = 5
    new_cell_diameter_um: float | None = None  # None: from the grown cells' median area
    merge_overlap_fraction: float = 0.2  # below this a previous cell counts as missed
    # A missed previous cell is rejected by the transcripts only if its count is at the
    # background level AND improbably low for a cell of its area (Poisson lower tail at
    # the in-cell density below this): a small cell holding no transcript at ISS density
    # is no evidence against it.
    drop_max_p: float = 0.01
    # Trim the input cells to the transcript foreground before growing (for labels that
    # are already whole cells, e.g. a model's predictions): each cell keeps its core (the
    # pixels more than max_growth_um inside its boundary) and, connected to it, its
    # foreground pixels; a cell without such a core is kept whole. So growth does not
    # compound over rounds, and no cell vanishes.
    trim_to_foreground: bool = False
    # Borders between touching cells: "transcripts" places them by the cells' assigned
    # transcripts (gene profile and distance); "distance" by distance alone (nearest cell,
    # as a plain expansion does), for data too sparse to place a border; "auto" takes
    # "distance" when a typical cell holds fewer than min_transcripts_per_cell.
    border_mode: str = "auto"
    min_transcripts_per_cell: float = 40.0
    # Where borders go by distance, whole cells with an image are redrawn from their
    # nuclei (:mod:`GeneSegNet.growth.nuclear`); the image is smoothed this much first.
    nucleus_smooth_um: float = 0.3

    @property
    def distance_scale_um(self) -> float:
        """Width of the distance prior in µm (``growth_scale_um`` or max_growth_um / 2)."""
        return self.max_growth_um / 2 if self.growth_scale_um is None else self.growth_scale_um

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain dict of every constant (for the run manifest)."""
        return asdict(self)


BORDER_MODES = ("auto", "transcripts", "distance")
