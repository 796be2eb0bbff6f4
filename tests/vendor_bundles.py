"""Small synthetic vendor bundles in the vendors' real file formats, with known nuclei.

Each writer returns the nuclei centres in the vendor's coordinates so that tests can place
a transcript at a centre and check which label it lands in after import.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

PS = 0.5  # Xenium test pixel size, µm/px at level 0
H0, W0 = 128, 192  # level-0 image (px)
CENTRES_UM = [(20.0, 15.0), (60.5, 40.25), (80.0, 20.0)]  # (x, y) µm
HALF_UM = 4.0  # half edge of the square nuclei (µm)


def square(cx: float, cy: float, half: float) -> np.ndarray:
    return np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half],
                     [cx - half, cy + half]])


def dapi_level0() -> np.ndarray:
    """(H0, W0) uint16 with bright squares at the nuclei (centre rule)."""
    img = np.full((H0, W0), 100, np.uint16)
    rows, cols = np.mgrid[0:H0, 0:W0]
    for cx, cy in CENTRES_UM:
        x, y = (cols + 0.5) * PS, (rows + 0.5) * PS
        img[(abs(x - cx) < HALF_UM) & (abs(y - cy) < HALF_UM)] = 4000
    return img


def write_pyramid(path: Path, img: np.ndarray, pixel_size: float | None, levels: int = 3,
                  channels: int = 2) -> None:
    """OME-TIFF (C, Y, X), sub-resolutions as SubIFDs (every 2nd pixel)."""
    data = np.stack([img] + [img // 2] * (channels - 1))
    meta = {"axes": "CYX"}
    if pixel_size is not None:
        meta.update(PhysicalSizeX=pixel_size, PhysicalSizeY=pixel_size)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(data, subifds=levels - 1, tile=(64, 64), metadata=meta)
        for k in range(1, levels):
            s = 2 ** k
            tw.write(data[:, s // 2::s, s // 2::s], subfiletype=1, tile=(64, 64))


def xenium_bundle(root: Path, *, experiment: bool = True, focus: bool = False,
                  masks: bool = False, ome_pixel: float | None = PS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    img = dapi_level0()
    if focus:
        (root / "morphology_focus").mkdir()
        write_pyramid(root / "morphology_focus" / "morphology_focus_0000.ome.tif", img,
                      ome_pixel, channels=1)
        write_pyramid(root / "morphology_focus" / "morphology_focus_0001.ome.tif", img // 3,
                      ome_pixel, channels=1)
    else:
        write_pyramid(root / "morphology_mip.ome.tif", img, ome_pixel)
    if experiment:
        (root / "experiment.xenium").write_text(json.dumps({"pixel_size": PS}))
    genes, xs, ys, qv, cells = [], [], [], [], []
    for k, (cx, cy) in enumerate(CENTRES_UM):
        genes += [f"Gene{k}", "NegControlProbe_1", f"Gene{k}"]
        xs += [cx, cx, cx + 0.1]
        ys += [cy, cy, cy]
        qv += [30.0, 35.0, 5.0]  # the third is below qv 20
        cells += [f"cell-{k}"] * 3
    genes += ["BLANK_0001", "UnassignedCodeword_0002", "Gene9"]
    xs += [1.0, 2.0, 90.0]
    ys += [1.0, 2.0, 60.0]
    qv += [40.0, 40.0, 40.0]
    cells += ["UNASSIGNED"] * 3
    n = len(genes)
    table = pa.table({
        "transcript_id": pa.array(np.arange(n, dtype=np.uint64)),
        "cell_id": pa.array(cells),
        "overlaps_nucleus": pa.array(np.ones(n, np.uint8)),
        "feature_name": pa.array(genes),
        "x_location": pa.array(np.array(xs, np.float32)),
        "y_location": pa.array(np.array(ys, np.float32)),
        "z_location": pa.array(np.full(n, 5.0, np.float32)),
        "qv": pa.array(np.array(qv, np.float32)),
    })
    pq.write_table(table, root / "transcripts.parquet", row_group_size=4)
    if masks:
        import zarr

        rows, cols = np.mgrid[0:H0, 0:W0]
        lab = np.zeros((H0, W0), np.uint32)
        for k, (cx, cy) in enumerate(CENTRES_UM):
            x, y = (cols + 0.5) * PS, (rows + 0.5) * PS
            lab[(abs(x - cx) < HALF_UM) & (abs(y - cy) < HALF_UM)] = k + 1
        store = zarr.storage.ZipStore(root / "cells.zarr.zip", mode="w")
        group = zarr.open_group(store, mode="w", zarr_format=2)
        group.create_group("masks").create_array("0", data=lab, chunks=(64, 64))
        store.close()
    else:
        cid, vx, vy = [], [], []
        for k, (cx, cy) in enumerate(CENTRES_UM):
            sq = square(cx, cy, HALF_UM)
            ring = np.vstack([sq, sq[:1]])
            cid += [f"cell-{k}"] * len(ring)
            vx += list(ring[:, 0])
            vy += list(ring[:, 1])
        pq.write_table(pa.table({"cell_id": cid, "vertex_x": np.array(vx, np.float32),
                                 "vertex_y": np.array(vy, np.float32)}),
                       root / "nucleus_boundaries.parquet")
    return root


# MERSCOPE: µm -> px with a translation (µm origin not at the image corner)
MERSCOPE_A = np.array([[1 / 0.25, 0, -400.0], [0, 1 / 0.25, 60.0], [0, 0, 1]])
MERSCOPE_SHAPE = (120, 160)


def merscope_bundle(root: Path, transform: np.ndarray = MERSCOPE_A) -> tuple[Path, list]:
    """Cells: a polygon with a hole and a two-part multipolygon; returns the test points
    [(x_um, y_um, expected EntityID or 0)]."""
    import shapely

    (root / "images").mkdir(parents=True)
    inv = np.linalg.inv(MERSCOPE_A)

    def um(xp: float, yp: float) -> tuple[float, float]:
        v = inv @ [xp, yp, 1]
        return float(v[0]), float(v[1])

    def ring_um(pts_px: np.ndarray) -> list:
        return [um(x, y) for x, y in pts_px]

    outer = ring_um(square(40, 40, 20))
    hole = ring_um(square(40, 40, 5))
    poly = shapely.Polygon(outer, [hole])
    multi = shapely.MultiPolygon([shapely.Polygon(ring_um(square(110, 30, 8))),
                                  shapely.Polygon(ring_um(square(110, 90, 8)))])
    geoms = [poly, multi]
    frame = pa.table({"EntityID": pa.array([101, 202] * 2, pa.int64()),
                      "ZIndex": pa.array([3, 3, 0, 0], pa.int64()),
                      "Geometry": pa.array([shapely.to_wkb(g) for g in geoms] * 2,
                                           pa.binary())})
    pq.write_table(frame, root / "cell_boundaries.parquet")
    img = np.full(MERSCOPE_SHAPE, 50, np.uint16)
    img[20:60, 20:60] = 3000
    for z in range(7):
        tifffile.imwrite(root / "images" / f"mosaic_DAPI_z{z}.tif", img + z)
    np.savetxt(root / "images" / "micron_to_mosaic_pixel_transform.csv", transform,
               fmt="%.10g", delimiter=" ")
    points = [(*um(40.5, 30.5), 101), (*um(40.5, 40.5), 0), (*um(110.2, 30.7), 202),
              (*um(110.2, 90.7), 202), (*um(150.5, 5.5), 0)]
    genes = ["A", "B", "C", "D", "E"]
    with open(root / "detected_transcripts.csv", "w") as fh:
        fh.write(",barcode_id,global_x,global_y,global_z,x,y,fov,gene,transcript_id,cell_id\n")
        for i, ((x, y, _), g) in enumerate(zip(points, genes, strict=True)):
            fh.write(f"{i},{i},{x!r},{y!r},3.0,1.0,2.0,0,{g},t{i},0\n")
        fh.write("9,9,1.0e2,-1.0e1,3.0,1.0,2.0,0,Blank-1,t9,0\n")
    return root, points


# CosMx: two FOVs, corners in global px; FOV images (C=5, H, W)
COSMX_FOV_SHAPE = (50, 64)
COSMX_CORNERS = {1: (1000.0, 2000.0), 2: (1064.0, 2010.0)}  # fov: (x, y) global px
COSMX_CELLS = {1: [(10, 12), (30, 40)], 2: [(20, 20)]}  # fov: [(row, col) centre local]


def cosmx_bundle(root: Path, bad_fov: bool = False) -> tuple[Path, list]:
    """Returns [(fov, x_local, y_local, local cell id)] of the test transcripts."""
    (root / "Morphology2D").mkdir(parents=True)
    (root / "CellLabels").mkdir()
    with open(root / "S1_fov_positions_file.csv", "w") as fh:
        fh.write("fov,x_global_px,y_global_px\n")
        for f, (x, y) in COSMX_CORNERS.items():
            fh.write(f"{f},{x},{y}\n")
    rows = []
    for f, cells in COSMX_CELLS.items():
        lab = np.zeros(COSMX_FOV_SHAPE, np.uint16)
        stack = np.full((5,) + COSMX_FOV_SHAPE, 10 * f, np.uint16)
        for k, (r, c) in enumerate(cells, start=1):
            lab[r - 3:r + 4, c - 3:c + 4] = k
            stack[4, r - 3:r + 4, c - 3:c + 4] = 5000 + f
            rows.append((f, c + 0.5, r + 0.5, k))
        tifffile.imwrite(root / "CellLabels" / f"CellLabels_F{f:03d}.tif", lab)
        tifffile.imwrite(root / "Morphology2D" / f"20240101_S1_F{f:03d}.TIF", stack)
    with open(root / "S1_tx_file.csv", "w") as fh:
        fh.write("fov,cell_ID,x_global_px,y_global_px,x_local_px,y_local_px,z,target,"
                 "CellComp\n")
        for f, xl, yl, k in rows:
            cx, cy = COSMX_CORNERS[f]
            fh.write(f"{3 if bad_fov else f},{k},{cx + xl},{cy + yl},{xl},{yl},0,G{k},"
                     "Nuclear\n")
        fh.write(f"1,0,{1000 + 5.5},{2000 + 5.5},5.5,5.5,0,NegPrb3,None\n")
    return root, rows
