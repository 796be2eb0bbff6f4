"""Model inputs: heatmaps, transforms, training crops, the crop loader and the simulator."""
