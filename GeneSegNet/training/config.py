"""Settings of training: one round's :class:`TrainConfig` and the run's :class:`RecursiveConfig`.

Both are frozen dataclasses validated on construction; the training loop, its batch
pipeline, the relabelling and the recursive orchestration all import them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from GeneSegNet.data.transforms import HeatmapMode, check_heatmap_mode
from GeneSegNet.dynamics.flow_targets import DEFAULT_FLOW_TARGET_MODE, check_mode
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.test_pass import OutputOptions
from GeneSegNet.growth.params import GrowParams
from GeneSegNet.io import layout as lay
from GeneSegNet.training.refine import METHODS as REFINE_METHODS

RELABEL_MIN_SIZE = 300  # px: refined labels drop smaller cells (upstream's min_size)
GROW_METHOD = "grow"  # transcript-driven relabelling (GeneSegNet.growth.grow)
# the model's cells plus the previous cells it missed, no growth (needs no transcripts)
MERGE_METHOD = "merge"
AUTO_METHOD = "auto"  # grow when every crop has spots and a pixel size, else the fallback
FALLBACK_METHOD = "merge"  # without transcripts: the model's cells plus those it missed
RELABEL_METHODS = (*REFINE_METHODS, GROW_METHOD, MERGE_METHOD)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (upstream defaults). ``val_every``: validation at epochs
    ``e % val_every == 0`` and ``e == 5``. ``save_every``: ``_last`` saved at epochs
    ``e % save_every == 1`` (every epoch for 1) and at the final epoch, and besides at the
    end of every epoch once ``checkpoint_minutes`` have passed since the last write (0, the
    default: every epoch), so an interrupted run loses at most one epoch. ``bf16``: bfloat16
    autocast, CUDA only (ignored with a warning elsewhere). ``num_workers``: loader processes
    for normalisation and augmentation (results do not depend on it). ``heatmap_mode``:
    heatmap scaling of the inputs (see :data:`GeneSegNet.data.transforms.HEATMAP_MODES`);
    stored in checkpoints, evaluation uses it too. ``flow_target_mode``: flow training
    targets (:data:`GeneSegNet.dynamics.flow_targets.FLOW_TARGET_MODES`; "isolated" is
    leak-free between touching cells); evaluation's flow check uses the same mode."""

    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    n_epochs: int = 500
    batch_size: int = 8
    min_train_masks: int = 1
    rescale: bool = True
    scale_range: float = 0.5
    tile: int = 224
    save_every: int = 100
    save_each: bool = False
    seed: int = 0
    heatmap_mode: HeatmapMode = "fixed"
    flow_target_mode: str = DEFAULT_FLOW_TARGET_MODE
    bf16: bool = False
    num_workers: int = 0
    val_every: int = 10
    checkpoint_minutes: float = 0.0

    def __post_init__(self) -> None:
        positive = ("n_epochs", "batch_size", "tile", "save_every", "val_every")
        bad = [n for n in positive if int(getattr(self, n)) < 1]
        if bad or self.learning_rate < 0 or self.weight_decay < 0 or self.num_workers < 0 or (
            not self.checkpoint_minutes >= 0
        ):
            raise ValueError(f"invalid training settings: {bad or 'negative value'} in {self}")
        check_heatmap_mode(self.heatmap_mode)
        check_mode(self.flow_target_mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        # settings saved before flow-target modes existed were trained on upstream's targets
        values.setdefault("flow_target_mode", "upstream")
        return cls(**values)


@dataclass(frozen=True)
class RecursiveConfig:
    """Folders and settings of a recursive-training run
    (:mod:`GeneSegNet.training.recursive`).

    ``refined_name``: folder of each sample's refined labels (``--output_filename``);
    ``refine_method``: per-round refinement (:mod:`GeneSegNet.training.relabel`);
    ``relabel_min_size``: cells below this many pixels are dropped from refined labels
    (predicted cells only with ``"grow"``, which never drops a cell it is given).
    ``refine_method`` ``"auto"`` becomes ``"grow"`` when every train/validation crop has
    spots and a pixel size, else ``"morphology"``
    (:func:`GeneSegNet.training.relabel.resolve_refine_method`). ``pixel_size_um``: µm/px
    for crops whose sample has no pixel size (``--pixel_size``). ``grow_start_labels``:
    with ``"grow"``, round 1 trains on grown starting labels (written as round 0's
    refined labels). ``max_cell_loss``: a relabelling that loses a larger fraction of the
    cells of the round's labels logs a warning. ``grow``: growth constants.
    """

    train_dir: Path
    save_model_dir: Path
    val_dir: Path | None = None
    test_dir: Path | None = None
    recursive_num: int = 3
    chan: int = 2
    img_filter: str = lay.IMAGE_SUFFIX
    mask_filter: str = lay.LABEL_SUFFIX
    heatmap_filter: str = lay.HEATMAP_ALL_SUFFIX
    refined_name: str = lay.REFINED_LABELS_DIR
    refine_method: str = AUTO_METHOD
    relabel_min_size: int = RELABEL_MIN_SIZE
    relabel_last_round: bool = False
    warm_start_rounds: bool = False
    overwrite_newlabels: bool = False
    select_model: str = "last"
    exclude_on_edges: bool = False
    size_filter: bool = False
    output: OutputOptions = field(default_factory=OutputOptions)
    pixel_size_um: float | None = None
    grow_start_labels: bool = True
    max_cell_loss: float = 0.1
    grow: GrowParams = field(default_factory=GrowParams)

    def __post_init__(self) -> None:
        if self.recursive_num < 1:
            raise InputError(f"--recursive_num must be >= 1, got {self.recursive_num}")
        if self.select_model not in ("last", "best"):
            raise InputError(f"select_model must be 'last' or 'best', got {self.select_model}")
        if self.refine_method not in (*RELABEL_METHODS, AUTO_METHOD):
            raise InputError(
                f"--refine_method must be one of {(*RELABEL_METHODS, AUTO_METHOD)}, "
                f"got {self.refine_method!r}"
            )
        if self.pixel_size_um is not None and not self.pixel_size_um > 0:
            raise InputError(f"--pixel_size must be > 0 µm/px, got {self.pixel_size_um}")
        if not 0 <= self.max_cell_loss <= 1:
            raise InputError(f"--max_cell_loss must be in [0, 1], got {self.max_cell_loss}")
        if not self.grow.max_growth_um > 0:
            raise InputError(f"--max_growth_um must be > 0, got {self.grow.max_growth_um}")
        name = self.refined_name
        reserved = {".", "..", lay.IMAGES_DIR, lay.LABELS_DIR, lay.SPOTS_DIR, lay.HEATMAPS_DIR}
        if not name or Path(name).name != name or name in reserved:
            raise InputError(f"--output_filename must be a plain new folder name, got {name!r}")

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`GeneSegNet.data.dataset.load_dataset`."""
        return {
            "chan": self.chan,
            "img_filter": self.img_filter,
            "mask_filter": self.mask_filter,
            "heatmap_filter": self.heatmap_filter,
        }

    def relabels_any_round(self) -> bool:
        return self.recursive_num > 1 or self.relabel_last_round

    def grows_start_labels(self) -> bool:
        """Does round 1 train on grown starting labels (round 0's refined labels)?"""
        return self.refine_method == GROW_METHOD and self.grow_start_labels

    def writes_refined_labels(self) -> bool:
        """Does the run write refined-label folders at all?"""
        return self.relabels_any_round() or self.grows_start_labels()

    def relabel_roots(self) -> list[Path]:
        """Dataset roots whose labels the run refines (train and validation sets)."""
        return [self.train_dir] + ([self.val_dir] if self.val_dir is not None else [])
