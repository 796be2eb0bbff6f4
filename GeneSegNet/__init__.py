"""GeneSegNet: cell segmentation from a nuclear stain and RNA spot locations.

A clean-room reimplementation of GeneSegNet (Wang et al., Genome Biology 2023).
Coordinates: arrays are indexed (row, col) = (y, x); spot tables carry x (column)
and y (row) in pixels.
"""

__version__ = "0.1.0"
