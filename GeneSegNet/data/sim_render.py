"""Image formation of the tissue simulator: brightness field, chromatin texture, blur, noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from GeneSegNet.data.sim_config import TissueConfig

FIELD_PLATEAU = 2.0  # > 0: how sharply the brightness field saturates at its extremes


def smooth_unit_field(shape: tuple[int, int], scale_px: float, rng: np.random.Generator
                      ) -> np.ndarray:
    """A smooth random field over ``shape`` (H, W), min-max scaled to [-1, 1], float64.

    Built on a coarse grid (one node per ``scale_px``) and upsampled with cubic splines,
    so it costs little even for large images.
    """
    height, width = shape
    nodes = (int(np.ceil(height / scale_px)) + 2, int(np.ceil(width / scale_px)) + 2)
    coarse = rng.normal(size=nodes)
    rows = np.linspace(0, nodes[0] - 1, height)
    cols = np.linspace(0, nodes[1] - 1, width)
    grid = np.meshgrid(rows, cols, indexing="ij")
    field = ndimage.map_coordinates(coarse, grid, order=3, mode="nearest")
    span = field.max() - field.min()
    return np.zeros(shape) if span == 0 else 2.0 * (field - field.min()) / span - 1.0


def brightness_field(cfg: TissueConfig, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative illumination/staining field (H, W) in [1/ratio, 1], float32."""
    shape = (cfg.height, cfg.width)
    if cfg.brightness_field_ratio == 1.0:
        return np.ones(shape, np.float32)
    unit = smooth_unit_field(shape, cfg.um_to_px(cfg.field_scale_um), rng)
    unit = np.tanh(FIELD_PLATEAU * unit) / np.tanh(FIELD_PLATEAU)  # broad bright / dim regions
    return (cfg.brightness_field_ratio ** ((unit - 1.0) / 2.0)).astype(np.float32)


def chromatin_texture(cfg: TissueConfig, shape: tuple[int, int], rng: np.random.Generator
                      ) -> np.ndarray:
    """Log-normal speckle (H, W) with mean ~1: bright chromatin foci on a dimmer nucleoplasm."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), cfg.um_to_px(cfg.speckle_scale_um))
    noise /= max(float(noise.std()), 1e-12)
    s = cfg.texture_strength
    return np.exp(s * noise - 0.5 * s * s)


def render_image(cfg: TissueConfig, nuclei: np.ndarray, brightness: np.ndarray,
                 field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The nuclear-stain image (H, W), uint8 or uint16 per ``cfg.bit_depth``.

    nuclei : (H, W) nucleus ids; brightness : (n + 1,) intrinsic brightness per id
    (index 0 unused); field : (H, W) multiplicative brightness field.
    Intensity = field * gain * blur(brightness * texture) + background, in fractions of
    full scale, then shot noise (``peak_photons`` photons at full scale) and read noise.
    """
    signal = brightness[nuclei] * chromatin_texture(cfg, nuclei.shape, rng) * (nuclei > 0)
    signal = ndimage.gaussian_filter(signal, cfg.um_to_px(cfg.blur_sigma_um))
    expected = cfg.background + cfg.signal_gain * field * signal
    if cfg.peak_photons > 0:
        expected = rng.poisson(np.clip(expected, 0, None) * cfg.peak_photons) / cfg.peak_photons
    image = expected + rng.normal(0.0, cfg.read_noise, size=nuclei.shape)
    top = 255 if cfg.bit_depth == 8 else 65535
    dtype = np.uint8 if cfg.bit_depth == 8 else np.uint16
    return np.clip(np.rint(image * top), 0, top).astype(dtype)
