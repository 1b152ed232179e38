"""A whole simulated day of every service in one process on the virtual clock (p2pdoe.cli.virtual_day):
the wall time it takes, its repeats' median, the load the machine was under, and the day's figures
(which must be identical in every repeat: the virtual clock makes the outcome independent of speed).

Run from the repository root:
`.venv/bin/python benchmarks/virtual_day.py [--hours 24] [--repeats 3] [--rolling-max-iterations N]
[--trace INTERVAL ...]`. Besides the day's totals it prints how the rolling rounds ended, the longest
of them, and for each `--trace` interval its rolling round's residuals and price moves from
`dso/progress`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from p2pdoe.cli.virtual_day import VirtualDay  # noqa: E402
from p2pdoe.core import topics  # noqa: E402
from p2pdoe.core.schemas.runtime import Progress, decode_runtime  # noqa: E402
from p2pdoe.io.scenarios import load_scenario  # noqa: E402

QUARTER_HOURS = {"horizon": {"intervals": 96, "dt_h": 0.25}}


def one_day(
    hours: float, rolling_cap: int | None, progress: dict[str, list[Progress]] | None = None
) -> tuple[float, str, dict[str, object]]:
    """`progress`: filled with every round's `dso/progress` messages, by round."""
    options = {} if rolling_cap is None else {"rolling_max_iterations": rolling_cap}

    def record(topic: str, payload: bytes, retained: bool) -> None:
        if progress is not None and topic == topics.DSO_PROGRESS and payload:
            msg = decode_runtime(payload)
            if isinstance(msg, Progress):
                progress.setdefault(msg.round, []).append(msg)

    with tempfile.TemporaryDirectory() as root:
        day = VirtualDay(
            load_scenario("default", QUARTER_HOURS),
            Path(root),
            hours=hours,
            dso_options=options,
            record=record,
        )
        t0 = time.perf_counter()
        results = day.run()
        wall = time.perf_counter() - t0
    rt = results.realtime
    assert rt is not None
    figures = {
        "rolling rounds": len(rt.intervals),
        "iterations": sum(i.iterations for i in rt.intervals),
        "rolling rounds by status": dict(Counter(i.status for i in rt.intervals)),
        "longest rolling rounds (interval: iterations)": ", ".join(
            f"{i.interval}: {i.iterations}" for i in sorted(rt.intervals, key=lambda i: -i.iterations)[:5]
        ),
        "settlements": len(rt.settlements),
        "readings judged": rt.envelope_violations.judged_readings,
        "sustained violations": rt.envelope_violations.count,
        "net EUR": round(sum(s.net_eur for s in rt.settlements), 6),
    }
    return (
        wall,
        json.dumps(rt.model_dump(exclude={"intervals": {"__all__": {"wall_s"}}}), sort_keys=True),
        figures,
    )


def trace(rounds: dict[str, list[Progress]], interval: int, every: int = 5) -> None:
    """One rolling round's residuals and price moves, every `every` iterations and its last."""
    name = next((r for r in rounds if r.endswith(f"-rt{interval:03d}")), None)
    if name is None:
        print(f"no rolling round for interval {interval}")
        return
    said = rounds[name]
    print(
        f"\n{name}: iteration | status | trade residual / eps kW | envelope residual / eps kW | "
        "price move EUR/kWh"
    )
    for p in [*said[::every], said[-1]] if (len(said) - 1) % every else said[::every]:
        print(
            f"  {p.iteration} | {p.status} | {max(p.primal_trade_kw, p.dual_trade_kw):.4f} / "
            f"{p.eps_trade_kw:.4f} | {max(p.primal_envelope_kw, p.dual_envelope_kw):.4f} / "
            f"{p.eps_envelope_kw:.4f} | {p.price_change_max_eur_per_kwh or 0.0:.2e}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rolling-max-iterations", type=int, help="the coordinator's default unless given")
    p.add_argument("--trace", type=int, nargs="*", default=[], help="print these intervals' rolling rounds")
    args = p.parse_args()
    logging.disable(logging.INFO)
    load = os.getloadavg()
    walls, days = [], set()
    figures: dict[str, object] = {}
    rounds: dict[str, list[Progress]] = {}
    for repeat in range(args.repeats):
        kept = rounds if repeat == 0 and args.trace else None
        wall, day, figures = one_day(args.hours, args.rolling_max_iterations, kept)
        walls.append(wall)
        days.add(day)
    print(
        f"{args.hours:g} h of the default day (6 sites, 15-minute intervals, 30 s meter steps), one process"
    )
    print(
        f"wall time per day: median {statistics.median(walls):.1f} s over {args.repeats} runs "
        f"({', '.join(f'{w:.1f}' for w in walls)}); "
        f"load average before: {load[0]:.2f}, {os.cpu_count()} cores"
    )
    print(f"identical days: {'yes' if len(days) == 1 else f'NO ({len(days)} different)'}")
    for name, value in figures.items():
        print(f"  {name}: {value}")
    for interval in args.trace:
        trace(rounds, interval)


if __name__ == "__main__":
    main()
