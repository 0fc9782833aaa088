"""What the resumable training streams share (`MixedBlockStream` of distill, `ChatRowStream` of
sft): the position is a small JSON-able state stamped with its format version, the data's
fingerprint and the seed, so a checkpoint's position is refused on other data, another seed or
another format, and otherwise continues with exactly the batches the saved stream would have
served."""

from __future__ import annotations

from typing import Any

from minima_cli.errors import MinimaError


class ResumableStream:
    """An endless iterator of batches whose position is `state_dict()`; subclasses define
    `__next__`, `position()` (their part of the state) and `restore()` (its inverse, raising
    `MinimaError` for a position that does not fit their data)."""

    state_version = 1

    def __init__(self, *, seed: int, fingerprint: str):
        self.seed, self.fingerprint = seed, fingerprint

    def __iter__(self) -> ResumableStream:
        return self

    def position(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-able."""
        return {"version": self.state_version, "fingerprint": self.fingerprint,
                "seed": self.seed, **self.position()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved over different data."""
        if not isinstance(state, dict) or state.get("version") != self.state_version:
            raise MinimaError("unsupported data position (saved by another minima version?)")
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            raise MinimaError("the saved data position belongs to a different run (data mismatch)")
        try:
            self.restore(state)
        except (KeyError, TypeError, ValueError) as e:
            raise MinimaError(f"malformed data position: {type(e).__name__} {e}") from None
