"""Flows: training targets from labels, and masks from predicted flows."""
