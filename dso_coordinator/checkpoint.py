"""The agreement whose envelopes stand, and the coordinator's checkpoint of it.

After every round the rolling horizon keeps (and, with `--checkpoint`, saves) what it needs of the
agreement: the granted boxes from its first interval on, and its final agreed values, prices and
penalties as a warm start. A coordinator restarted mid-day loads it, publishes the envelope in force
at once (the grants were safe together when agreed, and still are: safety depends on the boxes, not
on the sites' state), and warm-starts its next round from it, moved on by the intervals that passed.
A checkpoint of another day, interval length or horizon is ignored with a warning.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from p2pdoe.core.coordinator.standing import Standing, standing_from

__all__ = ["Standing", "load", "save", "standing_from"]
log = logging.getLogger("dso_coordinator.checkpoint")


def save(path: Path, standing: Standing) -> None:
    """Write atomically: a crash leaves the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(standing.model_dump_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, day_start: datetime, interval_s: int, intervals: int) -> Standing | None:
    """The checkpoint at `path` if it belongs to this day, else None (with a warning why)."""
    if not path.exists():
        return None
    try:
        standing = Standing.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        log.warning("ignored the checkpoint %s: unreadable (%s)", path, str(exc).splitlines()[0])
        return None
    mine = (day_start, interval_s, intervals)
    theirs = (standing.day_start, standing.interval_s, standing.intervals)
    if theirs != mine:
        log.warning("ignored the checkpoint %s: it is of another day (%s, not %s)", path, theirs, mine)
        return None
    return standing
