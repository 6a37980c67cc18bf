"""One exception type for every user-facing failure.

The CLI prints ``ofaconv: error: <message>`` on one line and exits non-zero. Messages name the
file and, where there is one, the key that is at fault.
"""


class OfaconvError(Exception):
    """A failure caused by the user's input or environment, reported as one line."""

    exit_code = 2

    def __init__(self, message: str, *, path=None, key=None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if key is not None:
            parts.append(f"key '{key}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.detail = message
        self.path = path
        self.key = key


class CheckpointError(OfaconvError):
    """The source checkpoint cannot be read safely or is not an OFA checkpoint."""


class DataError(OfaconvError):
    """Input data (captions, image files, image TSVs) that cannot be used as given."""


class KeyMapError(OfaconvError):
    """A key map is malformed, or a state dict does not follow it."""


class VerificationError(OfaconvError):
    """A parity or structure check failed."""

    exit_code = 3
