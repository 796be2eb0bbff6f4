"""Training data pipeline: flow targets, per-crop rescale factors and augmented batches.

Every batch's random draws come from ``default_rng([seed, tag, epoch, batch])`` only, so
the batches do not depend on the number of loader workers (spec §12 item 38).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from GeneSegNet.data.dataset import Crop, network_input
from GeneSegNet.data.model_input import ModelInput
from GeneSegNet.data.transforms import normalize_input
from GeneSegNet.dynamics.flow_targets import FlowTargetCache, compute_flow_targets
from GeneSegNet.dynamics.masks import diameters
from GeneSegNet.errors import InputError
from GeneSegNet.training.augment import random_rotate_and_resize
from GeneSegNet.training.config import TrainConfig

logger = logging.getLogger(__name__)

VALIDATION_SEED = 42
MIN_RESCALE_DIAMETER = 5.0
# Validation patches are computed once and kept in memory up to this size.
VAL_CACHE_BYTES = 1 << 30


@dataclass
class TrainData:
    crops: list[Crop]
    targets: list[np.ndarray]  # float32 [3,H,W] (binary, dY, dX)
    rescale: np.ndarray  # [n] float64
    diameters: np.ndarray  # [n] median label diameter per crop (pixels)
    model_input: ModelInput = field(default_factory=ModelInput)  # how inputs are built

    def network_input(self, i: int, heatmap_mode: str) -> np.ndarray:
        """Normalised input [C, H, W] float32 of crop ``i`` (local normalisation anchored
        at the crop's origin in its raw image)."""
        crop, mi = self.crops[i], self.model_input
        raw = network_input(crop, density=mi.transcripts.mode == "density")
        return normalize_input(raw, mi.input_norm(heatmap_mode), origin=crop.origin)


class PatchBatches(Dataset):
    """Item k = one augmented batch ``(images [b,C,t,t], targets [b,3,t,t])`` of the plan.

    ``plan[k] = (tag, epoch, batch_no, indices)``; its random draws come from
    ``default_rng([seed, tag, epoch, batch_no])`` only. Normalisation happens here, in
    the loader's worker processes.
    """

    def __init__(
        self, data: TrainData, plan: list, seed: int, scale_range: float, cfg: TrainConfig
    ):
        self.data, self.plan, self.seed = data, plan, seed
        self.scale_range, self.cfg = scale_range, cfg

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tag, epoch, batch_no, idx = self.plan[k]
        rng = np.random.default_rng([self.seed, tag, epoch, batch_no])
        mode, tile = self.cfg.heatmap_mode, self.cfg.tile
        targets = self.data.targets
        images = [self.data.network_input(i, mode) for i in idx]
        imgs, lbls, _ = random_rotate_and_resize(
            images,
            [targets[i] for i in idx],
            rescale=self.data.rescale[idx],
            scale_range=self.scale_range,
            xy=(tile, tile),
            rng=rng,
        )
        return torch.from_numpy(imgs), torch.from_numpy(lbls)


def make_loader(dataset: PatchBatches, num_workers: int, device: torch.device) -> DataLoader:
    # Workers run torch single-threaded (DataLoader default). Do not touch OpenCV's thread
    # pool in a forked worker: cv2.setNumThreads there deadlocks on the parent's threads.
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )


def prepare_data(
    crops: Sequence[Crop],
    what: str,
    cfg: TrainConfig,
    diam_mean: float,
    device: torch.device,
    cache: FlowTargetCache | None,
    progress: bool,
    model_input: ModelInput | None = None,
) -> tuple[TrainData, int]:
    """Flow targets, drop crops with < min_train_masks cells, per-crop rescale factors.

    ``model_input``: how the network inputs are built (default: upstream's)."""
    for crop in crops:
        if crop.labels is None:
            raise InputError(f"{what} crop {crop.name} has no label image", crop.image_path)
    targets = compute_flow_targets(
        [c.labels for c in crops], device=device, cache=cache, progress=progress,
        mode=cfg.flow_target_mode,
    )
    keep = [i for i, t in enumerate(targets) if int(t[0].max(initial=0)) >= cfg.min_train_masks]
    dropped = len(crops) - len(keep)
    if dropped:
        msg = f"{what}: dropped {dropped} of {len(crops)} crops with < {cfg.min_train_masks} cells"
        logger.info("%s", msg)
    kept = [crops[i] for i in keep]
    diam = np.array([diameters(c.labels)[0] for c in kept], dtype=np.float64)
    rescale = (
        np.maximum(diam, MIN_RESCALE_DIAMETER) / diam_mean if cfg.rescale else np.ones(len(kept))
    )
    data = TrainData(kept, [targets[i][1:] for i in keep], rescale, diam,
                     model_input or ModelInput())
    return data, dropped


def data_fingerprint(crops: Sequence[Crop]) -> str:
    """Fingerprint of the training data (names, label content), to warn on resume."""
    digest = hashlib.blake2b(digest_size=12)
    for crop in crops:
        digest.update(crop.name.encode())
        digest.update(np.ascontiguousarray(crop.labels).tobytes())
    return digest.hexdigest()


def epoch_plan(n: int, cfg: TrainConfig, epochs: range) -> list[tuple[int, int, int, np.ndarray]]:
    plan = []
    for epoch in epochs:
        order = np.random.default_rng([cfg.seed, 0, epoch]).permutation(n)
        for b, start in enumerate(range(0, n, cfg.batch_size)):
            plan.append((1, epoch, b, order[start : start + cfg.batch_size]))
    return plan


def validation_batches(
    val: TrainData, cfg: TrainConfig, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation patches (scale range 0, seed 42): the same at every epoch, so
    they are computed once when they fit in memory."""
    n, bs = len(val.crops), cfg.batch_size
    plan = [(2, 0, b, np.arange(s, min(s + bs, n))) for b, s in enumerate(range(0, n, bs))]
    loader = make_loader(
        PatchBatches(val, plan, VALIDATION_SEED, 0.0, cfg), cfg.num_workers, device
    )
    nchan = network_input(val.crops[0]).shape[0]
    return list(loader) if n * (nchan + 3) * cfg.tile**2 * 4 <= VAL_CACHE_BYTES else loader
