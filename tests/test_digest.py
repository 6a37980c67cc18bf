"""The source fingerprint (ofaconv.core.digest.state_fingerprint): it binds a conversion to every
byte it read (arguments, tensor metadata, tensor bytes) and to nothing it never reads (optimizer
state), and it falls back to the whole file's sha256 where there is no separate pickle record."""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import threading

import pytest
import torch

from ofaconv.core.digest import (FILE_SCHEME, FINGERPRINT_SCHEME, BackgroundFingerprint, file_sha256,
                                 state_fingerprint)


def _save(path, *, weight=None, moment=None, lr=1e-4, tied=True):
    weight = torch.arange(12.0).reshape(3, 4) if weight is None else weight
    model = {"encoder.w": weight, "encoder.b": torch.ones(4)}
    if tied:
        model["decoder.w"] = weight  # one storage, as torch.save writes a tied parameter
    moment = torch.zeros(100) if moment is None else moment
    torch.save({"model": model, "args": argparse.Namespace(lr=lr), "last_optimizer_state": {"m": moment}}, path)
    return path


def _fingerprint(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, mmap=True, weights_only=True)
    return state_fingerprint(path, checkpoint["model"])


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
    assert state_fingerprint(path, state) == {"scheme": FILE_SCHEME,
                                              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_fingerprint_in_background_and_stopped(tmp_path):
    path = _save(tmp_path / "a.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, mmap=True, weights_only=True)["model"]
    released = []
    assert BackgroundFingerprint(path, state, release=released.append).result() == _fingerprint(path)
    assert len(released) == 2  # the tied alias is hashed (and released) once
    stop = threading.Event()
    stop.set()
    with pytest.raises(concurrent.futures.CancelledError):
        state_fingerprint(path, state, stop=stop)
