"""Transcript channels: density against a brute-force sum, units and per-slide scaling,
window tiling, the gene embedding on synthetic two-region tissue, config and storage."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.gene_embedding import GeneEmbedding, learn_gene_embedding
from GeneSegNet.data.heatmap import render_heatmap
from GeneSegNet.data.transcripts import (
    KERNEL_TRUNCATE,
    TRANSCRIPT_MODES,
    TranscriptInput,
    density_channel,
    density_map,
    gene_channels,
    read_transcript_channels,
    saturation_stats,
    slide_density_scale,
    transcript_channels,
    write_transcript_channels,
)
from GeneSegNet.errors import InputError


def brute_density(rows, cols, shape, sigma, origin=(0, 0), weights=None):
    """Definition, spot by spot: snapped spot, separable sampled Gaussian, each 1-D factor
    normalised over its truncated support |d| <= ceil(KERNEL_TRUNCATE·σ)."""
    radius = max(1, math.ceil(KERNEL_TRUNCATE * sigma))
    norm = sum(math.exp(-0.5 * (d / sigma) ** 2) for d in range(-radius, radius + 1))
    out = np.zeros(shape)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    rr, cc = rr + origin[0], cc + origin[1]
    weights = np.ones(len(rows)) if weights is None else weights
    for r, c, w in zip(rows, cols, weights, strict=True):
        dr, dc = rr - math.floor(r), cc - math.floor(c)
        inside = (np.abs(dr) <= radius) & (np.abs(dc) <= radius)
        value = np.exp(-0.5 * (dr / sigma) ** 2) * np.exp(-0.5 * (dc / sigma) ** 2) / norm**2
        out += w * np.where(inside, value, 0.0)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_density_matches_brute_force_including_outside_spots(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(5, 50, size=2))
    sigma = float(rng.choice([0.7, 1.5, 3.3, 6.0]))
    origin = (int(rng.integers(-20, 20)), int(rng.integers(-20, 20)))
    n = int(rng.integers(1, 80))
    reach = 4 * sigma + 10  # some spots beyond the kernel's reach too
    rows = rng.uniform(origin[0] - reach, origin[0] + height + reach, n)
    cols = rng.uniform(origin[1] - reach, origin[1] + width + reach, n)
    weights = rng.normal(size=n) if seed % 2 else None
    ours = density_map(rows, cols, (height, width), sigma, origin=origin, weights=weights)
    ref = brute_density(rows, cols, (height, width), sigma, origin, weights)
    assert ours.shape == (height, width) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max() * 1e-3)


def test_adjacent_windows_tile_into_one_window():
    rng = np.random.default_rng(1)
    rows, cols = rng.uniform(-10, 70, 400), rng.uniform(-10, 110, 400)
    whole = density_map(rows, cols, (60, 100), 2.5, origin=(3, -4))
    left = density_map(rows, cols, (60, 37), 2.5, origin=(3, -4))
    right = density_map(rows, cols, (60, 63), 2.5, origin=(3, 33))
    np.testing.assert_allclose(np.hstack([left, right]), whole, rtol=1e-6, atol=1e-12)


def test_mass_snapping_and_peak():
    sigma = 5.0
    rows, cols = np.array([40.99, 60.2]), np.array([30.01, 70.5])
    dens = density_map(rows, cols, (100, 120), sigma)
    assert dens.sum() == pytest.approx(2.0, rel=1e-6)  # one transcript of mass per spot
    assert dens[40, 30] == pytest.approx(1 / (2 * math.pi * sigma**2), rel=1e-3)
    assert np.unravel_index(np.argmax(dens[:50]), (50, 120)) == (40, 30)
    # floor, not rounding: -0.5 lies in pixel -1
    assert density_map([-0.5], [2.0], (1, 5), 1.0, origin=(-1, 0))[0, 2] == pytest.approx(
        density_map([4.0], [2.0], (1, 5), 1.0, origin=(4, 0))[0, 2])
    assert not density_map([np.nan], [1.0], (4, 4), 1.0).any()


def test_units_and_slide_scale_on_a_uniform_field():
    rng = np.random.default_rng(2)
    pixel, lam = 0.5, 1.2  # µm/px, transcripts per µm²
    side = 240
    n = rng.poisson(lam * (side * pixel) ** 2)
    rows, cols = rng.uniform(0, side, n), rng.uniform(0, side, n)
    scale = slide_density_scale(rows, cols, pixel_size_um=pixel, sigma_um=2.0)
    # the density at a spot of a Poisson field is the field's density plus the spot itself
    self_term = 1 / (4 * math.pi * 2.0**2)
    assert scale == pytest.approx(lam + self_term, rel=0.1)
    chan = density_channel(rows, cols, (side, side), sigma_um=2.0, pixel_size_um=pixel,
                           slide_scale=scale)
    raw = density_map(rows, cols, (side, side), 2.0 / pixel)
    np.testing.assert_allclose(chan, raw / pixel**2 / scale, rtol=1e-6)
    interior = chan[40:-40, 40:-40] * scale
    assert interior.mean() == pytest.approx(lam, rel=0.05)


def test_slide_scale_is_the_median_density_at_spots():
    rng = np.random.default_rng(3)
    rows, cols = rng.uniform(0, 80, 300), rng.uniform(0, 90, 300)
    rows[:100] = rng.uniform(0, 20, 100)  # a dense corner
    dens = density_map(rows, cols, (80, 90), 1.5 / 0.3)
    expected = np.median(dens[np.floor(rows).astype(int), np.floor(cols).astype(int)]) / 0.09
    got = slide_density_scale(rows, cols, pixel_size_um=0.3, sigma_um=1.5)
    assert got == pytest.approx(expected, rel=1e-5)
    sub = [slide_density_scale(rows, cols, pixel_size_um=0.3, sigma_um=1.5, max_spots=150,
                               seed=s) for s in (4, 4, 5)]
    assert sub[0] == sub[1]
    assert sub[2] == pytest.approx(expected, rel=0.25)
    assert slide_density_scale([], [], pixel_size_um=0.3) == 1.0


def test_crops_equal_the_whole_image_with_one_slide_scale():
    rng = np.random.default_rng(4)
    n = 3000
    rows, cols = rng.uniform(0, 128, n), rng.uniform(0, 128, n)
    genes = rng.choice(["a", "b", "c", "d"], n)
    table = pd.DataFrame({"x": cols, "y": rows, "gene": genes})
    emb = learn_gene_embedding([table], pixel_size_um=0.4, n_components=2, bin_um=5.0)
    codes = emb.encode(genes)
    cfg = TranscriptInput(mode="density", sigma_um=1.5, n_gene_channels=2)
    scale = slide_density_scale(rows, cols, pixel_size_um=0.4, sigma_um=cfg.sigma_um)
    kw = dict(pixel_size_um=0.4, slide_scale=scale, embedding=emb)
    whole = transcript_channels(rows, cols, codes, (128, 128), cfg, **kw)
    crop = transcript_channels(rows, cols, codes, (40, 56), cfg, origin=(50, 30), **kw)
    assert whole.shape == (3, 128, 128) and crop.dtype == np.float32
    np.testing.assert_allclose(crop, whole[:, 50:90, 30:86], rtol=1e-5, atol=1e-6)


def two_region_table(rng, height_px=200, width_px=400, per_px=0.25):
    """Left half: genes A0-A4 only; right half: B0-B4 only; same uniform density."""
    n = rng.poisson(per_px * height_px * width_px)
    rows, cols = rng.uniform(0, height_px, n), rng.uniform(0, width_px, n)
    left = cols < width_px / 2
    genes = np.where(left, np.char.add("A", rng.integers(0, 5, n).astype(str)),
                     np.char.add("B", rng.integers(0, 5, n).astype(str)))
    return pd.DataFrame({"x": cols, "y": rows, "gene": genes})


def block_means(channel, col_slice, block=20):
    part = channel[:, col_slice]
    h, w = (part.shape[0] // block) * block, (part.shape[1] // block) * block
    return part[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3)).ravel()


def differ_by_standard_errors(a, b):
    return abs(a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)


def test_gene_channels_separate_two_cell_types_where_density_is_flat():
    rng = np.random.default_rng(5)
    table = two_region_table(rng)
    pixel = 0.5
    emb = learn_gene_embedding([table], pixel_size_um=pixel, n_components=3, bin_um=10.0)
    rows, cols = table["y"].to_numpy(), table["x"].to_numpy()
    scale = slide_density_scale(rows, cols, pixel_size_um=pixel, sigma_um=2.0, max_spots=4000)
    kw = dict(sigma_um=2.0, pixel_size_um=pixel, slide_scale=scale)
    genes = gene_channels(rows, cols, emb.encode(table["gene"]), (200, 400), emb, **kw)
    dens = density_channel(rows, cols, (200, 400), **kw)
    left, right = slice(20, 180), slice(220, 380)  # away from the edge and the boundary
    g_left, g_right = block_means(genes[0], left), block_means(genes[0], right)
    assert differ_by_standard_errors(g_left, g_right) > 3
    assert abs(g_left.mean() - g_right.mean()) > 1.0  # about ±1 per transcript each side
    d_left, d_right = block_means(dens, left), block_means(dens, right)
    assert differ_by_standard_errors(d_left, d_right) < 3
    assert d_left.mean() == pytest.approx(d_right.mean(), rel=0.05)


def test_embedding_is_deterministic_serialisable_and_signed():
    rng = np.random.default_rng(6)
    table = two_region_table(rng, 100, 200)
    emb = learn_gene_embedding([table], pixel_size_um=0.5, n_components=2, bin_um=10.0)
    shuffled = table.iloc[rng.permutation(len(table))]
    again = learn_gene_embedding([shuffled], pixel_size_um=0.5, n_components=2, bin_um=10.0)
    assert emb.genes == again.genes == tuple(sorted(set(table["gene"])))
    np.testing.assert_allclose(emb.vectors, again.vectors, atol=1e-8)
    strongest = np.argmax(np.abs(emb.vectors), axis=0)
    assert (emb.vectors[strongest, [0, 1]] > 0).all()
    # first component separates the gene sets; transcript-weighted RMS is 1
    first = dict(zip(emb.genes, emb.vectors[:, 0], strict=True))
    a = [first[f"A{i}"] for i in range(5)]
    b = [first[f"B{i}"] for i in range(5)]
    assert max(a) < 0 < min(b) or max(b) < 0 < min(a)
    freq = table["gene"].value_counts(normalize=True).reindex(emb.genes).to_numpy()
    np.testing.assert_allclose(freq @ emb.vectors**2, 1.0, rtol=1e-9)
    restored = GeneEmbedding.from_dict(json.loads(json.dumps(emb.to_dict())))
    assert restored.genes == emb.genes and restored.bin_um == emb.bin_um
    np.testing.assert_array_equal(restored.vectors, emb.vectors)
    codes = emb.encode(["B3", "unknown", "A0"])
    assert codes[1] == -1
    vecs = emb.vectors_for_codes(codes)
    np.testing.assert_array_equal(vecs[1], 0.0)
    np.testing.assert_array_equal(vecs[0], emb.vectors[emb.genes.index("B3")])


def test_heatmap_mode_is_upstreams_heatmap():
    rng = np.random.default_rng(7)
    rows, cols = rng.uniform(-10, 74, 50), rng.uniform(-10, 74, 50)
    cfg = TranscriptInput(mode="heatmap")
    out = transcript_channels(rows, cols, None, (64, 64), cfg, origin=(5, 0))
    expected = render_heatmap(np.floor(rows).astype(int), np.floor(cols).astype(int), (64, 64),
                              sigma=7.0, origin=(5, 0))
    np.testing.assert_array_equal(out[0], expected)
    assert TRANSCRIPT_MODES == ("density", "heatmap") and not cfg.needs_slide_scale


def test_config_round_trip_and_bad_input():
    cfg = TranscriptInput(mode="density", sigma_um=1.8, n_gene_channels=3)
    assert TranscriptInput.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.n_channels == 4
    for bad in ({"mode": "max"}, {"sigma_um": 0}, {"sigma_um": -1.0}, {"n_gene_channels": -1},
                {"n_gene_channels": 1.5}, {"colour": 1}):
        with pytest.raises(InputError):
            TranscriptInput.from_dict(bad)
    rows = cols = np.array([1.0, 2.0])
    for pixel in (None, 0.0, -0.2):
        with pytest.raises(InputError, match="pixel_size_um"):
            density_channel(rows, cols, (4, 4), sigma_um=2.0, pixel_size_um=pixel,
                            slide_scale=1.0)
        with pytest.raises(InputError, match="pixel_size_um"):
            slide_density_scale(rows, cols, pixel_size_um=pixel)
    with pytest.raises(InputError, match="sigma"):
        density_map(rows, cols, (4, 4), 0.0)
    with pytest.raises(InputError, match="slide_scale"):
        transcript_channels(rows, cols, None, (4, 4), TranscriptInput(), pixel_size_um=0.2)
    with pytest.raises(InputError, match="embedding"):
        transcript_channels(rows, cols, None, (4, 4), TranscriptInput(n_gene_channels=1),
                            pixel_size_um=0.2, slide_scale=1.0)


def test_saturation_stats_on_known_maps():
    flat = np.full((10, 10), 0.95)
    stats = saturation_stats(flat, reference=1.0)
    assert stats["fraction_high"] == 1.0 and stats["cv"] == pytest.approx(0.0)
    ramp = np.arange(1000, dtype=float).reshape(10, 100)  # p99.9 = 0.999 * 999 = 998.001
    stats = saturation_stats(ramp)
    assert stats["reference"] == pytest.approx(998.001)
    assert stats["fraction_high"] == pytest.approx(101 / 1000)  # 899..999 >= 898.2009
    stats = saturation_stats(ramp, ramp >= 500)
    assert stats["mean_inside"] == pytest.approx(749.5)
    assert stats["contrast"] == pytest.approx(749.5 / 249.5)


def test_channel_storage_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    for channels in (1, 4):
        array = rng.normal(size=(channels, 17, 23)).astype(np.float32)
        path = write_transcript_channels(tmp_path / f"c{channels}.tif", array)
        back = read_transcript_channels(path)
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.tif", "c4.tif"]
    with pytest.raises(InputError):
        write_transcript_channels(tmp_path / "bad.tif", np.zeros((3, 3)))
