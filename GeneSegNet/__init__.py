"""GeneSegNet: cell segmentation from a nuclear stain and RNA spot locations.

A clean-room reimplementation of GeneSegNet (Wang et al., Genome Biology 2023).
Coordinates: arrays are indexed (row, col) = (y, x); spot tables carry x (column)
and y (row) in pixels.
"""

__version__ = "0.1.0"

_API = ("Model", "SegmentationResult", "assign_transcripts", "load_model", "segment",
        "sopa_method", "write_outputs")


def __getattr__(name: str):
    """Lazy re-export of :mod:`GeneSegNet.api`, so ``import GeneSegNet`` stays light."""
    if name in _API:
        from GeneSegNet import api

        return getattr(api, name)
    raise AttributeError(f"module 'GeneSegNet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
