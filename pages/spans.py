"""Timing spans of the app's script runs, written only when LMCOMPRESS_SPANS names a file (the bench's browser section).

Each span is one JSON line: its name, wall-clock start and end (epoch seconds, comparable with the browser's
clock on the same machine), how it ended, and any extra fields the caller filled in. Without the variable this
costs one environment lookup per span and writes nothing.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager

ENV = "LMCOMPRESS_SPANS"
_LOCK = threading.Lock()   # sessions run in threads of one process: one line per write, never interleaved


@contextmanager
def span(name: str):
    """Time the block; yields a dict the caller may fill with extra fields for the record."""
    path = os.environ.get(ENV)
    extra: dict = {}
    start = time.time()
    outcome = "ok"
    try:
        yield extra
    except BaseException as exc:   # a rerun or Stop interrupts a script with an exception: recorded, re-raised
        outcome = type(exc).__name__
        raise
    finally:
        if path:
            record = {"span": name, "start": start, "end": time.time(), "outcome": outcome,
                      "thread": threading.get_ident(), **extra}
            with _LOCK, open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record, default=str) + "\n")
