"""The README and docs/ as a user follows them: every `p2pdoe` command they show parses, every option
they give a service exists, and every file of the repository they name is there."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from p2pdoe.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]
FENCE = re.compile(r"^```(?:sh|bash|console|shell)?\n(.*?)^```", re.M | re.S)
SERVICES = {"edge-agent": "edge_agent", "dso-coordinator": "dso_coordinator", "meter-sim": "meter_sim"}
TOP = (
    "p2pdoe/",
    "tests/",
    "docs/",
    "deploy/",
    "docker/",
    "benchmarks/",
    "edge_agent/",
    "dso_coordinator/",
    "meter_sim/",
    ".ci/",
)
NAMED = re.compile(r"`((?:" + "|".join(re.escape(t) for t in TOP) + r")[\w./-]+)`")


def _commands() -> list[tuple[str, str]]:
    """(doc, command line) of every command in a fenced block, continuations joined, prompts cut."""
    out = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ").split(" #", 1)[0].strip()
                if line.split(" ", 1)[0] in ("p2pdoe", *SERVICES):
                    out.append((doc.name, line))
    return out


def _literal(line: str) -> bool:
    """A command as typed, not a synopsis (`[--x]`, `a|b`, `...`) or one with shell variables."""
    return not any(mark in line for mark in ("[", "|", "...", "$", "<", "…"))


COMMANDS = _commands()


def test_the_docs_show_commands() -> None:
    assert len([c for c in COMMANDS if c[1].startswith("p2pdoe ")]) >= 10  # 14 when written


@pytest.mark.parametrize(
    ("doc", "line"), [c for c in COMMANDS if c[1].startswith("p2pdoe ") and _literal(c[1])]
)
def test_every_p2pdoe_command_in_the_docs_parses(doc: str, line: str) -> None:
    argv = [a for a in shlex.split(line)[1:] if a not in (">", "&")]
    if ">" in line:
        argv = shlex.split(line.split(">", 1)[0])[1:]
    build_parser().parse_args(argv)  # exits (status 2) on an unknown option or a bad value


@cache
def _help(program: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", SERVICES[program], "--help"], capture_output=True, text=True, timeout=120
    )
    return done.stdout


@pytest.mark.parametrize(("doc", "line"), [c for c in COMMANDS if c[1].split(" ", 1)[0] in SERVICES])
def test_every_service_option_in_the_docs_exists(doc: str, line: str) -> None:
    program = line.split(" ", 1)[0]
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", _help(program)), (doc, program, option)


def test_every_repository_file_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        for name in NAMED.findall(doc.read_text(encoding="utf-8")):
            path = name.rstrip(".,:;)")
            if any(ch in path for ch in "<*{") or path.startswith("p2pdoe/v1"):  # a pattern, or a topic
                continue
            if not (ROOT / path.split("::", 1)[0]).exists():
                missing.append(f"{doc.name}: {path}")
    assert missing == []
