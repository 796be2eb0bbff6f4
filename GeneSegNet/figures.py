"""Result figures drawn with OpenCV (no matplotlib): outlines, spots, mask overlays, flows.

All images returned here are uint8 BGR ``[h, w, 3]`` (OpenCV's order, ready for
``cv2.imwrite``) except :func:`flow_rgb`, which is RGB like upstream's flow colouring.
Colours are deterministic: a cell's hue depends only on its id.

:func:`comparison_figure` puts panels side by side, left to right (spec §7.4 spirit):

0. the input image (1-99 % normalised);
1. predicted outlines in red; spots inside a predicted cell in cyan, others in yellow;
2. predicted masks in colour over the image;
3. (labels given) label outlines in green; spots split by the label the same way;
4. (labels given) label masks in colour over the image;
5. (flows given) the flow colour image.

Each panel is the crop enlarged ``scale`` times (nearest neighbour), so crop pixel
(row, col) covers rows ``HEADER + row·scale ...`` and columns
``i·(W·scale + GAP) + col·scale ...`` of panel ``i``, each ``scale`` pixels wide.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from GeneSegNet.data.transforms import normalize99

logger = logging.getLogger(__name__)

RED = (0, 0, 255)  # BGR
GREEN = (0, 255, 0)
CYAN = (255, 255, 0)
YELLOW = (0, 255, 255)
HEADER = 18  # px of title strip above the panels
GAP = 4  # px of white between panels
_GOLDEN = 0.6180339887498949


def display_image(image: np.ndarray) -> np.ndarray:
    """Grey [H, W] or BGR [H, W, 3] image of any dtype -> uint8 BGR [H, W, 3].

    Intensities are mapped so that the 1st and 99th percentiles (over all channels)
    become 0 and 255, then clipped. A flat image becomes black.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        scaled = normalize99(image)
    elif image.ndim == 3 and image.shape[2] == 3:
        scaled = normalize99(image.reshape(image.shape[0], -1)).reshape(image.shape)
    else:
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {image.shape}")
    out = (np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out if out.ndim == 3 else cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)


def outline_pixels(masks: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: cell pixels with a 4-neighbour of another id (outside = background).

    Examples
    --------
    >>> outline_pixels(np.pad(np.ones((3, 3), int), 1)).astype(int)[1:4, 1:4].tolist()
    [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    """
    masks = np.asarray(masks)
    padded = np.pad(masks, 1)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return differs & (masks > 0)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def _hue_of(ids: np.ndarray) -> np.ndarray:
    """Deterministic hue in [0, 360) per id (golden-ratio spacing: neighbours differ)."""
    return ((0.137 + ids.astype(np.float64) * _GOLDEN) % 1.0 * 360.0).astype(np.float32)


def mask_overlay(image: np.ndarray, masks: np.ndarray, scale: int = 1) -> np.ndarray:
    """Cells in colour over the image: uint8 BGR [H·scale, W·scale, 3].

    Each cell gets a fixed hue from its id (full saturation) with brightness
    ``0.5 + 0.5·intensity`` from the normalised image; background shows the grey image.
    """
    masks = np.asarray(masks)
    base = display_image(image)
    if base.shape[:2] != masks.shape:
        raise ValueError(f"image {base.shape[:2]} and masks {masks.shape} differ in size")
    out = base.copy()
    cells = masks > 0
    if cells.any():
        grey = cv2.cvtColor(base, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
        hsv = np.zeros((int(cells.sum()), 1, 3), dtype=np.float32)
        hsv[:, 0, 0] = _hue_of(masks[cells])
        hsv[:, 0, 1] = 1.0
        hsv[:, 0, 2] = 0.5 + 0.5 * grey[cells]
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[:, 0, :]
        out[cells] = np.clip(bgr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _enlarge(out, scale)


def draw_outlines(
    image: np.ndarray,
    masks: np.ndarray,
    color: tuple[int, int, int] = RED,
    scale: int = 1,
    spots_xy: np.ndarray | None = None,
) -> np.ndarray:
    """Image with cell outlines (and optionally spots): uint8 BGR [H·scale, W·scale, 3].

    Outline pixels are those of :func:`outline_pixels`, painted ``color``. Spots
    (``spots_xy`` [N, 2] as (x, y) pixels) are drawn as small dots on top: cyan when
    the pixel under the spot belongs to a cell of ``masks``, yellow otherwise. Spots
    outside the image are skipped.
    """
    masks = np.asarray(masks)
    panel = display_image(image)
    if panel.shape[:2] != masks.shape:
        raise ValueError(f"image {panel.shape[:2]} and masks {masks.shape} differ in size")
    panel[outline_pixels(masks)] = color
    panel = np.ascontiguousarray(_enlarge(panel, scale))
    if spots_xy is not None and len(spots_xy):
        _draw_spots(panel, np.asarray(spots_xy), masks, scale)
    return panel


def _draw_spots(panel: np.ndarray, spots_xy: np.ndarray, masks: np.ndarray, scale: int) -> None:
    """Dots at the spots, in place: cyan inside a cell of ``masks``, yellow outside."""
    height, width = masks.shape
    xy = np.floor(np.asarray(spots_xy, dtype=np.float64)[:, :2])
    keep = np.all(np.isfinite(xy), axis=1)
    xy = xy[keep].astype(np.int64)
    xy = xy[(xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)]
    radius = max(1, scale // 2)
    for x, y in xy:
        color = CYAN if masks[y, x] > 0 else YELLOW
        centre = (int(x * scale + scale // 2), int(y * scale + scale // 2))
        cv2.circle(panel, centre, radius, color, thickness=-1, lineType=cv2.LINE_8)


def flow_rgb(dP: np.ndarray) -> np.ndarray:
    """Colour image of a flow field, uint8 RGB [H, W, 3] (upstream ``dx_to_circ``).

    angle = atan2(dX, dY) + π; magnitude = ‖dP‖ 1-99 % normalised and clipped to [0, 1];
    with c_k = (cos(angle + k·2π/3) + 1)/2 the channels are (c_0, c_2, c_1)·magnitude·255.
    """
    dP = np.asarray(dP, dtype=np.float32)
    if dP.ndim != 3 or dP.shape[0] != 2:
        raise ValueError(f"expected flows [2, H, W], got shape {dP.shape}")
    angle = np.arctan2(dP[1], dP[0]) + np.pi
    magnitude = np.clip(normalize99(np.sqrt(dP[0] ** 2 + dP[1] ** 2)), 0.0, 1.0)
    c = [(np.cos(angle + k * 2.0 * np.pi / 3.0) + 1.0) / 2.0 for k in range(3)]
    rgb = np.stack([c[0], c[2], c[1]], axis=-1) * magnitude[..., None]
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _titled(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Panels side by side with ``GAP`` px of white between them and titles on top."""
    height = panels[0][1].shape[0]
    widths = [p.shape[1] for _, p in panels]
    canvas = np.full((HEADER + height, sum(widths) + GAP * (len(panels) - 1), 3), 255, np.uint8)
    col = 0
    for (title, panel), width in zip(panels, widths, strict=True):
        canvas[HEADER:, col : col + width] = panel
        cv2.putText(
            canvas,
            title,
            (col + 2, HEADER - 5),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        col += width + GAP
    return canvas


def comparison_figure(
    image: np.ndarray,
    pred_masks: np.ndarray,
    label_masks: np.ndarray | None = None,
    spots_xy: np.ndarray | None = None,
    *,
    flows: np.ndarray | None = None,
    scale: int | None = None,
) -> np.ndarray:
    """Prediction (and labels) side by side over the image, with spots (module docstring).

    Parameters
    ----------
    image : [H, W] grey or [H, W, 3] BGR, any dtype.
    pred_masks : [H, W] integer predicted label image.
    label_masks : [H, W] integer label image, or None (its two panels are left out).
    spots_xy : [N, 2] spot pixels as (x, y), or None.
    flows : [2, H, W] (dY, dX) flows for a last flow-colour panel, or None.
    scale : enlargement factor; None picks 2 for crops up to 512 px, else 1.

    Returns
    -------
    uint8 BGR [HEADER + H·scale, n·W·scale + (n-1)·GAP, 3] for n panels.
    """
    pred_masks = np.asarray(pred_masks)
    height, width = pred_masks.shape
    if scale is None:
        scale = 2 if max(height, width) <= 512 else 1
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    panels = [
        ("image", _enlarge(display_image(image), scale)),
        ("prediction", draw_outlines(image, pred_masks, RED, scale, spots_xy)),
        ("pred. masks", mask_overlay(image, pred_masks, scale)),
    ]
    if label_masks is not None:
        label_masks = np.asarray(label_masks)
        if label_masks.shape != pred_masks.shape:
            raise ValueError(f"labels {label_masks.shape} and masks {pred_masks.shape} differ")
        panels.append(("labels", draw_outlines(image, label_masks, GREEN, scale, spots_xy)))
        panels.append(("label masks", mask_overlay(image, label_masks, scale)))
    if flows is not None:
        panels.append(("flows", _enlarge(flow_rgb(flows)[:, :, ::-1], scale)))
    return _titled(panels)
