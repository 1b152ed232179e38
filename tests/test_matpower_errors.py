"""Unusable MATPOWER feeders fail with one clear error each, in the library and on the command line.

Every bad file is the shipped ieee33bw.m with one text edit, written to tmp_path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.core.network import LinDistFlow
from p2pdoe.core.powerflow import run_power_flow
from p2pdoe.errors import FeederError, MatpowerFormatError
from p2pdoe.io.matpower import load_matpower, parse_matpower
from p2pdoe.io.scenarios import data_path

IEEE33 = data_path("feeders", "ieee33bw.m").read_text(encoding="utf-8")

# The end of MATPOWER's own case33bw.m: it converts ohms and kW with MATLAB code.
MATPOWER_CONVERSION = """
%% convert branch impedances from Ohms to p.u.
[PQ, PV, REF, NONE, BUS_I, BUS_TYPE, PD, QD, GS, BS, BUS_AREA, VM, ...
    VA, BASE_KV, ZONE, VMAX, VMIN, LAM_P, LAM_Q, MU_VMAX, MU_VMIN] = idx_bus;
[F_BUS, T_BUS, BR_R, BR_X, BR_B, RATE_A, RATE_B, RATE_C, ...
    TAP, SHIFT, BR_STATUS, PF, QF, PT, QT, MU_SF, MU_ST, ...
    ANGMIN, ANGMAX, MU_ANGMIN, MU_ANGMAX] = idx_brch;
Vbase = mpc.bus(1, BASE_KV) * 1e3;      %% in Volts
Sbase = mpc.baseMVA * 1e6;              %% in VA
mpc.branch(:, [BR_R BR_X]) = mpc.branch(:, [BR_R BR_X]) / (Vbase^2 / Sbase);

%% convert loads from kW to MW
mpc.bus(:, [PD, QD]) = mpc.bus(:, [PD, QD]) / 1e3;
"""


# --- text edits of the shipped file -------------------------------------------------------------------


def _edit_row(
    text: str, block: str, key: tuple[int, ...], edit: Callable[[list[str]], list[str] | None]
) -> str:
    """Apply `edit` to the tokens of the row of mpc.<block> whose leading numbers equal `key`.

    `edit` returns the new tokens, or None to delete the row. Exactly one row must match.
    """
    lines = text.splitlines()
    inside, hits = False, 0
    out: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(f"mpc.{block} = ["):
            inside = True
        elif inside and stripped.startswith("];"):
            inside = False
        elif inside and stripped and not stripped.startswith("%"):
            tokens = stripped.rstrip(";").split()
            if tuple(int(float(t)) for t in tokens[: len(key)]) == key:
                hits += 1
                new = edit(tokens)
                if new is not None:
                    out.append("\t" + "\t".join(new) + ";")
                continue
        out.append(line)
    assert hits == 1, f"{hits} rows of mpc.{block} start with {key}"
    return "\n".join(out) + "\n"


def _set(col: int, value: str) -> Callable[[list[str]], list[str]]:
    def edit(tokens: list[str]) -> list[str]:
        return [*tokens[:col], value, *tokens[col + 1 :]]

    return edit


def _set_many(**cols: str) -> Callable[[list[str]], list[str]]:
    def edit(tokens: list[str]) -> list[str]:
        out = list(tokens)
        for col, value in cols.items():
            out[int(col[1:])] = value
        return out

    return edit


def _add_bus_row(text: str, row: str) -> str:
    return text.replace("\n];\n\n%% generator data", f"\n\t{row};\n];\n\n%% generator data", 1)


def _drop_block(text: str, block: str) -> str:
    new = re.sub(rf"mpc\.{block} = \[.*?\];\n", "", text, count=1, flags=re.DOTALL)
    assert new != text
    return new


BUS, BRANCH = "bus", "branch"
BUS_TYPE, PD = 1, 2
BR_R, BR_X, BR_STATUS = 2, 3, 10

BAD_FEEDERS: dict[str, tuple[Callable[[str], str], type[FeederError], str]] = {
    "meshed": (lambda t: _edit_row(t, BRANCH, (18, 33), _set(BR_STATUS, "1")), FeederError, r"meshed"),
    "meshed-other-tie": (
        lambda t: _edit_row(t, BRANCH, (9, 15), _set(BR_STATUS, "1")),
        FeederError,
        r"meshed",
    ),
    "islanded-open-branch": (
        lambda t: _edit_row(t, BRANCH, (32, 33), _set(BR_STATUS, "0")),
        FeederError,
        r"buses 33 are islanded",
    ),
    "islanded-extra-bus": (
        lambda t: _add_bus_row(t, "34\t1\t0.05\t0.01\t0\t0\t1\t1\t0\t12.66\t1\t1.1\t0.9"),
        FeederError,
        r"34 are islanded",
    ),
    "no-slack": (lambda t: _edit_row(t, BUS, (1, 3), _set(BUS_TYPE, "1")), FeederError, r"no slack bus"),
    "two-slacks": (
        lambda t: _edit_row(t, BUS, (2, 1), _set(BUS_TYPE, "3")),
        FeederError,
        r"2 slack buses \(1, 2\)",
    ),
    "nan-in-bus": (
        lambda t: _edit_row(t, BUS, (7, 1), _set(PD, "NaN")),
        MatpowerFormatError,
        r"NaN or infinite",
    ),
    "inf-in-bus": (
        lambda t: _edit_row(t, BUS, (7, 1), _set(PD, "Inf")),
        MatpowerFormatError,
        r"NaN or infinite",
    ),
    "word-in-bus": (
        lambda t: _edit_row(t, BUS, (7, 1), _set(PD, "0.2x")),
        MatpowerFormatError,
        r"mpc\.bus row 7: not a number",
    ),
    "negative-r": (
        lambda t: _edit_row(t, BRANCH, (5, 6), _set(BR_R, "-0.01")),
        FeederError,
        r"branch 5-6 has a negative resistance",
    ),
    "negative-x": (
        lambda t: _edit_row(t, BRANCH, (5, 6), _set(BR_X, "-0.01")),
        FeederError,
        r"branch 5-6 has a negative resistance or reactance",
    ),
    "zero-impedance": (
        lambda t: _edit_row(t, BRANCH, (5, 6), _set_many(c2="0", c3="0")),
        FeederError,
        r"branch 5-6 has zero impedance",
    ),
    "unknown-bus": (
        lambda t: _edit_row(t, BRANCH, (32, 33), _set(1, "99")),
        FeederError,
        r"branch 32-99 names a bus that is not in mpc\.bus",
    ),
    "matlab-vbase": (
        lambda t: t + "Vbase = mpc.bus(1, BASE_KV) * 1e3;\n",
        MatpowerFormatError,
        r"unsupported statement 'Vbase = mpc\.bus\(1, BASE_KV\)",
    ),
    "matlab-indexed-assignment": (
        lambda t: t + "mpc.branch(:, [3 4]) = mpc.branch(:, [3 4]) / 16.02756;\n",
        MatpowerFormatError,
        r"unsupported statement",
    ),
    "matpower-case33bw-tail": (
        lambda t: t + MATPOWER_CONVERSION,
        MatpowerFormatError,
        r"unsupported statement",
    ),
    "no-branch": (lambda t: _drop_block(t, BRANCH), MatpowerFormatError, r"no mpc\.branch"),
    "no-bus": (lambda t: _drop_block(t, BUS), MatpowerFormatError, r"no mpc\.bus"),
    "duplicate-bus": (
        lambda t: _edit_row(t, BUS, (33, 1), _set(0, "32")),
        FeederError,
        r"duplicate bus numbers",
    ),
    "short-branch-row": (
        lambda t: _edit_row(t, BRANCH, (5, 6), lambda tok: tok[:5]),
        MatpowerFormatError,
        r"mpc\.branch rows must all have at least 11 columns",
    ),
    "zero-base": (
        lambda t: t.replace("mpc.baseMVA = 10;", "mpc.baseMVA = 0;"),
        MatpowerFormatError,
        r"mpc\.baseMVA must be a positive number",
    ),
    "transformer": (
        lambda t: _edit_row(t, BRANCH, (5, 6), _set(8, "1.05")),
        FeederError,
        r"branch 5-6 is a transformer",
    ),
}


def test_the_shipped_file_parses_and_the_row_editor_finds_rows() -> None:
    feeder = parse_matpower(IEEE33, name="ieee33bw")
    assert feeder.n_bus == 33
    # Editing a value that does not matter for validity keeps the file valid (the editor is sound).
    edited = _edit_row(IEEE33, BUS, (7, 1), _set(PD, "0.3"))
    assert parse_matpower(edited, name="x").load_kw[6] == pytest.approx(300.0)


@pytest.mark.parametrize("case", sorted(BAD_FEEDERS))
def test_bad_feeder_gives_one_clear_error(case: str, tmp_path: Path) -> None:
    make, error, pattern = BAD_FEEDERS[case]
    path = tmp_path / f"{case}.m"
    path.write_text(make(IEEE33), encoding="utf-8")
    with pytest.raises(error, match=pattern) as info:
        load_matpower(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message  # says which file


def test_matlab_code_error_names_the_line(tmp_path: Path) -> None:
    text = IEEE33 + "Vbase = mpc.bus(1, BASE_KV) * 1e3;\n"
    line = len(IEEE33.splitlines()) + 1
    path = tmp_path / "code.m"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MatpowerFormatError, match=rf"{re.escape(str(path))}:{line}: unsupported statement"):
        load_matpower(path)


def test_assignment_without_semicolon() -> None:
    feeder = parse_matpower(IEEE33.replace("mpc.baseMVA = 10;", "mpc.baseMVA = 10"), name="x")
    assert feeder.base_mva == 10.0


def test_two_statements_on_one_line() -> None:
    feeder = parse_matpower(IEEE33.replace("mpc.baseMVA = 10;", "mpc.baseMVA = 10; mpc.foo = 3;"), name="x")
    assert feeder.base_mva == 10.0


def test_non_integer_bus_number_is_refused() -> None:
    text = IEEE33.replace("\t33\t1\t0.06", "\t33.5\t1\t0.06")
    assert text != IEEE33
    with pytest.raises(FeederError, match="integers"):
        parse_matpower(text, name="x")


def test_open_tie_switch_to_a_missing_bus_is_refused() -> None:
    text = IEEE33.replace("\t25\t29\t", "\t25\t99\t")
    assert text != IEEE33
    with pytest.raises(FeederError, match="99"):
        parse_matpower(text, name="x")


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(MatpowerFormatError, match=r"cannot read feeder file .*nope\.m"):
        load_matpower(tmp_path / "nope.m")
    binary = tmp_path / "binary.m"
    binary.write_bytes(b"\xff\xfe\x00\x01mpc")
    with pytest.raises(MatpowerFormatError, match=r"not UTF-8 text"):
        load_matpower(binary)


# --- a custom feeder with its own numbering -----------------------------------------------------------

FOUR_BUS = """function mpc = four
%% a 4-bus feeder, bus numbers 10..40, slack (30) not first, one branch written child-to-parent
mpc.version = '2';
mpc.baseMVA = 1;
mpc.bus = [
	10	1	0.20	0.05	0	0	1	1	0	11	1	1.1	0.9;
	20	1	0.10	0.02	0	0	1	1	0	11	1	1.1	0.9;
	30	3	0	0	0	0	1	1	0	11	1	1.1	0.9;
	40	1	0.15	0.04	0	0	1	1	0	11	1	1.1	0.9;
];
mpc.branch = [
	30	10	0.010	0.008	0	2.0	0	0	0	0	1	-360	360;
	20	10	0.020	0.010	0	0	0	0	0	0	1	-360	360;
	30	40	0.015	0.020	0	0	0	0	0	0	1	-360	360;
	20	40	0.015	0.020	0	0	0	0	0	0	0	-360	360;
];
"""

# The same feeder numbered 1..4 from the slack, in a different order.
FOUR_BUS_PLAIN = """mpc.baseMVA = 1;
mpc.bus = [
	1	3	0	0	0	0	1	1	0	11	1	1.1	0.9;
	2	1	0.20	0.05	0	0	1	1	0	11	1	1.1	0.9;
	3	1	0.10	0.02	0	0	1	1	0	11	1	1.1	0.9;
	4	1	0.15	0.04	0	0	1	1	0	11	1	1.1	0.9;
];
mpc.branch = [
	1	2	0.010	0.008	0	2.0	0	0	0	0	1	-360	360;
	2	3	0.020	0.010	0	0	0	0	0	0	1	-360	360;
	1	4	0.015	0.020	0	0	0	0	0	0	1	-360	360;
];
"""


def test_custom_feeder_with_its_own_numbering(tmp_path: Path) -> None:
    path = tmp_path / "four.m"
    path.write_text(FOUR_BUS, encoding="utf-8")
    f = load_matpower(path)
    assert f.name == "four"
    assert f.bus_ids.tolist() == [10, 20, 30, 40]
    assert f.root == 2
    assert f.base_kv == 11.0
    assert f.s_base_kw == 1000.0
    for bus_id in (10, 20, 30, 40):
        assert int(f.bus_ids[f.index_of(bus_id)]) == bus_id
    with pytest.raises(FeederError, match=r"no bus 1 \(buses are 10\.\.40\)"):
        f.index_of(1)
    parent_id = {int(f.bus_ids[k]): int(f.bus_ids[f.parent[k]]) for k in f.branches}
    assert parent_id == {10: 30, 20: 10, 40: 30}
    assert sorted(f.branch_label(int(k)) for k in f.branches) == ["10-20", "30-10", "30-40"]
    assert f.rating_kva[f.index_of(10)] == pytest.approx(2000.0)
    assert np.isnan(f.rating_kva[f.index_of(20)])
    assert f.load_kw.tolist() == pytest.approx([200.0, 100.0, 0.0, 150.0])

    pf = run_power_flow(f, -f.load_kw, -f.load_kvar)
    assert pf.converged
    assert pf.v_pu[f.root] == pytest.approx(1.0)
    assert np.all(np.delete(pf.v_pu, f.root) < 1.0)
    v_lin = LinDistFlow(f).voltages(1.0, -f.load_kw, -f.load_kvar)
    assert np.max(np.abs(pf.v_pu - v_lin)) < 0.01

    # Renumbering and reordering the file changes nothing physical.
    plain = parse_matpower(FOUR_BUS_PLAIN, name="plain")
    pf_plain = run_power_flow(plain, -plain.load_kw, -plain.load_kvar)
    mapping = {30: 1, 10: 2, 20: 3, 40: 4}
    for bus_id, plain_id in mapping.items():
        assert pf.v_pu[f.index_of(bus_id)] == pytest.approx(
            pf_plain.v_pu[plain.index_of(plain_id)], abs=1e-12
        )
    assert float(pf.losses_kw) == pytest.approx(float(pf_plain.losses_kw), rel=1e-12)


# --- the command line ---------------------------------------------------------------------------------


def test_cli_meshed_feeder(tmp_path: Path) -> None:
    path = tmp_path / "meshed.m"
    path.write_text(BAD_FEEDERS["meshed"][0](IEEE33), encoding="utf-8")
    assert_one_line_error(run_p2pdoe("powerflow", "--feeder", str(path)), "meshed", str(path))


def test_cli_missing_feeder_file(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.m"
    assert_one_line_error(run_p2pdoe("powerflow", "--feeder", str(path), "--json"), str(path))


def test_cli_custom_feeder(tmp_path: Path) -> None:
    path = tmp_path / "four.m"
    path.write_text(FOUR_BUS, encoding="utf-8")
    proc = run_p2pdoe("powerflow", "--feeder", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [row["bus"] for row in report["buses"]] == [10, 20, 30, 40]
    assert report["vmax_bus"] == 30
    assert report["converged"] is True


def test_a_loop_is_named_by_all_its_branches(tmp_path: Path) -> None:
    """Closing the 9-15 tie makes the loop 9-10-...-15: every branch of it is named, not one."""
    from p2pdoe.io.matpower import load_matpower

    path = tmp_path / "meshed.m"
    path.write_text(BAD_FEEDERS["meshed-other-tie"][0](IEEE33), encoding="utf-8")
    with pytest.raises(FeederError) as caught:
        load_matpower(path)
    message = str(caught.value)
    listed = message.split("branches ", 1)[1].split(" form a loop", 1)[0].split(", ")
    pairs = {frozenset(map(int, b.split("-"))) for b in listed}
    assert pairs == {frozenset((k, k + 1)) for k in range(9, 15)} | {frozenset((9, 15))}
