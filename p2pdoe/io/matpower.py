"""Read radial feeders from MATPOWER case files (`.m`, case format version 2).

Only literal assignments are read (`mpc.baseMVA = 10;`, `mpc.bus = [...];`, ...). A file that
computes its data with MATLAB code (as MATPOWER's own case33bw.m converts ohms to p.u. at its end)
is refused with the line that does it, rather than read with the wrong units.
"""

from __future__ import annotations

import math
import re
from collections import deque
from pathlib import Path

import numpy as np

from p2pdoe.core.network import Feeder
from p2pdoe.errors import FeederError, MatpowerFormatError
from p2pdoe.io.files import read_text

_ASSIGN = re.compile(r"^mpc\.(\w+)\s*=\s*(.*)$", re.DOTALL)
_FUNCTION = re.compile(r"^function\s+\w+\s*=\s*\w+\s*$")
# MATPOWER column indices (0-based).
BUS_I, BUS_TYPE, PD, QD, BASE_KV = 0, 1, 2, 3, 9
F_BUS, T_BUS, BR_R, BR_X, RATE_A, TAP, BR_STATUS = 0, 1, 2, 3, 5, 8, 10
REF = 3


def load_matpower(path: Path) -> Feeder:
    """Read a MATPOWER case file; MatpowerFormatError / FeederError with one clear line if unusable."""
    text = read_text(path, "feeder file", MatpowerFormatError)
    return parse_matpower(text, name=path.stem, source=str(path))


def parse_matpower(text: str, name: str, source: str = "<string>") -> Feeder:
    fields = _read_fields(text, source)
    for key in ("baseMVA", "bus", "branch"):
        if key not in fields:
            raise MatpowerFormatError(f"{source}: no mpc.{key} in the file")
    base_mva = _scalar(fields["baseMVA"], "baseMVA", source)
    bus = _matrix(fields["bus"], "bus", 13, source)
    branch = _matrix(fields["branch"], "branch", 11, source)
    return _build_feeder(name, base_mva, bus, branch, source)


def _read_fields(text: str, source: str) -> dict[str, tuple[str, int]]:
    """Map each `mpc.<field>` to (its right-hand side, line number)."""
    fields: dict[str, tuple[str, int]] = {}
    for statement, line in _statements(text):
        if _FUNCTION.match(statement):
            continue
        match = _ASSIGN.match(statement)
        if match is None:
            raise MatpowerFormatError(
                f"{source}:{line}: unsupported statement {statement[:60]!r}: only literal mpc.* "
                "assignments are read (convert units in the file itself)"
            )
        fields[match.group(1)] = (match.group(2).strip(), line)
    return fields


def _statements(text: str) -> list[tuple[str, int]]:
    """Split MATLAB text into statements (comments removed), with their first line numbers.

    A statement ends at `;` or at a line end outside brackets; inside brackets a line end
    separates matrix rows, as in MATLAB. `...` continues a line.
    """
    out: list[tuple[str, int]] = []
    buf: list[str] = []
    start, depth = 0, 0

    def flush() -> None:
        statement = "".join(buf).strip()
        if statement:
            out.append((statement, start))
        buf.clear()

    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        continued = line.rstrip().endswith("...")
        line = line.rstrip()[:-3] if continued else line
        for ch in line:
            if not "".join(buf).strip():
                start = number
            depth += (ch in "[{") - (ch in "]}")
            if ch == ";" and depth <= 0:
                flush()
                depth = 0
            else:
                buf.append(ch)
        if depth > 0 or continued:
            buf.append("\n" if depth > 0 else " ")
        else:
            flush()
    flush()
    return out


def _strip_comment(line: str) -> str:
    in_string = False
    for i, ch in enumerate(line):
        if ch == "'":
            in_string = not in_string
        elif ch == "%" and not in_string:
            return line[:i]
    return line


def _scalar(value: tuple[str, int], key: str, source: str) -> float:
    text, line = value
    try:
        number = float(text)
    except ValueError as exc:
        raise MatpowerFormatError(f"{source}:{line}: mpc.{key} is not a number: {text!r}") from exc
    if not math.isfinite(number) or number <= 0:
        raise MatpowerFormatError(f"{source}:{line}: mpc.{key} must be a positive number, got {text}")
    return number


def _matrix(value: tuple[str, int], key: str, min_cols: int, source: str) -> np.ndarray:
    text, line = value
    if not (text.startswith("[") and text.endswith("]")):
        raise MatpowerFormatError(f"{source}:{line}: mpc.{key} is not a literal matrix")
    rows = [r for r in re.split(r"[;\n]", text[1:-1]) if r.strip()]
    parsed: list[list[float]] = []
    for offset, row in enumerate(rows):
        tokens = row.replace(",", " ").split()
        try:
            numbers = [float(tok) for tok in tokens]
        except ValueError as exc:
            raise MatpowerFormatError(
                f"{source}: mpc.{key} row {offset + 1}: not a number in {row.strip()!r}"
            ) from exc
        if any(not math.isfinite(n) for n in numbers):
            raise MatpowerFormatError(f"{source}: mpc.{key} row {offset + 1}: NaN or infinite value")
        parsed.append(numbers)
    if not parsed:
        raise MatpowerFormatError(f"{source}:{line}: mpc.{key} is empty")
    widths = {len(r) for r in parsed}
    if len(widths) != 1 or min(widths) < min_cols:
        raise MatpowerFormatError(
            f"{source}: mpc.{key} rows must all have at least {min_cols} columns (found {sorted(widths)})"
        )
    return np.asarray(parsed, dtype=float)


def _build_feeder(name: str, base_mva: float, bus: np.ndarray, branch: np.ndarray, source: str) -> Feeder:
    if not np.all(bus[:, BUS_I] == np.round(bus[:, BUS_I])) or np.any(bus[:, BUS_I] < 0):
        raise FeederError(f"{source}: bus numbers in mpc.bus must be non-negative integers")
    bus_ids = bus[:, BUS_I].astype(np.int64)
    if len(set(bus_ids.tolist())) != len(bus_ids):
        raise FeederError(f"{source}: duplicate bus numbers in mpc.bus")
    index = {int(b): i for i, b in enumerate(bus_ids)}
    root = _slack(bus, source)
    _check_endpoints(branch, index, source)
    live = branch[branch[:, BR_STATUS] != 0]
    _check_branch_numbers(live, index, source)
    parent, edge_of = _spanning_tree(len(bus_ids), root, live, index, bus_ids, source)
    n = len(bus_ids)
    r = np.zeros(n)
    x = np.zeros(n)
    rating = np.full(n, np.nan)
    for k in range(n):
        if k == root:
            continue
        row = live[edge_of[k]]
        r[k], x[k] = row[BR_R], row[BR_X]
        rating[k] = row[RATE_A] * 1000.0 if row[RATE_A] > 0 else np.nan
    base_kv = float(bus[root, BASE_KV])
    if base_kv <= 0:
        raise FeederError(f"{source}: the slack bus has no base voltage (baseKV column)")
    return Feeder(
        name=name,
        base_mva=base_mva,
        base_kv=base_kv,
        bus_ids=bus_ids,
        root=root,
        parent=parent,
        r_pu=r,
        x_pu=x,
        load_kw=bus[:, PD] * 1000.0,
        load_kvar=bus[:, QD] * 1000.0,
        rating_kva=rating,
    )


def _slack(bus: np.ndarray, source: str) -> int:
    slack = np.flatnonzero(bus[:, BUS_TYPE] == REF)
    if slack.size == 0:
        raise FeederError(f"{source}: no slack bus (no bus of type 3 in mpc.bus)")
    if slack.size > 1:
        ids = ", ".join(str(int(bus[i, BUS_I])) for i in slack)
        raise FeederError(f"{source}: {slack.size} slack buses ({ids}); a radial feeder has one")
    return int(slack[0])


def _check_endpoints(branch: np.ndarray, index: dict[int, int], source: str) -> None:
    """Every branch, in service or not, joins two buses of mpc.bus."""
    for row in branch:
        f, t = row[F_BUS], row[T_BUS]
        if f != round(f) or t != round(t) or int(f) not in index or int(t) not in index:
            raise FeederError(f"{source}: branch {f:g}-{t:g} names a bus that is not in mpc.bus")


def _check_branch_numbers(live: np.ndarray, index: dict[int, int], source: str) -> None:
    for row in live:
        label = f"branch {int(row[F_BUS])}-{int(row[T_BUS])}"
        if row[BR_R] < 0 or row[BR_X] < 0:
            raise FeederError(f"{source}: {label} has a negative resistance or reactance")
        if row[BR_R] == 0 and row[BR_X] == 0:
            raise FeederError(f"{source}: {label} has zero impedance")
        if row[TAP] not in (0.0, 1.0):
            raise FeederError(f"{source}: {label} is a transformer with tap {row[TAP]:g}: not supported")


def _tree_path(a: int, b: int, parent: np.ndarray, edge_of: dict[int, int], root: int) -> list[int]:
    """The rows of the tree's branches between buses a and b (both already in the tree)."""

    def up(k: int) -> list[int]:
        path = [k]
        while path[-1] != root:
            path.append(int(parent[path[-1]]))
        return path

    from_a, from_b = up(a), up(b)
    common = set(from_a) & set(from_b)
    below_a = [k for k in from_a if k not in common]
    below_b = [k for k in from_b if k not in common]
    return [edge_of[k] for k in below_a] + [edge_of[k] for k in reversed(below_b)]


def _spanning_tree(
    n: int, root: int, live: np.ndarray, index: dict[int, int], bus_ids: np.ndarray, source: str
) -> tuple[np.ndarray, dict[int, int]]:
    """Parent of every bus and the row of the branch feeding it; FeederError if meshed or islanded."""
    adjacency: dict[int, list[tuple[int, int]]] = {i: [] for i in range(n)}
    for row_no, row in enumerate(live):
        f, t = index[int(row[F_BUS])], index[int(row[T_BUS])]
        adjacency[f].append((t, row_no))
        adjacency[t].append((f, row_no))
    parent = np.full(n, -1, dtype=np.int64)
    edge_of: dict[int, int] = {}
    seen = {root}
    queue = deque([root])
    while queue:
        k = queue.popleft()
        for nb, row_no in adjacency[k]:
            if row_no == edge_of.get(k):
                continue
            if nb in seen:
                rows = [*_tree_path(k, nb, parent, edge_of, root), row_no]
                labels = [f"{int(live[r, F_BUS])}-{int(live[r, T_BUS])}" for r in rows]
                shown = ", ".join(labels[:12]) + (" ..." if len(labels) > 12 else "")
                raise FeederError(
                    f"{source}: the network is meshed: branches {shown} form a loop; "
                    "only radial feeders are supported: open a tie switch on one of them (status 0)"
                )
            seen.add(nb)
            parent[nb] = k
            edge_of[nb] = row_no
            queue.append(nb)
    if len(seen) != n:
        islanded = sorted(int(bus_ids[i]) for i in range(n) if i not in seen)
        shown = ", ".join(map(str, islanded[:10])) + (" ..." if len(islanded) > 10 else "")
        raise FeederError(f"{source}: buses {shown} are islanded (not connected to the slack bus)")
    parent[root] = root
    return parent, edge_of
