"""Results as JSON lines, written as they arrive, so an interrupted sweep resumes without recomputing.

Each line is one finished attempt: {"key": the configuration's key, "protocol": the model and measurement
settings, "result": the plain-data result} or, for a failure, "error" instead of "result". A result counts
as done for a later run only under the same key *and* protocol: changing eval_tokens recomputes everything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class ResultLog:
    def __init__(self, path: str | Path, protocol: dict, resume: bool = False):
        """Refuses to append to a non-empty file unless ``resume`` (so a finished sweep is never mixed up)."""
        self.path, self.protocol = Path(path), json.loads(canonical(protocol))
        if not resume and self.path.is_file() and self.path.stat().st_size > 0:
            raise ValueError(f"{self.path} already holds results: resume it, or write to another file")
        if self.path.parent and not self.path.parent.is_dir():
            raise ValueError(f"the folder of {self.path} does not exist")

    def finished(self) -> dict[str, dict]:
        """key -> result of every success recorded under this protocol (a torn last line is ignored)."""
        done: dict[str, dict] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the previous run was killed mid-write
            if isinstance(record, dict) and record.get("protocol") == self.protocol and "result" in record:
                done[record["key"]] = record["result"]
        return done

    def append(self, key: str, result: dict | None = None, error: str = "") -> None:
        record = {"key": key, "protocol": self.protocol}
        record.update({"result": result} if result is not None else {"error": error})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the next task's result: a killed sweep loses nothing finished
