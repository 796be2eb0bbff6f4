"""Scores: segmentation metrics, the test pass, and scores against truth."""
