"""Every site on its default envelope: the coordinator of the default scenario (96 x 15 min, a reading
every 30 s) is killed at 00:50 and stays away; each sharing rule of the defaults (docs/formulation.md)
in turn. Prints a Markdown row per rule: sustained violations per site and the worst excess, judged
from what the broker shows (the meters' readings against the envelopes in force, as the coordinator's
observer judges them); with the defaults as a daily profile and as one static box. The outcome is the
same on every run and any machine (the virtual clock).

Run from the repository root: `.venv/bin/python benchmarks/silent_dso.py [HOURS]` (default 6).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from p2pdoe.cli.virtual_day import VirtualDay  # noqa: E402
from p2pdoe.core import topics  # noqa: E402
from p2pdoe.core.allocation import SHARINGS  # noqa: E402
from p2pdoe.core.realtime.observer import ViolationObserver  # noqa: E402
from p2pdoe.core.schemas.runtime import Doe, MeterReading  # noqa: E402
from p2pdoe.io.scenarios import load_scenario  # noqa: E402

S = load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})
KILLED_AT = timedelta(minutes=50)


def silent_dso_day(sharing: str, hours: float, profile: bool = True) -> ViolationObserver:
    observer = ViolationObserver()

    def record(topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse(topic)
        if not payload or parsed is None or parsed.area != "site":
            return
        if parsed.kind in ("doe", "doe/default"):
            observer.envelope(parsed.kind, Doe.model_validate_json(payload))
        elif parsed.kind == "meter":
            observer.reading(MeterReading.model_validate_json(payload))

    with tempfile.TemporaryDirectory() as root:
        day = VirtualDay(
            S, Path(root), hours=hours, record=record, until=timedelta(hours=hours),
            dso_options={"default_sharing": sharing, "default_profile": profile},
        )  # fmt: skip
        day.at(KILLED_AT, lambda: day.kill("dso"))
        day.run_until_end()
    return observer


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)
    hours = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    print(
        f"| defaults | sharing rule | sustained violations in {hours:g} h (by site) | worst excess (kW) "
        "| readings judged |"
    )
    print("|---|---|---|--:|--:|")
    for profile in (True, False):
        for sharing in SHARINGS:
            o = silent_dso_day(sharing, hours, profile)
            by_site = ", ".join(f"{k} {v}" for k, v in sorted(o.by_site().items())) or "none"
            worst = max((v.worst_kw for v in o.violations), default=0.0)
            shape = "profile" if profile else "static"
            print(
                f"| {shape} | {sharing} | {len(o.violations)}: {by_site} | {worst:.1f} | {o.judged} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
