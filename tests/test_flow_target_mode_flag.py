"""The flow-target mode a model was trained with reaches evaluation's flow check."""

from __future__ import annotations

import argparse

import pytest

import GeneSeg_train
from GeneSegNet.cli.args import eval_config_from_args
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.training.config import TrainConfig


def test_default_is_leak_free_and_the_flag_sets_it():
    assert TrainConfig().flow_target_mode == "isolated"
    args = GeneSeg_train.build_parser().parse_args(
        ["--train_dir", "t", "--save_model_dir", "m", "--flow_targets", "upstream"])
    assert args.flow_targets == "upstream"
    with pytest.raises(SystemExit):
        GeneSeg_train.build_parser().parse_args(
            ["--train_dir", "t", "--save_model_dir", "m", "--flow_targets", "leaky"])


def test_old_settings_without_a_mode_mean_upstream_targets():
    old = TrainConfig().to_dict()
    del old["flow_target_mode"]
    assert TrainConfig.from_dict(old).flow_target_mode == "upstream"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).flow_target_mode == "isolated"


@pytest.mark.parametrize(("trained", "expected"), [
    (None, "isolated"),
    ({"heatmap_mode": "fixed"}, "upstream"),
    ({"flow_target_mode": "isolated"}, "isolated"),
    ({"flow_target_mode": "upstream"}, "upstream"),
])
def test_evaluation_uses_the_trained_mode(trained, expected):
    cfg = eval_config_from_args(argparse.Namespace(), trained)
    assert cfg.flow_target_mode == expected


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        EvalConfig(flow_target_mode="leaky")
    with pytest.raises(ValueError):
        TrainConfig(flow_target_mode="leaky")


def test_mask_kwargs_carry_every_mask_setting_to_compute_masks():
    import inspect

    from GeneSegNet.dynamics.reconstruct import compute_masks
    cfg = EvalConfig(niter=37, confidence_threshold=0.5, flow_threshold=0.2, min_size=3,
                     y_only_movers=True, flow_target_mode="upstream")
    kwargs = cfg.mask_kwargs()
    assert kwargs == {"niter": 37, "confidence_threshold": 0.5, "flow_threshold": 0.2,
                      "min_size": 3, "y_only_movers": True, "target_mode": "upstream"}
    assert set(kwargs) <= set(inspect.signature(compute_masks).parameters)
