"""The network, its checkpoints, and the network pass on crops (tiles, blending)."""
