"""The default executor: every task in this process, one after another, on the caller's model.

It gives the same results as calling the task functions in a loop (the sweep's results before executors
existed) and the same failure handling as the Ray executor: an exception is reported and the task tried
once more; compress.Cancelled and KeyboardInterrupt stop everything.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from lmcompress_core.execute.base import RETRIES, Outcome
from lmcompress_core.execute.tasks import TASKS


class SerialExecutor:
    name = "serial"
    remote = False

    def __init__(self, tasks: Mapping[str, Callable] | None = None):
        """``tasks`` overrides functions of tasks.TASKS by name (in-process only, e.g. an instrumented evaluate)."""
        self.tasks = {**TASKS, **(tasks or {})}

    def describe(self) -> str:
        return "serial (in this process, one task at a time)"

    def release(self) -> None:
        """Nothing to free: the caller's process is the worker."""

    def close(self) -> None:
        """Nothing to stop."""

    def map(self, loaded, task: str, payloads: Sequence[dict], options: dict | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Outcome]:
        from lmcompress_core.compress import Cancelled

        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(self.tasks)}")
        fn = self.tasks[task]
        for index, payload in enumerate(payloads):
            for attempt in range(1, RETRIES + 2):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"stopped before task {index + 1} of {len(payloads)}")
                try:
                    result = fn(loaded, payload, should_stop=should_stop, **(options or {}))
                except Cancelled:
                    raise
                except Exception as exc:  # reported and retried; the other tasks still run
                    yield Outcome(index, None, _one_line(exc), attempt, attempt <= RETRIES, "in-process")
                    continue
                yield Outcome(index, result, "", attempt, False, "in-process")
                break


def _one_line(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: " + " ".join(str(exc).split()))[:300]
