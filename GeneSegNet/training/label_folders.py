"""Which refined-label folders a recursive training run may write.

Each sample's refined labels (``<sample>/<refined_name>/``) carry a marker file
(:data:`MARKER`) naming the run and round that wrote them. A refined-label folder that
exists before round 1 and was not written by this run stops the run, unless
``overwrite_newlabels``: it is then moved aside to ``<refined_name>.backup_<stamp>``,
whether an earlier GeneSegNet run wrote it or not (never deleted). A resumed round N
needs this run's round N-1 labels.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from GeneSegNet.data.dataset import sample_folders
from GeneSegNet.errors import InputError
from GeneSegNet.training.config import RecursiveConfig

logger = logging.getLogger(__name__)

MARKER = ".genesegnet_labels.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a refined-label folder (run id, round...), None if absent or bad."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def relabel_folders(rc: RecursiveConfig) -> list[Path]:
    """Sample folders whose labels the run refines (train and validation sets)."""
    return [folder for root in rc.relabel_roots() for folder in sample_folders(root)]


def claim_folder(target: Path, rc: RecursiveConfig, run_id: str, *, dry_run: bool) -> str | None:
    """May this run write the refined-label folder ``target``? Raises InputError if not.

    Allowed: no folder, or one written by this run. With ``overwrite_newlabels`` also a
    folder of another GeneSegNet run or any other folder, which is moved aside to
    ``<name>.backup_<time>`` (unless ``dry_run``; never deleted). Returns a note or None.
    """
    if not target.exists():
        return None
    marker = read_marker(target)
    if marker is not None and marker.get("run_id") == run_id:
        return None
    if not rc.overwrite_newlabels:
        origin = "an earlier GeneSegNet run" if marker else "not GeneSegNet"
        raise InputError(
            f"refined-label folder exists ({origin}) and training would replace it; move it "
            "away or pass --overwrite_newlabels (which moves it to "
            f"{rc.refined_name}.backup_<time>)",
            target,
        )
    origin = f"written by run {marker.get('run_id')}" if marker else "not written by GeneSegNet"
    backup = target.with_name(f"{target.name}.backup_{datetime.now():%Y_%m_%d_%H_%M_%S_%f}")
    if not dry_run:
        os.replace(target, backup)
        logger.warning("moved %s (%s) to %s", target, origin, backup)
    return f"{target} ({origin}) is moved to {target.name}.backup_<time>"


def check_refined_folders(rc: RecursiveConfig, run_id: str, first_round: int) -> None:
    """Before any work: may a run starting at ``first_round`` write its refined labels?

    Round 1: every existing refined-label folder must be claimable (:func:`claim_folder`,
    dry run; notes are logged). A resumed round N >= 2 needs this run's round N-1 labels
    in every sample folder. Raises InputError otherwise.
    """
    for folder in relabel_folders(rc):
        target = folder / rc.refined_name
        if first_round == 1:
            note = claim_folder(target, rc, run_id, dry_run=True)
            if note:
                logger.warning("%s", note)
            continue
        marker = read_marker(target)
        if marker is None or marker.get("run_id") != run_id:
            raise InputError(
                f"cannot resume round {first_round}: this run's refined labels are missing",
                target,
            )
        if int(marker.get("round", -1)) != first_round - 1:
            raise InputError(
                f"cannot resume round {first_round}: the refined labels come "
                f"from round {marker.get('round')}",
                target,
            )
