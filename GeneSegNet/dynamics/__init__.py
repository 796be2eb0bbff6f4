"""Flows: training targets from labels, and masks from predicted flows."""

# Flow training targets (:mod:`GeneSegNet.dynamics.flow_targets`): "isolated" computes each
# cell's gradient as if the cell were alone (leak-free, the default); "upstream" takes raw
# neighbours, so a touching cell's heat leaks into boundary gradients (upstream's targets).
FLOW_TARGET_MODES: tuple[str, ...] = ("isolated", "upstream")
DEFAULT_FLOW_TARGET_MODE = "isolated"
