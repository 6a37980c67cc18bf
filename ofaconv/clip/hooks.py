"""What the core and the publisher ask of a CLIP folder (protocol: :mod:`ofaconv.core.registry`)."""

from __future__ import annotations

__all__ = ["verify_folder"]


def verify_folder(folder, against=None, *, ema=None):
    from ofaconv.core.errors import OfaconvError

    raise OfaconvError("verifying CLIP folders is not wired yet", path=folder)
