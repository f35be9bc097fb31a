"""pages/spans.py: a span is written only when LMCOMPRESS_SPANS names a file, with how the block ended."""
import json

import pytest

from pages.spans import ENV, span


def test_spans_are_written_with_their_outcome(tmp_path, monkeypatch):
    path = tmp_path / "spans.jsonl"
    monkeypatch.setenv(ENV, str(path))
    with span("script") as extra:
        extra["stages"] = {"size": 0.5}
    with pytest.raises(KeyboardInterrupt):   # a rerun interrupts a script with an exception: kept, re-raised
        with span("evaluate"):
            raise KeyboardInterrupt
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert (first["span"], first["outcome"], first["stages"]) == ("script", "ok", {"size": 0.5})
    assert first["start"] <= first["end"]
    assert (second["span"], second["outcome"]) == ("evaluate", "KeyboardInterrupt")


def test_nothing_is_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with span("script"):
        pass
    assert list(tmp_path.iterdir()) == []
