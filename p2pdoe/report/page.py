"""A run's one-page report, written next to its results: `report.md`, and `report.html` with the
plots embedded (one file an engineer can send to a colleague). The day, the tables, the checks, the
plots, and the exact command and version that produced them."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2pdoe.core.schemas.results import NetworkState, Results


@dataclass(frozen=True)
class Table:
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Page:
    title: str
    command: str
    version: str
    facts: Sequence[tuple[str, str]] = ()
    tables: Sequence[Table] = ()
    checks: Sequence[Check] = ()
    figures: Sequence[Path] = field(default_factory=tuple)


def write_page(page: Page, out: Path) -> tuple[Path, Path]:
    """report.md (plots by relative path) and report.html (plots embedded) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md, page_html = out / "report.md", out / "report.html"
    md.write_text(markdown(page, out), encoding="utf-8")
    page_html.write_text(to_html(page), encoding="utf-8")
    return md, page_html


def day_facts(r: Results) -> list[tuple[str, str]]:
    """The day a results file is of, in words."""
    return [
        ("scenario", r.scenario),
        (
            "feeder",
            f"{r.feeder.name}, v0 {r.feeder.v0_pu:g} p.u., "
            f"limits {r.feeder.vmin_pu:g}-{r.feeder.vmax_pu:g} p.u.",
        ),
        ("communities", ", ".join(c.id for c in r.communities)),
        ("day", f"from {r.start}, {r.intervals} intervals of {r.dt_h:g} h"),
    ]


def network_checks(name: str, r: Results) -> list[Check]:
    """The AC power flow at the schedule and at both envelope corners (the safety claim)."""
    ac = r.ac_check
    parts = [("schedule", ac.schedule), ("upper corner", ac.upper_corner), ("lower corner", ac.lower_corner)]
    return [Check(f"{name}: AC power flow at the {where}", _holds(s), _state(s)) for where, s in parts]


def _holds(s: NetworkState) -> bool:
    return s.converged and s.voltage_violations == 0 and s.thermal_violations == 0


def _state(s: NetworkState) -> str:
    return (
        f"V {s.vmin_pu:.4f} (bus {s.vmin_bus}, interval {s.vmin_interval}) to {s.vmax_pu:.4f} "
        f"(bus {s.vmax_bus}, interval {s.vmax_interval}) p.u.; loading up to {s.max_loading_pct:.1f} % "
        f"(branch {s.max_loading_branch}); {s.voltage_violations} voltage and {s.thermal_violations} "
        "thermal violations"
    )


# -- Markdown ----------------------------------------------------------------------------------------


def markdown(page: Page, out: Path) -> str:
    lines = [f"# {page.title}", "", f"`{page.command}` (p2pdoe {page.version})", ""]
    if page.facts:
        lines += [f"- **{k}**: {v}" for k, v in page.facts] + [""]
    if page.checks:
        lines += ["## Checks", ""]
        lines += [f"- {'PASS' if c.ok else 'FAIL'} **{c.name}**: {c.detail}" for c in page.checks] + [""]
    for t in page.tables:
        lines += [f"## {t.title}", "", _md_table(t), ""]
    if page.figures:
        lines += ["## Plots", ""]
        lines += [f"![{f.stem}]({_relative(f, out)})" for f in page.figures] + [""]
    return "\n".join(lines)


def _md_table(t: Table) -> str:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(t.header), "|---" + "|---:" * (len(t.header) - 1) + "|", *map(row, t.rows)])


def _relative(path: Path, out: Path) -> str:
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


# -- HTML --------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child, th:first-child { text-align: left; }
.pass { color: #176317; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 14px; color: #555; } code { background: #f4f4f4; padding: 1px 4px; }
"""


def to_html(page: Page) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(page.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(page.title)}</h1>",
        f"<p><code>{e(page.command)}</code> (p2pdoe {e(page.version)})</p>",
    ]
    if page.facts:
        parts.append("<ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in page.facts) + "</ul>")
    if page.checks:
        parts.append("<h2>Checks</h2><ul>")
        for c in page.checks:
            mark = '<span class="pass">PASS</span>' if c.ok else '<span class="fail">FAIL</span>'
            parts.append(f"<li>{mark} <b>{e(c.name)}</b>: {e(c.detail)}</li>")
        parts.append("</ul>")
    parts += [_html_table(t) for t in page.tables]
    if page.figures:
        parts.append("<h2>Plots</h2>")
        parts += [_figure(f) for f in page.figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<h2>{e(t.title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    image = f'<img alt="{name}" src="data:image/png;base64,{data}">'
    return f"<figure>{image}<figcaption>{name}</figcaption></figure>"
