"""Batch commands and data readers: counts of items by outcome, the first few examples, and the one
summary line a batch with failed items ends with (``ofaconv: error: N of M images failed (first: ...)``)."""

from __future__ import annotations

EXAMPLES = 10  # examples kept per tally: enough to find the bad rows, bounded on a catalog


class Tally:
    """Counters named by ``FIELDS`` (a subclass lists its own), read and written as attributes,
    plus up to ``EXAMPLES`` examples of what went wrong; ``merge`` adds another rank's tally."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self, examples: list | None = None, **counts: int):
        unknown = set(counts) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no count {sorted(unknown)[0]!r}")
        object.__setattr__(self, "counts", {name: int(counts.get(name, 0)) for name in self.FIELDS})
        object.__setattr__(self, "examples", list(examples or []))

    def __getattr__(self, name: str) -> int:
        counts = self.__dict__.get("counts", {})
        if name in counts:
            return counts[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name not in self.counts:
            raise AttributeError(f"{type(self).__name__} has no count {name!r}")
        self.counts[name] = int(value)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.counts.items())})"

    def bad(self, kind: str, where: str) -> None:
        """Count one item of ``kind`` and keep ``where`` as an example while there is room."""
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{kind}: {where}")

    def merge(self, other: "Tally | dict") -> None:
        other = other.to_dict() if isinstance(other, Tally) else other
        for name in self.FIELDS:
            self.counts[name] += int(other.get(name, 0))
        self.examples.extend(other.get("examples", [])[: max(0, EXAMPLES - len(self.examples))])

    def to_dict(self) -> dict:
        return {**self.counts, "examples": list(self.examples)}


def failure_summary(failed: list[tuple[str, str]], total: int, noun: str = "items", count: int | None = None) -> str:
    """One line for a batch whose items ``failed`` as (where, reason): how many (``count``, default
    ``len(failed)``) of ``total``, and the first."""
    where, reason = failed[0]
    count = len(failed) if count is None else count
    return f"{count} of {total} {noun} failed (first: {where}: {' '.join(str(reason).split())})"
