"""The certified polish over the wire (issue 18): `polish.polish`'s exchange as messages, no I/O.

A grant that says `polish` starts a try (named by `iteration`, the ADMM iterations done). Every
community answers with its response (`PolishReport` step 0, cut into parts under the size limit);
the coordinator answers with each one's prices (`PolishPrices` step 0). Then REFINEMENTS
corrections each way: a community's step j (1..R) answers the coordinator's step j - 1, whose steps
1..R refine the prices. A community's step R + 1 is its verdict: its coupling values, what the check
of its own rows changed, and its new response if it changed. The coordinator checks its own rows
and answers "certified" (every party kept its rows: the optimum), "abandoned" (the try's exchanges
ran out, a community declined, or the numbers failed: ADMM goes on where it was), or the next
exchange's prices (step 0 of exchange e + 1, from the responses it holds)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from p2pdoe.core.agreement.polish import (
    REFINEMENTS,
    VIOLATION,
    Changes,
    CouplingRows,
    DsoPolish,
    Response,
    SitePolish,
    coupling_rows,
)
from p2pdoe.core.agreement.protocol import DUPLICATE, INVALID, UNKNOWN_SENDER, WRONG_ROUND
from p2pdoe.core.community import CommunityQP, Layout
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.messages import (
    MAX_RESPONSE_PARTS,
    PolishPrices,
    PolishReport,
    ResponsePart,
    matrix_of,
)

if TYPE_CHECKING:  # an edge agent never imports the safe set's module
    from p2pdoe.core.envelope import SafeSet

log = logging.getLogger(__name__)
VERDICT_STEP = REFINEMENTS + 1  # a community's last step of an exchange
PART_BYTES = 2 * 1024 * 1024  # of a factor's raw floats per message (base64 adds a third)
OUT_OF_STEP = "polish_out_of_step"  # of another step or another try
Verdict = Literal["certified", "abandoned"]
UNCHANGED = Changes()


class CannotPolishError(Exception):
    """A community cannot take part in this try: its response does not fit the wire, or its numbers
    are not finite."""


def response_parts(response: Response) -> list[ResponsePart]:
    """The response cut into parts of at most PART_BYTES of factor each; the first carries the base."""
    m, r = response.factor.shape
    per_part = max(1, PART_BYTES // max(1, 8 * r))
    starts = range(0, m, per_part)
    if len(starts) > MAX_RESPONSE_PARTS:
        raise CannotPolishError(f"a response of {m} x {r} needs {len(starts)} parts")
    if not (np.isfinite(response.base).all() and np.isfinite(response.factor).all()):
        raise CannotPolishError("a response that is not finite")
    return [
        ResponsePart(
            part=i,
            parts=len(starts),
            first_row=a,
            base=response.base.tolist() if i == 0 else [],
            factor=matrix_of(response.factor[a : a + per_part]),
        )
        for i, a in enumerate(starts)
    ]


def assembled(parts: dict[int, ResponsePart], size: int) -> Response | None:
    """The response from every part, or None if the parts do not make one of `size` values."""
    first = parts.get(0)
    if first is None or set(parts) != set(range(first.parts)) or len(first.base) != size:
        return None
    ordered = [parts[i] for i in range(first.parts)]
    starts = np.cumsum([0, *(p.factor.rows for p in ordered)])
    fits = all(p.parts == first.parts and p.factor.cols == first.factor.cols for p in ordered)
    if not fits or starts[-1] != size or any(p.first_row != a for p, a in zip(ordered, starts, strict=False)):
        return None
    return Response(np.asarray(first.base), np.vstack([p.factor.array() for p in ordered]))


@dataclass
class SiteExchange:
    """A community's side of one try: its polish, the coordinator's message it awaits, what it sent
    last (sent again when the coordinator repeats itself)."""

    round: str
    site: str
    iteration: int  # the try's
    polish: SitePolish
    exchange: int = 0
    step: int = 0  # the coordinator's step awaited
    sent: list[PolishReport] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)

    @classmethod
    def start(
        cls, round_id: str, site: str, iteration: int, qp: CommunityQP, multipliers: FloatArray
    ) -> SiteExchange:
        return cls(round_id, site, iteration, SitePolish.from_multipliers(qp, multipliers))

    def opening(self) -> list[PolishReport]:
        """Step 0: its response (or that it declines)."""
        return self._send(self._with_response(self._report(0)))

    def offer(self, msg: PolishPrices) -> tuple[list[PolishReport], Verdict | None]:
        """The reports answering the coordinator's message, and its verdict if it gave one."""
        if msg.iteration != self.iteration:
            self.ignored[OUT_OF_STEP] += 1
            return [], None
        if msg.verdict != "solve":
            return [], msg.verdict  # a verdict ends the try at any step
        if (msg.exchange, msg.step) == (self.exchange + 1, 0) and self.step == VERDICT_STEP:
            self.exchange, self.step = msg.exchange, 0
        if (msg.exchange, msg.step) != (self.exchange, self.step):
            repeated = (msg.exchange, msg.step) == (self.exchange, self.step - 1)
            self.ignored[DUPLICATE if repeated else OUT_OF_STEP] += 1
            return (list(self.sent) if repeated else []), None
        if len(msg.prices) != self.polish.coupling_size:
            self.ignored[INVALID] += 1
            return [], None
        self._take(np.asarray(msg.prices))
        if self.step < VERDICT_STEP:
            correction, values = self.polish.correction(), self.polish.coupling_values()
            if not _finite(correction, values):
                return self._send([self._declined(self.step)]), None
            return self._send([self._report(self.step, values=values, correction=correction)]), None
        return self._send(self._verdict()), None

    def _take(self, prices: FloatArray) -> None:
        if self.step == 0:
            self.polish.take_prices(prices)
        else:
            self.polish.take_correction(prices)
        self.step += 1

    def _verdict(self) -> list[PolishReport]:
        values = self.polish.coupling_values()  # before the check: what the coordinator checks
        changes = self.polish.check()
        if not _finite(values):
            return [self._declined(VERDICT_STEP)]
        report = self._report(VERDICT_STEP, values=values, changes=changes)
        return self._with_response(report) if changes.any else [report]

    def _with_response(self, report: PolishReport) -> list[PolishReport]:
        """The report with its response in parts (the first part in the report itself), or declined."""
        try:
            parts = response_parts(self.polish.response())
        except CannotPolishError as why:
            log.warning("%s: declines the polish of round %s: %s", self.site, self.round, why)
            return [self._declined(report.step)]
        first = report.model_copy(update={"response": parts[0]})
        return [first, *(self._report(report.step, response=p) for p in parts[1:])]

    def _report(
        self,
        step: int,
        *,
        values: FloatArray | None = None,
        correction: FloatArray | None = None,
        changes: Changes = UNCHANGED,
        response: ResponsePart | None = None,
    ) -> PolishReport:
        return PolishReport(
            round=self.round,
            sender=self.site,
            iteration=self.iteration,
            exchange=self.exchange,
            step=step,
            values=[] if values is None else values.tolist(),
            correction=[] if correction is None else correction.tolist(),
            joined=changes.joined,
            left=changes.left,
            response=response,
        )

    def _declined(self, step: int) -> PolishReport:
        return self._report(step).model_copy(update={"declined": True})

    def _send(self, reports: list[PolishReport]) -> list[PolishReport]:
        self.sent = reports
        return reports


def _finite(*arrays: FloatArray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def coupling_rows_of(peers: tuple[tuple[int, ...], ...], horizon: int, safe: SafeSet | None) -> CouplingRows:
    """The coupling rows from what the coordinator knows: the trading graph, the horizon, the safe set."""
    return coupling_rows([Layout(horizon, p) for p in peers], safe)


@dataclass
class DsoExchange:
    """The coordinator's side of one try."""

    round: str
    sites: tuple[str, ...]
    iteration: int  # the try's
    dso: DsoPolish
    max_rounds: int
    exchange: int = 0
    step: int = 0  # the communities' step awaited
    verdict: Verdict | None = None
    responses: dict[str, Response] = field(default_factory=dict)
    values: list[FloatArray] = field(default_factory=list)  # each site's, at the last verdict step
    ignored: Counter[str] = field(default_factory=Counter)
    sent: list[PolishPrices] = field(default_factory=list)
    _in: dict[str, dict[int, PolishReport]] = field(default_factory=dict)  # this step's, by site and part

    @classmethod
    def start(
        cls,
        round_id: str,
        sites: tuple[str, ...],
        iteration: int,
        rows: CouplingRows,
        granted: tuple[FloatArray, FloatArray],
        trade_prices: FloatArray,
        max_rounds: int,
    ) -> DsoExchange:
        dso = DsoPolish.from_grants(rows, *granted, trade_prices)
        return cls(round_id, sites, iteration, dso, max_rounds)

    def waiting_for(self) -> tuple[str, ...]:
        if self.verdict is not None:
            return ()
        return tuple(s for s in self.sites if not self._complete(s))

    def abandon(self) -> list[PolishPrices]:
        """End the try now (a stop requested): every community goes on with ADMM."""
        self.verdict = "abandoned"
        return self._send(self._verdicts())

    def offer(self, msg: PolishReport) -> list[PolishPrices]:
        """Keep a report; once every site's step is in, the coordinator's answer (else nothing)."""
        why = self._rejection(msg)
        if why is not None:
            self.ignored[why] += 1
            return []
        if msg.declined:
            log.warning("round %s: %s declines the polish; the try is abandoned", self.round, msg.sender)
            return self.abandon()
        self._in.setdefault(msg.sender, {})[_part(msg)] = msg
        if not all(self._complete(s) for s in self.sites):
            return []
        reports, self._in = self._in, {}
        try:
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                return self._send(self._answer(reports))
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
            log.warning("round %s: the polish failed (%s); the try is abandoned", self.round, exc)
            return self.abandon()

    def _rejection(self, msg: PolishReport) -> str | None:
        if msg.round != self.round:
            return WRONG_ROUND
        if msg.sender not in self.sites:
            return UNKNOWN_SENDER
        if (msg.iteration, msg.exchange, msg.step) != (self.iteration, self.exchange, self.step):
            return OUT_OF_STEP
        if _part(msg) in self._in.get(msg.sender, {}):
            return DUPLICATE
        if msg.declined:
            return None
        size = self.dso.rows.sizes[self.sites.index(msg.sender)]
        if msg.response is not None and not self._part_fits(msg.sender, msg.response, size):
            return INVALID
        if _part(msg) or self._report_fits(msg, size):
            return None
        return INVALID

    def _part_fits(self, site: str, part: ResponsePart, size: int) -> bool:
        """A part within the response's size, of as many parts as the others of its site."""
        others = [m.response for m in self._in.get(site, {}).values() if m.response is not None]
        agree = all(o.parts == part.parts and o.factor.cols == part.factor.cols for o in others)
        return agree and part.factor.cols <= size and part.first_row + part.factor.rows <= size

    def _report_fits(self, msg: PolishReport, size: int) -> bool:
        """A report's own fields (its first part's) as the step wants them."""
        wants_values = self.step > 0
        wants_correction = 0 < self.step < VERDICT_STEP
        changed = bool(msg.joined or msg.left)
        wants_response = self.step == 0 or (self.step == VERDICT_STEP and changed)
        return (
            len(msg.values) == (size if wants_values else 0)
            and len(msg.correction) == (size if wants_correction else 0)
            and wants_response == (msg.response is not None)
        )

    def _complete(self, site: str) -> bool:
        parts = self._in.get(site, {})
        first = parts.get(0)
        if first is None:
            return False
        return first.response is None or len(parts) == first.response.parts

    def _answer(self, reports: dict[str, dict[int, PolishReport]]) -> list[PolishPrices]:
        for site, parts in reports.items():
            if parts[0].response is None:
                continue
            size = self.dso.rows.sizes[self.sites.index(site)]
            response = assembled({p: m.response for p, m in parts.items() if m.response}, size)
            if response is None:  # its parts do not make a response: wait for good ones
                self.ignored[INVALID] += 1
                self._in = {s: r for s, r in reports.items() if s != site}
                return []
            self.responses[site] = response
        if self.step == 0:
            return self._prices()
        values = [np.asarray(reports[s][0].values) for s in self.sites]
        if self.step < VERDICT_STEP:
            corrections = [np.asarray(reports[s][0].correction) for s in self.sites]
            deltas = self.dso.correct(corrections, np.concatenate(values))
            self.step += 1
            return self._messages(deltas, self.step - 1)
        return self._after_checks(values, any(reports[s][0].joined or reports[s][0].left for s in self.sites))

    def _after_checks(self, values: list[FloatArray], sites_changed: bool) -> list[PolishPrices]:
        """Its own check; then the verdict, or the next exchange's prices."""
        self.values = values
        everything = np.concatenate(values)
        changed = self.dso.check(everything).any or sites_changed
        reciprocal = np.abs(self.dso.rows.b[: self.dso.rows.reciprocity] @ everything).max(initial=0.0)
        if not changed and reciprocal <= VIOLATION:
            self.verdict = "certified"
        elif self.exchange + 1 >= self.max_rounds:
            self.verdict = "abandoned"
        if self.verdict is not None:
            return self._verdicts()
        self.exchange += 1
        return self._prices()

    def _prices(self) -> list[PolishPrices]:
        prices = self.dso.prices([self.responses[s] for s in self.sites])
        self.step = 1
        return self._messages(prices, 0)

    def _messages(self, prices: list[FloatArray], step: int) -> list[PolishPrices]:
        if not all(np.isfinite(p).all() for p in prices):
            raise ArithmeticError("prices that are not finite")
        return [self._to(s, step, prices=p.tolist()) for s, p in zip(self.sites, prices, strict=True)]

    def _verdicts(self) -> list[PolishPrices]:
        assert self.verdict is not None
        return [self._to(s, VERDICT_STEP, verdict=self.verdict) for s in self.sites]

    def _to(
        self, site: str, step: int, prices: list[float] | None = None, verdict: Verdict | None = None
    ) -> PolishPrices:
        return PolishPrices(
            round=self.round,
            recipient=site,
            iteration=self.iteration,
            exchange=self.exchange,
            step=step,
            prices=prices or [],
            verdict=verdict or "solve",
        )

    def _send(self, messages: list[PolishPrices]) -> list[PolishPrices]:
        if messages:
            self.sent = messages
        return messages


def _part(msg: PolishReport) -> int:
    return msg.response.part if msg.response is not None else 0
