"""Tests for the flow-target cache (GeneSegNet.dynamics.flow_targets.FlowTargetCache): a hit
returns what a fresh computation gives, an edit or another mode recomputes, and the disk
cache survives a new process and a corrupt file."""

from __future__ import annotations

import numpy as np
import pytest

import GeneSegNet.dynamics.flow_targets as ft
from GeneSegNet.dynamics.flow_targets import (
    FlowTargetCache,
    compute_flow_targets,
    label_key,
    labels_to_flow_targets,
)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = ft.labels_to_flow_targets

    def counting(labels, device="cpu", mode="isolated"):
        calls.append((labels.copy(), mode))
        return real(labels, device=device, mode=mode)

    monkeypatch.setattr(ft, "labels_to_flow_targets", counting)
    return calls


def two_cells() -> np.ndarray:
    labels = np.zeros((10, 12), np.int32)
    labels[1:8, 1:6] = 1
    labels[2:9, 6:11] = 2
    return labels


def test_cache_hit_same_content(spy):
    cache = FlowTargetCache()
    labels = two_cells()
    first = cache.get(labels)
    second = cache.get(labels.copy())  # a different array with the same content
    assert len(spy) == 1 and (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, labels_to_flow_targets(labels))


def test_cache_changed_label_recomputes(spy):
    cache = FlowTargetCache()
    labels = two_cells()
    before = cache.get(labels)
    labels[8, 1:6] = 1  # edit the label in place
    after = cache.get(labels)
    assert len(spy) == 2
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, labels_to_flow_targets(labels))


def test_cache_key_depends_on_shape_and_dtype():
    labels = two_cells()
    keys = {
        label_key(labels),
        label_key(labels.reshape(12, 10)),
        label_key(labels.astype(np.uint32)),
        label_key(labels.astype(np.int64)),
    }
    assert len(keys) == 4
    assert label_key(labels) == label_key(np.asfortranarray(labels))
    assert label_key(labels) == label_key(labels, "isolated")  # the default mode
    assert label_key(labels, "isolated") != label_key(labels, "upstream")


def test_cache_keeps_modes_apart(spy, tmp_path):
    labels = two_cells()
    for cache in (FlowTargetCache(), FlowTargetCache(cache_dir=tmp_path)):
        spy.clear()
        isolated = cache.get(labels)
        upstream = cache.get(labels, mode="upstream")
        assert [mode for _, mode in spy] == ["isolated", "upstream"]
        assert not np.array_equal(isolated, upstream)
        np.testing.assert_array_equal(isolated, labels_to_flow_targets(labels))
        np.testing.assert_array_equal(
            upstream, labels_to_flow_targets(labels, mode="upstream")
        )
        # A cache made for upstream's mode serves it by default, from the same entries.
        leaky = FlowTargetCache(cache_dir=cache.cache_dir, mode="upstream")
        if cache.cache_dir is None:
            leaky._memory = cache._memory
        np.testing.assert_array_equal(leaky.get(labels), upstream)
        assert len(spy) == 2 and leaky.hits == 1
    assert len(list(tmp_path.iterdir())) == 2


def test_compute_flow_targets_mode(spy):
    labels = two_cells()
    leaky = FlowTargetCache(mode="upstream")
    want = labels_to_flow_targets(labels, mode="upstream")
    np.testing.assert_array_equal(compute_flow_targets([labels], cache=leaky)[0], want)
    np.testing.assert_array_equal(compute_flow_targets([labels], mode="upstream")[0], want)
    np.testing.assert_array_equal(
        compute_flow_targets([labels])[0], labels_to_flow_targets(labels)
    )
    assert [mode for _, mode in spy] == ["upstream", "upstream", "isolated"]


def test_cache_returns_copies(spy):
    cache = FlowTargetCache()
    labels = two_cells()
    cache.get(labels)[:] = -1.0
    np.testing.assert_array_equal(cache.get(labels), labels_to_flow_targets(labels))


def test_disk_cache_round_trip(tmp_path, spy):
    folder = tmp_path / "flows"
    labels = two_cells()
    first = FlowTargetCache(cache_dir=folder).get(labels)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{label_key(labels)}.npy"]  # no temp files left behind
    fresh = FlowTargetCache(cache_dir=folder)  # e.g. a new process
    second = fresh.get(labels)
    assert len(spy) == 1 and fresh.hits == 1
    np.testing.assert_array_equal(first, second)
    # A corrupt file is recomputed and rewritten.
    (folder / files[0]).write_bytes(b"not a npy file")
    third = FlowTargetCache(cache_dir=folder).get(labels)
    assert len(spy) == 2
    np.testing.assert_array_equal(first, third)
    np.testing.assert_array_equal(np.load(folder / files[0]), first)


def test_compute_flow_targets_uses_cache(spy):
    a = two_cells()
    yy, xx = np.mgrid[:10, :12]
    b = ((yy - 5) ** 2 + (xx - 6) ** 2 <= 9).astype(np.int32)  # one disc
    cache = FlowTargetCache()
    targets = compute_flow_targets([a, b, a.copy(), b], cache=cache, progress=False)
    assert len(spy) == 2 and cache.hits == 2
    for lab, target in zip([a, b, a, b], targets, strict=True):
        np.testing.assert_array_equal(target, labels_to_flow_targets(lab))
    uncached = compute_flow_targets([a, b])
    assert len(uncached) == 2 and len(spy) == 4
