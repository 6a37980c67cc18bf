"""The source fingerprint (ofaconv.core.digest.state_fingerprint): it binds a conversion to every
byte it read (arguments, tensor metadata, tensor bytes: hashed, or named where the conversion wrote
them unchanged and covered by the weight files' manifest entries) and to nothing it never reads
(optimizer state), and it falls back to the whole file's sha256 where there is no separate pickle
record."""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import threading

import pytest
import torch

from ofaconv.core.digest import (FILE_SCHEME, FINGERPRINT_SCHEME, LEGACY_SCHEME, BackgroundFingerprint,
                                 file_sha256, state_fingerprint)

FILES = {"model.safetensors": {"sha256": "ab" * 32, "size": 100}}


def _save(path, *, weight=None, moment=None, lr=1e-4, tied=True):
    weight = torch.arange(12.0).reshape(3, 4) if weight is None else weight
    model = {"encoder.w": weight, "encoder.b": torch.ones(4)}
    if tied:
        model["decoder.w"] = weight  # one storage, as torch.save writes a tied parameter
    moment = torch.zeros(100) if moment is None else moment
    torch.save({"model": model, "args": argparse.Namespace(lr=lr), "last_optimizer_state": {"m": moment}}, path)
    return path


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, mmap=True, weights_only=True)["model"]


def _fingerprint(path, **options):
    return state_fingerprint(path, _load(path), **({"files": FILES} | options))


def test_same_bytes_same_fingerprint_and_optimizer_state_is_not_read(tmp_path):
    first = _fingerprint(_save(tmp_path / "a.pt"))
    assert first["scheme"] == FINGERPRINT_SCHEME
    assert _fingerprint(_save(tmp_path / "b.pt")) == first
    other_moments = _save(tmp_path / "c.pt", moment=torch.full((100,), 7.0))
    assert file_sha256(other_moments) != file_sha256(tmp_path / "a.pt")
    assert _fingerprint(other_moments) == first


@pytest.mark.parametrize("change", ["one_weight", "argument", "tying"])
def test_any_byte_the_conversion_reads_changes_it(tmp_path, change):
    base = _fingerprint(_save(tmp_path / "base.pt"))
    if change == "one_weight":
        weight = torch.arange(12.0).reshape(3, 4)
        weight[2, 3] = torch.nextafter(weight[2, 3], torch.tensor(100.0))
        changed = _save(tmp_path / "x.pt", weight=weight)
    elif change == "argument":
        changed = _save(tmp_path / "x.pt", lr=2e-4)
    else:
        changed = _save(tmp_path / "x.pt", tied=False)
    assert _fingerprint(changed) != base


def test_legacy_file_is_hashed_whole(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(3)}}, path, _use_new_zipfile_serialization=False)
    state = torch.load(path, weights_only=True)["model"]
    assert state_fingerprint(path, state, files=FILES) == {"scheme": FILE_SCHEME,
                                              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_fingerprint_in_background_and_stopped(tmp_path):
    path = _save(tmp_path / "a.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, mmap=True, weights_only=True)["model"]
    released = []
    assert BackgroundFingerprint(path, state, release=released.append).result(FILES) == _fingerprint(path)
    assert len(released) == 2  # the tied alias is hashed (and released) once
    stop = threading.Event()
    stop.set()
    with pytest.raises(concurrent.futures.CancelledError):
        state_fingerprint(path, state, files=FILES, stop=stop)


def test_written_tensors_are_named_and_bound_through_the_weight_files(tmp_path):
    """A tensor written unchanged is not hashed again: its name and the weight files' manifest
    entries (whose sha256 covers its bytes) take its place, so any change of those changes it."""
    path = _save(tmp_path / "a.pt")
    written = {"encoder.b": "encoder.bias"}
    named = _fingerprint(path, written=written)
    assert named != _fingerprint(path)
    assert _fingerprint(path, written={"encoder.b": "encoder.other"}) != named
    other_files = {"model.safetensors": {"sha256": "cd" * 32, "size": 100}}
    assert _fingerprint(path, written=written, files=other_files) != named
    assert _fingerprint(path, written=written, files={**FILES, "extra.safetensors": FILES["model.safetensors"]}) \
        != named
    # the written tensor's own bytes are left to the files (verify --against compares them with the folder's)
    changed = _save(tmp_path / "b.pt", moment=torch.zeros(100))
    state = _load(changed)
    state["encoder.b"] = torch.full((4,), 2.0)
    assert state_fingerprint(changed, state, written=written, files=FILES) == named


def test_legacy_scheme_hashes_every_tensor_and_takes_no_files(tmp_path):
    path = _save(tmp_path / "a.pt")
    state = _load(path)
    legacy = state_fingerprint(path, state, scheme=LEGACY_SCHEME)
    assert legacy["scheme"] == LEGACY_SCHEME and legacy != _fingerprint(path)
    with pytest.raises(ValueError):
        state_fingerprint(path, state, scheme=LEGACY_SCHEME, files=FILES)
    with pytest.raises(ValueError):
        state_fingerprint(path, state, written={"encoder.b": "b"}, scheme=LEGACY_SCHEME)
    with pytest.raises(ValueError):
        state_fingerprint(path, state)  # the current scheme ends with the weight files
