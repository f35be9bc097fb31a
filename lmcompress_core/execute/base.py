"""What every executor shares: the Outcome of one task and the Executor protocol.

An executor runs one named task (see tasks.py) over a list of plain-data payloads against a loaded model
and yields an Outcome per attempt in completion order. Only plain data (dicts of numbers and strings)
goes in and comes out, so the same payloads can cross process and machine boundaries.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

RETRIES = 1   # a failed or killed task runs once more before it is reported as failed


@dataclass(frozen=True)
class Outcome:
    index: int                 # position of the payload in the list given to map
    result: dict | None        # the task's plain-data result; None when this attempt failed
    error: str = ""            # one line saying what went wrong ("" on success)
    attempt: int = 1           # 1 for the first try, 2 for the retry
    retrying: bool = False     # True when this failure will be tried again
    worker: str = ""           # where it ran, e.g. "pid 1234" or "in-process"

    @property
    def ok(self) -> bool:
        return self.result is not None


class Executor(Protocol):
    name: str        # "serial" | "ray"
    remote: bool     # True when tasks run in other processes (payloads and results must be plain data)

    def describe(self) -> str:
        """One line for people: which backend, where, with what resources per task."""

    def map(self, loaded, task: str, payloads: Sequence[dict], options: dict | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Outcome]:
        """Run ``task`` on every payload; yield each attempt's Outcome as it finishes."""

    def release(self) -> None:
        """Free the workers (and what they reserved); the backend stays up for the next call."""

    def close(self) -> None:
        """Free the workers and stop the backend if this executor started it."""
