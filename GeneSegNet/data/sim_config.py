"""Parameters of the tissue simulator, in physical units, and its presets.

Lengths are in µm unless the name ends in ``_px``; the image size is in pixels and
``pixel_size_um`` (µm/px) converts between the two. Presets:

- ``demo``: small cells at 0.5 µm/px, no brightness field, 8-bit; quick to learn
  (the default, used by ``make demo`` and the tests);
- ``dense``: Xenium-like, 0.2125 µm/px, nuclei 7-10 µm, cells about twice the
  nucleus, ~1 transcript/µm², a 10x brightness field, 16-bit with shot/read noise;
- ``sparse``: ISS-like, same morphology at 0.325 µm/px, ~0.05 transcripts/µm² and
  fewer genes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from GeneSegNet.errors import InputError

PRESET_NAMES = ("demo", "dense", "sparse")


@dataclass(frozen=True)
class TissueConfig:
    """One simulated image: size in px, everything else in µm or physical rates."""

    height: int = 512  # px
    width: int = 512  # px
    pixel_size_um: float = 0.5  # µm per px
    platform: str = "simulated-demo"
    # morphology
    min_center_distance_um: float = 8.5  # between nucleus centres (dart throwing)
    nucleus_diameter_um: tuple[float, float] = (5.0, 7.5)  # major axis, uniform range
    nucleus_aspect: tuple[float, float] = (0.75, 1.0)  # minor / major axis
    cell_nucleus_ratio: tuple[float, float] = (1.7, 2.5)  # max cell radius / nucleus radius
    boundary_jitter: float = 0.25  # relative amplitude of the jagged cell radius
    jitter_scale_um: float = 2.0  # smoothness of the jagged boundary
    gap_fraction: float = 0.15  # approximate fraction of the image without tissue
    gap_scale_um: float = 15.0  # smoothness of the tissue-gap field
    # nuclei brightness and detection
    dim_fraction: float = 0.2
    bright_range: tuple[float, float] = (0.6, 1.0)  # intrinsic nucleus brightness
    dim_range: tuple[float, float] = (0.1, 0.25)
    detection_threshold: float = 0.35  # nuclei dimmer than this are missing in the labels
    label_expansion_um: float = 1.5  # starting labels = detected nuclei expanded by this
    # image formation
    brightness_field_ratio: float = 1.0  # max/min of the smooth multiplicative field
    field_scale_um: float = 60.0  # smoothness of the brightness field
    texture_strength: float = 0.06  # log-normal chromatin speckle amplitude
    speckle_scale_um: float = 0.5
    blur_sigma_um: float = 0.6  # Gaussian PSF sigma
    background: float = 0.06  # offset, fraction of full scale
    signal_gain: float = 0.85  # full-scale fraction of a brightness-1 nucleus at field max
    peak_photons: float = 0.0  # photons at full scale; 0 = no shot noise
    read_noise: float = 0.03  # Gaussian noise sigma, fraction of full scale
    bit_depth: int = 8  # 8 or 16
    # transcripts
    transcripts_per_um2: float = 0.32  # inside cells
    noise_fraction: float = 0.1  # of all transcripts, uniform over the image
    n_cell_types: int = 4
    n_genes: int = 24
    n_housekeeping: int = 4  # expressed by every type
    markers_per_type: int = 4  # distinct marker genes of each type
    marker_share: float = 0.6  # fraction of a cell's transcripts from its own markers
    housekeeping_share: float = 0.25

    def __post_init__(self) -> None:
        _validate(self)

    def um_to_px(self, length_um: float) -> float:
        """A length in µm as pixels."""
        return length_um / self.pixel_size_um


def _validate(cfg: TissueConfig) -> None:
    def bad(name: str, problem: str) -> InputError:
        return InputError(f"simulation option {name}: {problem}")

    if cfg.height < 16 or cfg.width < 16:
        raise bad("height/width", f"image must be at least 16 px, got {cfg.height}x{cfg.width}")
    for name in ("pixel_size_um", "min_center_distance_um", "transcripts_per_um2",
                 "blur_sigma_um", "speckle_scale_um", "jitter_scale_um", "gap_scale_um",
                 "field_scale_um"):
        if not getattr(cfg, name) > 0:
            raise bad(name, f"must be > 0, got {getattr(cfg, name)}")
    for name in ("nucleus_diameter_um", "nucleus_aspect", "cell_nucleus_ratio", "bright_range",
                 "dim_range"):
        low, high = getattr(cfg, name)
        if not 0 < low <= high:
            raise bad(name, f"needs 0 < low <= high, got {(low, high)}")
    for name in ("dim_fraction", "noise_fraction", "gap_fraction", "marker_share",
                 "housekeeping_share"):
        if not 0 <= getattr(cfg, name) < 1:
            raise bad(name, f"must lie in [0, 1), got {getattr(cfg, name)}")
    if cfg.label_expansion_um < 0:
        raise bad("label_expansion_um", f"must be >= 0, got {cfg.label_expansion_um}")
    if cfg.brightness_field_ratio < 1:
        raise bad("brightness_field_ratio", f"must be >= 1, got {cfg.brightness_field_ratio}")
    if cfg.bit_depth not in (8, 16):
        raise bad("bit_depth", f"must be 8 or 16, got {cfg.bit_depth}")
    if cfg.marker_share + cfg.housekeeping_share >= 1:
        raise bad("marker_share", "marker_share + housekeeping_share must be < 1")
    needed = cfg.n_housekeeping + cfg.n_cell_types * cfg.markers_per_type
    if cfg.n_cell_types < 1 or cfg.markers_per_type < 1 or cfg.n_genes <= needed:
        raise bad("n_genes", f"{cfg.n_genes} genes cannot hold {cfg.n_housekeeping} "
                  f"housekeeping and {cfg.n_cell_types} x {cfg.markers_per_type} marker genes "
                  "plus at least one other gene")


_DENSE_MORPHOLOGY = {
    "min_center_distance_um": 11.5,
    "nucleus_diameter_um": (7.0, 10.0),
    "nucleus_aspect": (0.7, 1.0),
    "cell_nucleus_ratio": (2.0, 2.6),
    "boundary_jitter": 0.2,
    "jitter_scale_um": 2.5,
    "gap_fraction": 0.12,
    "gap_scale_um": 25.0,
    "dim_fraction": 0.15,
    "bright_range": (0.55, 1.0),
    "dim_range": (0.12, 0.25),
    "brightness_field_ratio": 10.0,
    "field_scale_um": 60.0,
    "texture_strength": 0.35,
    "speckle_scale_um": 0.35,
    "background": 0.01,
    "signal_gain": 0.9,
    "read_noise": 0.002,
    "bit_depth": 16,
    "noise_fraction": 0.1,
    "n_cell_types": 6,
}

PRESETS: dict[str, dict[str, object]] = {
    "demo": {},
    "dense": {
        **_DENSE_MORPHOLOGY,
        "height": 1024, "width": 1024, "pixel_size_um": 0.2125, "platform": "simulated-xenium",
        "label_expansion_um": 0.5, "blur_sigma_um": 0.35, "peak_photons": 4000.0,
        "transcripts_per_um2": 1.0, "n_genes": 100, "n_housekeeping": 10,
        "markers_per_type": 8,
    },
    "sparse": {
        **_DENSE_MORPHOLOGY,
        "height": 672, "width": 672, "pixel_size_um": 0.325, "platform": "simulated-iss",
        "label_expansion_um": 0.65, "blur_sigma_um": 0.45, "peak_photons": 2500.0,
        "transcripts_per_um2": 0.05, "n_genes": 40, "n_housekeeping": 4,
        "markers_per_type": 4,
    },
}


def preset_config(name: str = "demo", **overrides: object) -> TissueConfig:
    """The preset ``name`` with some fields replaced; None values are ignored."""
    if name not in PRESETS:
        raise InputError(f"--preset: unknown preset {name!r}; choose from {PRESET_NAMES}")
    known = {f.name for f in fields(TissueConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise InputError(f"unknown simulation option(s) {sorted(unknown)}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(TissueConfig(**PRESETS[name]), **chosen)  # type: ignore[arg-type]
