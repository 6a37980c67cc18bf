"""ofaconv.core.featcache: keyed by id + weights fingerprint, invalidated on change, multi-writer safe."""

import pickle

import pytest
import torch

from ofaconv.core.featcache import CacheError, FeatureCache, fingerprint


def test_fingerprint_tracks_weights_and_settings():
    lin = torch.nn.Linear(3, 2)
    fp = fingerprint(lin, image_size=224)
    assert fp == fingerprint(lin.state_dict(), image_size=224)
    assert fp != fingerprint(lin, image_size=336)
    with torch.no_grad():
        lin.weight[0, 0] += 1e-6
    assert fp != fingerprint(lin, image_size=224)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_roundtrip_and_reopen(tmp_path, dtype):
    fp = fingerprint(None, a=1)
    cache = FeatureCache(tmp_path, namespace="img", fingerprint=fp, dtype=dtype)
    feats = torch.randn(3, 8)
    assert cache.missing(["a", "b", "a", "c"]) == ["a", "b", "c"]
    cache.put_many(["a", "b", "c"], feats)
    tol = 0 if dtype is None else 1e-2
    torch.testing.assert_close(cache.get_many(["c", "a"]), feats[[2, 0]], atol=tol, rtol=tol)
    again = FeatureCache(tmp_path, namespace="img", fingerprint=fp, dtype=dtype)
    assert sorted(again.ids()) == ["a", "b", "c"] and again.missing(["a", "d"]) == ["d"]
    assert again.get("b").dtype == torch.float32
    clone = pickle.loads(pickle.dumps(again))  # DataLoader workers get a picklable copy
    torch.testing.assert_close(clone.get("a"), again.get("a"))


def test_new_fingerprint_invalidates_and_other_writers_are_seen(tmp_path):
    old = FeatureCache(tmp_path, namespace="img", fingerprint=fingerprint(None, v=1))
    old.put("x", torch.ones(2))
    new = FeatureCache(tmp_path, namespace="img", fingerprint=fingerprint(None, v=2))
    assert len(new) == 0 and not old.dir.exists()
    other = FeatureCache(tmp_path, namespace="img", fingerprint=new.fingerprint)
    other.put("y", torch.zeros(2))
    assert "y" not in new
    torch.testing.assert_close(new.get("y"), torch.zeros(2))  # get() refreshes on a miss


def test_errors_are_reported(tmp_path):
    cache = FeatureCache(tmp_path, namespace="img", fingerprint=fingerprint(None))
    with pytest.raises(KeyError):
        cache.get("nope")
    with pytest.raises(CacheError):
        cache.put_many(["a"], torch.ones(2, 3))
    with pytest.raises(CacheError):
        FeatureCache(tmp_path, namespace="../x", fingerprint="ab")
    (cache.dir / "broken.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CacheError, match="broken.safetensors"):
        FeatureCache(tmp_path, namespace="img", fingerprint=cache.fingerprint)
