"""Records the fsyncs and renames a write makes, in order, with the paths they touch (Linux: an fsync's
file is read from /proc/self/fd), so tests can check that data reaches the disk before the rename that
publishes it, and the rename before the folder's fsync."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def record_disk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """From now on, every os.fsync appends ('fsync', path) and every os.replace ('replace', 'src -> dst')."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recorded_replace(source, target) -> None:
        events.append(("replace", f"{Path(source).resolve()} -> {Path(target).resolve()}"))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return events
