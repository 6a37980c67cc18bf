"""What the core and the publisher ask of an OFA folder (protocol: :mod:`ofaconv.core.registry`)."""

from __future__ import annotations

__all__ = ["verify_folder"]


def verify_folder(folder, against=None, *, ema=None):
    from .verify import verify_folder as run

    return run(folder, against, ema=ema)
