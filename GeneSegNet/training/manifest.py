"""The run manifest of recursive training: typed records, written as ``run_<id>.json``.

:class:`RunManifest` holds the run's identity, its settings (:class:`RunSettings`) and one
:class:`RoundRecord` per finished round; ``to_dict()`` gives the JSON written after every
round (keys: ``run_id``, ``version``, ``started``, ``status``, ``config``, ``rounds``, and
``start_labels`` / ``resumed`` / ``finished`` when they apply; ``config.grow_params`` holds
the growth constants, :meth:`GeneSegNet.growth.params.GrowParams.to_dict`). A resumed run
reads its manifest back with :meth:`RunManifest.load`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import GeneSegNet
from GeneSegNet.io.records import write_json
from GeneSegNet.model.net import NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.training.config import RecursiveConfig, TrainConfig
from GeneSegNet.training.loop import TrainResult


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class RunSettings:
    """Everything a run was started with (the manifest's ``config``)."""

    recursive: RecursiveConfig
    net: NetConfig
    train: TrainConfig
    eval: EvalConfig
    device: str
    pretrained_model: Path | None = None
    run_info: dict[str, Any] = field(default_factory=dict)  # e.g. the script's argv

    def to_dict(self) -> dict[str, Any]:
        return {
            "recursive": asdict(self.recursive),
            "grow_params": self.recursive.grow.to_dict(),
            "net": self.net.to_dict(),
            "train": self.train.to_dict(),
            "eval": asdict(self.eval),
            "device": self.device,
            "pretrained_model": self.pretrained_model,
            **self.run_info,
        }


@dataclass
class TrainingSummary:
    """A round's training history in brief (losses are per-crop means)."""

    epochs_run: int
    first_train_loss: float | None
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_epoch: int | None
    train_seconds: float

    @classmethod
    def from_result(cls, result: TrainResult) -> TrainingSummary:
        hist = result.history
        vals = [h for h in hist if h.get("val_loss") is not None]
        return cls(
            epochs_run=len(hist),
            first_train_loss=hist[0]["train_loss"] if hist else None,
            final_train_loss=hist[-1]["train_loss"] if hist else None,
            final_val_loss=vals[-1]["val_loss"] if vals else None,
            best_val_loss=result.best_val_loss,
            best_epoch=result.best_epoch,
            train_seconds=round(sum(h["seconds"] for h in hist), 2),
        )


@dataclass
class EvaluationRecord:
    """A round's test pass against the test set's original labels."""

    output_dir: Path | str
    n_crops: int
    metrics: dict[str, Any] | None
    metrics_files: list[Path | str] = field(default_factory=list)


@dataclass
class LabelSetStats:
    """Summary of one dataset's labels (train or val), pooled over its crops.

    ``median_area``: median cell area in ``area_unit`` (``"um2"`` when every crop's pixel
    size is known, else ``"px2"``; NaN without cells); ``fraction_transcripts_in_cells``:
    in-crop spots inside cells over all in-crop spots (NaN without spots).
    """

    n_crops: int
    n_cells: int
    median_area: float
    area_unit: str
    fraction_transcripts_in_cells: float
    n_transcripts: int


@dataclass
class RelabelRecord:
    """Refined labels written for one dataset (train or val) after a round (or, as
    round 0, the grown starting labels). ``method``: the relabelling used; ``stats``: of
    the written labels; ``merge``: summed counts of
    :func:`GeneSegNet.growth.merge.merge_with_previous` (``kept``, ``added_back``,
    ``dropped``) for method ``"grow"`` after a round, else None."""

    n_crops: int
    n_cells: int
    folders: list[Path | str] = field(default_factory=list)
    method: str | None = None
    stats: LabelSetStats | None = None
    merge: dict[str, int] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RelabelRecord:
        d = _known(cls, d)
        if d.get("stats") is not None:
            d["stats"] = LabelSetStats(**_known(LabelSetStats, d["stats"]))
        return cls(**d)


@dataclass
class RoundRecord:
    """One finished round: its data, models, test pass and relabelling.

    ``label_folders``/``n_crops``/``relabelled``/``input_labels`` are keyed by dataset
    (``train``, ``val``); ``input_labels``: stats of the labels the round trained on.
    """

    round: int
    label_folders: dict[str, list[str]]
    n_crops: dict[str, int]
    n_train_used: int
    n_val_used: int
    dropped: dict[str, int]
    model_last: Path | str
    model_best: Path | str
    model_used: Path | str
    started_from: str | None
    diam_labels: float
    training: TrainingSummary
    test: EvaluationRecord | None = None
    relabelled: dict[str, RelabelRecord] | None = None
    input_labels: dict[str, LabelSetStats] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        d = _known(cls, d)
        d["training"] = TrainingSummary(**_known(TrainingSummary, d["training"]))
        if d.get("test") is not None:
            d["test"] = EvaluationRecord(**_known(EvaluationRecord, d["test"]))
        if d.get("relabelled") is not None:
            d["relabelled"] = {k: RelabelRecord.from_dict(v) for k, v in d["relabelled"].items()}
        if d.get("input_labels") is not None:
            d["input_labels"] = {
                k: LabelSetStats(**_known(LabelSetStats, v)) for k, v in d["input_labels"].items()
            }
        return cls(**d)


@dataclass
class RunManifest:
    """The record of one recursive-training run (module docstring)."""

    run_id: str
    config: dict[str, Any]
    version: str = GeneSegNet.__version__
    started: str = field(default_factory=_now)
    status: str = "running"
    rounds: list[RoundRecord] = field(default_factory=list)
    resumed: list[dict[str, Any]] = field(default_factory=list)
    finished: str | None = None
    start_labels: dict[str, RelabelRecord] | None = None  # round 0: grown starting labels

    @staticmethod
    def file_name_for(run_id: str) -> str:
        return f"run_{run_id}.json"

    @property
    def file_name(self) -> str:
        """``run_<run_id>.json``."""
        return self.file_name_for(self.run_id)

    @classmethod
    def start(cls, run_id: str, settings: RunSettings) -> RunManifest:
        return cls(run_id=run_id, config=settings.to_dict())

    @classmethod
    def load(cls, path: Path) -> RunManifest:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        d["rounds"] = [RoundRecord.from_dict(r) for r in d.get("rounds", [])]
        if d.get("start_labels") is not None:
            d["start_labels"] = {
                k: RelabelRecord.from_dict(v) for k, v in d["start_labels"].items()
            }
        return cls(**_known(cls, d))

    def resume(self, settings: RunSettings, checkpoint: Path, round_index: int) -> None:
        """Continue at ``round_index`` from ``checkpoint``: later rounds are dropped and
        the resumption is recorded with its settings."""
        self.rounds = [r for r in self.rounds if r.round < round_index]
        self.resumed.append(
            {
                "time": _now(),
                "checkpoint": checkpoint,
                "round": round_index,
                "config": settings.to_dict(),
            }
        )
        self.status, self.finished = "running", None

    def finish(self) -> None:
        self.status, self.finished = "finished", _now()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "version": self.version,
            "started": self.started,
            "status": self.status,
            "config": self.config,
            "rounds": [r.to_dict() for r in self.rounds],
        }
        if self.start_labels is not None:
            out["start_labels"] = {k: asdict(v) for k, v in self.start_labels.items()}
        if self.resumed:
            out["resumed"] = self.resumed
        if self.finished is not None:
            out["finished"] = self.finished
        return out

    def write(self, folder: Path) -> Path:
        """Write ``<folder>/run_<run_id>.json`` atomically."""
        return write_json(Path(folder) / self.file_name, self.to_dict())
