"""Peak resident memory of an edge agent (VmHWM), and what it is made of. Prints Markdown.

    .venv/bin/python benchmarks/edge_memory.py [--scenarios default synthetic-20-peers4] [--imports-only]

1. Imports: each row imports one more module in a fresh interpreter and reads the interpreter's VmHWM
   from /proc/self/status, so a row's increment is what that module adds on top of the rows above it
   (the libraries an edge cannot do without first, then the edge agent itself). Its resident memory
   is split into anonymous memory (what the code allocates) and file pages (the shared libraries'
   code mapped in), as the process reads them after that row; how many of a library's file pages are
   resident depends on the kernel's page cache as well as on the code.
2. A round: every site's edge agent in its own process (`python -m edge_agent`) against the
   coordinator over a Mosquitto the benchmark starts (the embedded broker if Mosquitto is missing);
   each agent reports its own VmHWM at the end of the round (`SiteReport.rss_mb`). Never `ru_maxrss`:
   on Linux a child inherits its parent's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime_processes import distributed  # this folder is on the path of a script run from it

from p2pdoe.services.broker import broker_for_tests

# The libraries an edge agent needs, in the order it imports them, then the agent itself: a row each.
IMPORTS = (
    ("numpy", ["numpy"]),
    (
        "numpy.testing, .random, .ma, .f2py (scipy.sparse's array-API layer imports them)",
        ["numpy.testing", "numpy.random", "numpy.ma", "numpy.f2py"],
    ),
    ("scipy.sparse", ["scipy.sparse"]),
    ("osqp (and jinja2, for its code generation)", ["osqp"]),
    ("pydantic", ["pydantic"]),
    ("paho-mqtt (with asyncio and ssl)", ["asyncio", "ssl", "paho.mqtt.client"]),
    ("pydantic-settings", ["pydantic_settings"]),
    ("the edge agent (edge_agent.__main__)", ["edge_agent.__main__"]),
)

PROBE = """
import importlib, json, sys
def status():
    with open("/proc/self/status") as f:
        fields = dict(l.split(":", 1) for l in f)
    return [int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")]
peaks = [status()]
for row in json.loads(sys.argv[1]):
    for name in row:
        importlib.import_module(name)
    peaks.append(status())
print(json.dumps(peaks))
"""


def import_table() -> list[str]:
    rows = json.dumps([modules for _, modules in IMPORTS])
    proc = subprocess.run([sys.executable, "-c", PROBE, rows], capture_output=True, text=True, check=True)
    peaks = json.loads(proc.stdout)
    labels = ["the interpreter", *(label for label, _ in IMPORTS)]
    lines = [
        "| import | adds MB | VmHWM MB | of which anonymous (RssAnon) | of which files (RssFile) |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, before, (mb, anon, files) in zip(
        labels, [0.0, *(p[0] for p in peaks[:-1])], peaks, strict=True
    ):
        lines.append(f"| {label} | {mb - before:.1f} | {mb:.1f} | {anon:.1f} | {files:.1f} |")
    return lines


def round_row(scenario: str, url: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        r = distributed(scenario, url, Path(tmp))
    assert r.runtime is not None
    peaks = sorted(site.rss_mb or 0.0 for site in r.runtime.sites)
    median = peaks[len(peaks) // 2]
    return f"| {scenario} | {len(peaks)} | {r.solver.iterations} | {median:.1f} | {peaks[-1]:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenarios", nargs="+", default=["default", "synthetic-20-peers4"])
    parser.add_argument("--imports-only", action="store_true")
    args = parser.parse_args()
    print(f"{sys.platform}, Python {sys.version.split()[0]}\n")
    print("\n".join(import_table()))
    if args.imports_only:
        return
    print("\n| scenario | edge agents | iterations | VmHWM median MB | VmHWM max MB |\n|---|--:|--:|--:|--:|")
    with broker_for_tests() as broker:
        for scenario in args.scenarios:
            print(round_row(scenario, broker.url), flush=True)


if __name__ == "__main__":
    main()
