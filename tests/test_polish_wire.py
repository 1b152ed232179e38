"""The certified polish on the wire (issue 18): the participants' messages, checked against the
centralized optimum of the same day, against ADMM left alone, and under reordering, duplicates
and malformed messages."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
from agreement_helpers import Pending, Trace, drive, shuffled, trace_solution
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from p2pdoe.core.agreement import polish_exchange
from p2pdoe.core.agreement.coordination import RoundSetup
from p2pdoe.core.agreement.polish import Response
from p2pdoe.core.agreement.polish_exchange import (
    VERDICT_STEP,
    DsoExchange,
    assembled,
    coupling_rows_of,
    response_parts,
)
from p2pdoe.core.agreement.protocol import Message, Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.coordinator.rounds import RoundRun, Timings
from p2pdoe.core.effects import Send
from p2pdoe.core.envelope import safe_set
from p2pdoe.core.scenario import PolishSettings, Scenario
from p2pdoe.core.schemas.messages import (
    DSO_ID,
    Grant,
    Matrix,
    PolishPrices,
    PolishReport,
    Proposal,
    ResponsePart,
    decode,
    encode,
    matrix_of,
)
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import subscribers

FIRST = 20  # the default day's polish is certified from 20 iterations (docs/benchmarks.md)
SCHEDULE_KEYS = ("pv", "wd", "lx", "ch", "dis", "imp", "exp", "lo", "up")
REFERENCE_KW = 0.5  # the reference (Clarabel at its defaults) is 0.12 kW from the optimum here
ROWS_KW = 1e-6  # what a certified answer may miss a row by (polish.VIOLATION)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread() -> Iterator[None]:
    """OpenBLAS's threads spin waiting for each other when the cores are busy (docs/benchmarks.md)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _day(**polish: int) -> Scenario:
    return load_scenario("default", {"admm": {"polish": polish}})


@pytest.fixture(scope="module")
def central() -> Solution:
    return solve_centralized(load_scenario("default"), Policy.DYNAMIC)


@pytest.fixture(scope="module")
def polished() -> tuple[Scenario, Trace]:
    s = _day(first=FIRST)
    return s, drive(s, Policy.DYNAMIC)


def _worst_kw(a: Solution, b: Solution) -> float:
    return max(
        float(np.max(np.abs(x[key] - y[key])))
        for x, y in zip(a.schedules, b.schedules, strict=True)
        for key in SCHEDULE_KEYS
    )


def test_a_certified_polish_ends_the_round_at_the_optimum(
    polished: tuple[Scenario, Trace], central: Solution
) -> None:
    s, trace = polished
    sol = trace_solution(s, Policy.DYNAMIC, trace)
    record = trace.dso.polish
    assert trace.dso.status == "converged"
    assert (trace.dso.iterations, record.tries, record.certified_at) == (FIRST, 1, FIRST)
    assert 1 <= record.rounds <= 8
    assert {c.final_solve for c in trace.communities} == {"certified polish"}
    assert _worst_kw(sol, central) < REFERENCE_KW
    gross = abs(central.objective_eur)
    assert abs(sol.objective_eur - central.objective_eur) < 1e-6 * gross
    for name in ("export_voltage", "import_voltage", "export_congestion", "import_congestion"):
        assert np.allclose(getattr(sol.dlmp, name), getattr(central.dlmp, name), atol=1e-6), name


def test_the_certified_answer_keeps_every_coupling_and_every_limit(polished: tuple[Scenario, Trace]) -> None:
    s, trace = polished
    outs = trace.communities
    peers = trace.parts.dso.plan.peers
    for b, out in enumerate(outs):
        for k, m in enumerate(peers[b]):
            k_back = peers[m].index(b)
            assert np.allclose(out.agreed_buy_kw[k], outs[m].agreed_sell_kw[k_back], atol=ROWS_KW)
            assert np.allclose(out.buy_price[k], outs[m].sell_price[k_back], atol=1e-9)
    lo = np.array([o.granted_lo_kw for o in outs])
    up = np.array([o.granted_up_kw for o in outs])
    assert np.array_equal(lo, trace.dso.granted_lo_kw)
    assert np.array_equal(up, trace.dso.granted_up_kw)
    safe = safe_set(s)
    for corner, box, sign in ((safe.upper, up, 1.0), (safe.lower, lo, -1.0)):
        assert (sign * (np.einsum("kc,ct->kt", corner.g, box) - corner.h) <= ROWS_KW).all()
    for qp, out in zip(trace.parts.qps, outs, strict=True):
        az = qp.a @ out.z
        assert (az >= qp.lower - ROWS_KW).all()
        assert (az <= qp.upper + ROWS_KW).all()


def _verdicts_twice(message: Message, recipient: str) -> int:
    """The coordinator's verdicts delivered twice: the second copy reaches a site back in ADMM."""
    return 2 if isinstance(message, PolishPrices) and message.verdict != "solve" else 1


@pytest.fixture(scope="module")
def plain() -> Trace:
    return drive(_day(), Policy.DYNAMIC)


def test_an_abandoned_try_leaves_admm_exactly_where_it_was(plain: Trace) -> None:
    """Also when a verdict arrives twice: the site answers the repeat with its last proposals (the
    coordinator repeats a verdict when a proposal went missing), which everyone drops as duplicates."""
    tried = drive(_day(first=10, every=100_000, max_rounds=1), Policy.DYNAMIC, copies=_verdicts_twice)
    assert all(c.repeats_answered == 1 for c in tried.parts.communities)
    assert tried.dso.polish.tries == 1
    assert tried.dso.polish.certified_at is None
    assert tried.dso.iterations == plain.dso.iterations
    for a, b in zip(tried.communities, plain.communities, strict=True):
        assert np.array_equal(a.z, b.z)
        assert np.array_equal(a.buy_price, b.buy_price)
    kinds = {type(m) for _, m in tried.published}
    assert {PolishReport, PolishPrices} <= kinds


def test_a_site_that_cannot_send_its_response_declines_and_admm_goes_on(
    plain: Trace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(polish_exchange, "PART_BYTES", 8)  # far more parts than a response may have
    trace = drive(_day(first=FIRST), Policy.DYNAMIC)
    assert (trace.dso.polish.tries, trace.dso.polish.certified_at) == (4, None)  # after 20, 40, 80, 160
    assert trace.dso.iterations == plain.dso.iterations
    reports = [m for _, m in trace.published if isinstance(m, PolishReport)]
    assert reports
    assert all(m.declined for m in reports)


def test_a_stop_requested_during_a_try_abandons_it_and_the_round_stops() -> None:
    """A rolling round's deadline (`stop_at_next_iteration`) comes while the communities polish: the
    coordinator's next answer abandons the try, and the next grant says "stopped"."""
    s = _day(first=FIRST)
    parts = participants(s, Policy.DYNAMIC, "day-ahead")
    deadline = {"passed": False}

    def pick(pending: list[Pending]) -> int:
        if not deadline["passed"] and any(isinstance(p.message, PolishReport) for p in pending):
            parts.dso.stop_at_next_iteration()
            deadline["passed"] = True
        return 0

    trace = drive(s, Policy.DYNAMIC, parts=parts, pick=pick)
    assert trace.dso.status == "stopped"
    assert trace.dso.iterations == FIRST + 1
    assert (trace.dso.polish.tries, trace.dso.polish.steps, trace.dso.polish.certified_at) == (1, 1, None)
    assert {c.status for c in trace.communities} == {"stopped"}


def _twice_polish(message: Message, recipient: str) -> int:
    return 2 if isinstance(message, (PolishReport, PolishPrices)) or getattr(message, "polish", False) else 1


def test_reordered_and_repeated_messages_give_the_same_answer(polished: tuple[Scenario, Trace]) -> None:
    s, fifo = polished
    trace = drive(s, Policy.DYNAMIC, pick=shuffled(7), copies=_twice_polish)
    assert trace.dso.polish == fifo.dso.polish
    for a, b in zip(trace.communities, fifo.communities, strict=True):
        assert np.allclose(a.z, b.z, atol=1e-9)
    ignored = trace.ignored()
    assert sum(ignored["dso"].values()) > 0  # the repeats were seen and dropped, not used twice


TRY = 20  # the iteration a try of the small exchange below starts from


def _report(site: str, step: int, **fields: object) -> PolishReport:
    return PolishReport(round="r", sender=site, iteration=TRY, exchange=0, step=step, **fields)  # type: ignore[arg-type]


def _small_exchange(seed: int = 1, scale: float = 1.0) -> tuple[DsoExchange, int, list[PolishPrices]]:
    """Two sites trading with each other over two intervals, their step-0 responses in (random
    factors times `scale`): the exchange, a site's coupling size, the coordinator's answer."""
    horizon, peers = 2, ((1,), (0,))
    rows = coupling_rows_of(peers, horizon, None)
    size = rows.sizes[0]  # a buy and a sell row, then the envelope corners: 4 x 2
    zeros = np.zeros((2, horizon))
    ex = DsoExchange.start("r", ("a", "b"), TRY, rows, (zeros, zeros), np.zeros((2, horizon)), 3)
    rng = np.random.default_rng(seed)
    answers: list[PolishPrices] = []
    for site in ("a", "b"):
        response = Response(rng.normal(size=size), scale * rng.normal(size=(size, size)))
        (part,) = response_parts(response)
        answers = ex.offer(_report(site, 0, response=part))
    return ex, size, answers


def test_a_malformed_report_is_counted_and_the_step_waits_for_a_good_one() -> None:
    ex, size, answers = _small_exchange()
    assert [(m.step, m.iteration) for m in answers] == [(0, TRY), (0, TRY)]
    ok = {"values": [0.0] * size, "correction": [0.0] * size}
    assert ex.offer(_report("a", 1, **ok)) == []
    short = {"values": [0.0] * size, "correction": [0.0] * (size - 1)}
    assert ex.offer(_report("b", 1, **short)) == []
    assert ex.offer(_report("b", 2, **ok)) == []  # not the step awaited
    stale = _report("b", 1, **ok).model_copy(update={"iteration": TRY - 20})
    assert ex.offer(stale) == []  # of an earlier try
    assert (ex.ignored["invalid"], ex.ignored["polish_out_of_step"]) == (1, 2)
    assert ex.waiting_for() == ("b",)
    assert [m.step for m in ex.offer(_report("b", 1, **ok))] == [1, 1]
    assert ex.offer(_report("b", 1, **ok)) == []  # late: that step is answered
    assert ex.waiting_for() == ("a", "b")


def test_parts_that_do_not_make_a_response_are_dropped_and_the_step_waits() -> None:
    horizon, peers = 2, ((1,), (0,))
    rows = coupling_rows_of(peers, horizon, None)
    size = rows.sizes[0]
    zeros = np.zeros((2, horizon))
    ex = DsoExchange.start("r", ("a", "b"), TRY, rows, (zeros, zeros), np.zeros((2, horizon)), 3)
    rng = np.random.default_rng(2)
    good = response_parts(Response(rng.normal(size=size), rng.normal(size=(size, size))))[0]
    half = matrix_of(rng.normal(size=(size // 2, size)))
    first = ResponsePart(part=0, parts=2, first_row=0, base=list(good.base), factor=half)
    astray = ResponsePart(part=1, parts=3, first_row=size // 2, base=[], factor=half)  # not of 2 parts
    assert ex.offer(_report("a", 0, response=first)) == []
    assert ex.offer(_report("a", 0, response=astray)) == []
    assert ex.ignored["invalid"] == 1
    overlapping = ResponsePart(part=1, parts=2, first_row=0, base=[], factor=half)  # rows 0.. again
    assert ex.offer(_report("a", 0, response=overlapping)) == []
    assert ex.offer(_report("b", 0, response=good)) == []
    assert ex.ignored["invalid"] == 2  # assembled, it did not make a response: dropped
    assert ex.waiting_for() == ("a",)
    assert len(ex.offer(_report("a", 0, response=good))) == 2  # a good one: the step goes on


def test_a_declined_try_or_numbers_that_fail_abandon_the_try() -> None:
    ex, _, _ = _small_exchange()
    answers = ex.offer(_report("b", 1, declined=True))
    assert {(m.verdict, m.step) for m in answers} == {("abandoned", VERDICT_STEP)}
    assert ex.verdict == "abandoned"
    _, _, answers = _small_exchange(scale=1e200)  # finite on the wire, overflows in the Gram
    assert {m.verdict for m in answers} == {"abandoned"}


def test_a_site_declines_a_response_too_large_for_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polish_exchange, "PART_BYTES", 8)  # one float a part: far too many parts
    with pytest.raises(polish_exchange.CannotPolishError, match="parts"):
        response_parts(Response(np.zeros(100), np.ones((100, 1))))


def test_a_matrix_goes_over_the_wire_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(5, 3)) * 10.0 ** rng.integers(-12, 3, size=(5, 3))
    m = matrix_of(values)
    again = Matrix.model_validate_json(m.model_dump_json())
    assert np.array_equal(again.array(), values)
    with pytest.raises(ValidationError, match="not 5 x 4"):
        Matrix(rows=5, cols=4, data=m.data)
    with pytest.raises(ValidationError, match="base64"):
        Matrix(rows=1, cols=1, data="not base64!")
    with pytest.raises(ValidationError, match="finite"):
        matrix_of(np.array([[np.nan]]))


def test_a_response_too_large_for_one_message_goes_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    response = Response(rng.normal(size=40), rng.normal(size=(40, 7)))
    monkeypatch.setattr(polish_exchange, "PART_BYTES", 8 * 7 * 6)  # six rows a part
    parts = response_parts(response)
    assert len(parts) == 7
    assert [p.part for p in parts] == list(range(7))
    again = assembled({p.part: ResponsePart.model_validate_json(p.model_dump_json()) for p in parts}, 40)
    assert again is not None
    assert np.array_equal(again.base, response.base)
    assert np.array_equal(again.factor, response.factor)
    assert assembled({p.part: p for p in parts[:-1]}, 40) is None  # a part missing
    assert assembled({p.part: p for p in parts}, 41) is None  # not the size the rows say
    with pytest.raises(ValidationError, match="first part"):
        ResponsePart(part=1, parts=2, first_row=0, base=[1.0], factor=matrix_of(np.zeros((1, 1))))


def test_a_verdict_names_the_last_step_and_a_grant_may_start_a_try(polished: tuple[Scenario, Trace]) -> None:
    _, trace = polished
    verdicts = [m for _, m in trace.published if isinstance(m, PolishPrices) and m.verdict != "solve"]
    assert {(m.step, m.verdict) for m in verdicts} == {(VERDICT_STEP, "certified")}
    assert len(verdicts) == len(trace.parts.communities)
    starting = [m for _, m in trace.published if isinstance(m, Grant) and m.polish]
    assert {m.iteration for m in starting} == {FIRST - 1}


def test_a_lost_report_is_sent_again_when_the_coordinator_repeats_itself() -> None:
    """The coordinator's round (`RoundRun`): at its patience's end it sends its last polish message
    again; the site whose report was lost answers with it again, the others' copies are dropped as
    duplicates, and the try goes on to its certificate."""
    s = _day(first=FIRST)
    p = participants(s, Policy.DYNAMIC, "day-ahead")
    run = RoundRun(RoundSetup(p.dso, tuple(s.ids), (), None, None), Timings(), 10.0, lambda: 0.0)  # type: ignore[arg-type]
    now = datetime(2026, 6, 1, tzinfo=UTC)
    by_site = {c.site: c for c in p.communities}
    queue: deque[Message] = deque(_sent(run.open(now)))
    lost: list[PolishReport] = []
    missing: tuple[str, ...] = ()
    repeats = 0
    while run.outcome is None:
        if not queue:
            missing = run.missing()
            again = run.repeat()  # the iteration's patience is over
            assert again, "the round is stuck"
            repeats += 1
            queue.extend(_sent(again))
            continue
        m = queue.popleft()
        if isinstance(m, PolishReport) and m.step == 1 and not lost:
            lost.append(m)
            continue
        for name in subscribers(m, p.communities, relay=False):
            if name == DSO_ID:
                assert isinstance(m, (Proposal, PolishReport))
                queue.extend(_sent(run.proposal(m, len(encode(m)), now)))
            else:
                queue.extend(c.message for c in by_site[name].handle(Received(m)) if isinstance(c, Publish))
    assert (repeats, missing) == (1, (lost[0].sender,))
    assert run.outcome.status == "converged"
    assert run.outcome.polish.certified_at == FIRST
    dropped = p.dso.ignored
    assert dropped.get("duplicate", 0) + dropped.get("polish_out_of_step", 0) == len(s.ids) - 1
    assert run.timings.polish_messages > 0


def _sent(effects: list[object]) -> list[Message]:
    """The market messages among a round's effects (not its progress)."""
    return [decode(e.payload) for e in effects if isinstance(e, Send) and "/market/" in e.topic]


@pytest.mark.parametrize(
    ("first", "every", "due_after"),
    [(20, 20, (20, 40, 80, 160, 320)), (10, 5, (10, 15, 25, 45, 85, 165, 325)), (0, 20, ())],
)
def test_tries_come_after_first_and_then_ever_further_apart(
    first: int, every: int, due_after: tuple[int, ...]
) -> None:
    """A failed try is followed by another `every` iterations later, the wait doubled each time;
    `first` 0 turns the polish off."""
    settings = PolishSettings(first=first, every=every)
    found, failed = [], 0
    for done in range(1, 400):
        if settings.due(done, failed):
            found.append(done)
            failed += 1
    assert tuple(found) == due_after
