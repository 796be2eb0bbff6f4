"""Whole-slide inference: window plan, window pass, block-wise masks, files."""
