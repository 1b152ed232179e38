"""The certified polish over the wire (issue 18): `polish.polish`'s exchange as messages, no I/O.

A grant that says `polish` starts a try. Every community answers with its response (`PolishReport`
step 0, cut into parts under the size limit); the coordinator answers with each one's prices
(`PolishPrices` step 0). Then REFINEMENTS corrections each way: a community's step j (1..R) answers
the coordinator's step j - 1, whose steps 1..R refine the prices. A community's step R + 1 is its
verdict: its coupling values, what the check of its own rows changed, and its new response if it
changed. The coordinator checks its own rows and answers "certified" (every party kept its rows:
the optimum), "abandoned" (the try's exchanges ran out: ADMM goes on where it was), or the next
exchange's prices (step 0 of exchange e + 1, from the responses it holds)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from p2pdoe.core.agreement.polish import (
    REFINEMENTS,
    Changes,
    CouplingRows,
    DsoPolish,
    Response,
    SitePolish,
    coupling_rows,
)
from p2pdoe.core.community import CommunityQP, Layout
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.messages import PolishPrices, PolishReport, ResponsePart, matrix_of

if TYPE_CHECKING:  # an edge agent never imports the safe set's module
    from p2pdoe.core.envelope import SafeSet

VERDICT_STEP = REFINEMENTS + 1  # a community's last step of an exchange
PART_BYTES = 2 * 1024 * 1024  # of a factor's raw floats per message (base64 adds a third)
Verdict = Literal["certified", "abandoned"]
UNCHANGED = Changes()


def response_parts(response: Response) -> list[ResponsePart]:
    """The response cut into parts of at most PART_BYTES of factor each; the first carries the base."""
    m, r = response.factor.shape
    per_part = max(1, PART_BYTES // max(1, 8 * r))
    starts = range(0, m, per_part)
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
    if first is None or len(parts) != first.parts or len(first.base) != size:
        return None
    ordered = [parts[i] for i in range(first.parts)]
    cols = {p.factor.cols for p in ordered}
    starts = np.cumsum([0, *(p.factor.rows for p in ordered)])
    if (
        len(cols) != 1
        or starts[-1] != size
        or any(p.first_row != a for p, a in zip(ordered, starts, strict=False))
    ):
        return None
    factor = np.vstack([p.factor.array() for p in ordered]) if ordered else np.zeros((size, 0))
    return Response(np.asarray(first.base), factor)


@dataclass
class SiteExchange:
    """A community's side of one try: its polish, the coordinator's message it awaits, what it sent
    last (sent again when the coordinator repeats itself)."""

    round: str
    site: str
    polish: SitePolish
    exchange: int = 0
    step: int = 0  # the coordinator's step awaited
    sent: list[PolishReport] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)

    @classmethod
    def start(cls, round_id: str, site: str, qp: CommunityQP, multipliers: FloatArray) -> SiteExchange:
        return cls(round_id, site, SitePolish.from_multipliers(qp, multipliers))

    def opening(self) -> list[PolishReport]:
        """Step 0: its response."""
        return self._send([self._report(0, response=p) for p in response_parts(self.polish.response())])

    def offer(self, msg: PolishPrices) -> tuple[list[PolishReport], Verdict | None]:
        """The reports answering the coordinator's message, and its verdict if it gave one."""
        if msg.verdict != "solve":
            if (msg.exchange, msg.step) != (self.exchange, VERDICT_STEP):
                self.ignored["polish_out_of_step"] += 1
                return [], None
            return [], msg.verdict
        if (msg.exchange, msg.step) == (self.exchange + 1, 0) and self.step == VERDICT_STEP:
            self.exchange, self.step = msg.exchange, 0
        if (msg.exchange, msg.step) != (self.exchange, self.step):
            repeated = (msg.exchange, msg.step) == (self.exchange, self.step - 1)
            self.ignored["polish_repeated" if repeated else "polish_out_of_step"] += 1
            return (list(self.sent) if repeated else []), None
        if len(msg.prices) != self.polish.coupling_size:
            self.ignored["polish_invalid"] += 1
            return [], None
        prices = np.asarray(msg.prices)
        if self.step == 0:
            self.polish.take_prices(prices)
        else:
            self.polish.take_correction(prices)
        self.step += 1
        if self.step < VERDICT_STEP:
            correction = self.polish.correction()
            return self._send([self._report(self.step, correction=correction)]), None
        return self._send(self._verdict()), None

    def _verdict(self) -> list[PolishReport]:
        values = self.polish.coupling_values()  # before the check: what the coordinator checks
        changes = self.polish.check()
        if not changes.any:
            return [self._report(VERDICT_STEP, values=values, changes=changes)]
        parts = response_parts(self.polish.response())
        first = self._report(VERDICT_STEP, values=values, changes=changes, response=parts[0])
        return [first, *(self._report(VERDICT_STEP, response=p) for p in parts[1:])]

    def _report(
        self,
        step: int,
        *,
        values: FloatArray | None = None,
        correction: FloatArray | None = None,
        changes: Changes = UNCHANGED,
        response: ResponsePart | None = None,
    ) -> PolishReport:
        if values is None and step and correction is not None:
            values = self.polish.coupling_values()
        return PolishReport(
            round=self.round,
            sender=self.site,
            exchange=self.exchange,
            step=step,
            values=[] if values is None else values.tolist(),
            correction=[] if correction is None else correction.tolist(),
            joined=changes.joined,
            left=changes.left,
            response=response,
        )

    def _send(self, reports: list[PolishReport]) -> list[PolishReport]:
        self.sent = reports
        return reports


def coupling_rows_of(peers: tuple[tuple[int, ...], ...], horizon: int, safe: SafeSet | None) -> CouplingRows:
    """The coupling rows from what the coordinator knows: the trading graph, the horizon, the safe set."""
    return coupling_rows([Layout(horizon, p) for p in peers], safe)


@dataclass
class _Step:
    """The reports of one step: per site, its parts (part 0 carries the step's values)."""

    parts: dict[str, dict[int, PolishReport]] = field(default_factory=dict)


@dataclass
class DsoExchange:
    """The coordinator's side of one try."""

    round: str
    sites: tuple[str, ...]
    dso: DsoPolish
    max_rounds: int
    exchange: int = 0
    step: int = 0  # the communities' step awaited
    verdict: Verdict | None = None
    responses: dict[str, Response] = field(default_factory=dict)
    values: list[FloatArray] = field(default_factory=list)  # each site's, at the last verdict step
    ignored: Counter[str] = field(default_factory=Counter)
    sent: list[PolishPrices] = field(default_factory=list)
    _in: _Step = field(default_factory=_Step)

    @classmethod
    def start(
        cls,
        round_id: str,
        sites: tuple[str, ...],
        rows: CouplingRows,
        granted: tuple[FloatArray, FloatArray],
        trade_prices: FloatArray,
        max_rounds: int,
    ) -> DsoExchange:
        return cls(round_id, sites, DsoPolish.from_grants(rows, *granted, trade_prices), max_rounds)

    def waiting_for(self) -> tuple[str, ...]:
        if self.verdict is not None:
            return ()
        return tuple(s for s in self.sites if not self._complete(s))

    def offer(self, msg: PolishReport) -> list[PolishPrices]:
        """Keep a report; once every site's step is in, the coordinator's answer (else nothing)."""
        why = self._rejection(msg)
        if why is not None:
            self.ignored[why] += 1
            return []
        part = msg.response.part if msg.response is not None else 0
        box = self._in.parts.setdefault(msg.sender, {})
        if part in box:
            self.ignored["duplicate"] += 1
            return []
        box[part] = msg
        if not all(self._complete(s) for s in self.sites):
            return []
        reports = {s: self._in.parts[s] for s in self.sites}
        self._in = _Step()
        return self._send(self._answer(reports))

    def _rejection(self, msg: PolishReport) -> str | None:
        if msg.round != self.round or self.verdict is not None:
            return "wrong_round"
        if msg.sender not in self.sites:
            return "unknown_sender"
        if (msg.exchange, msg.step) != (self.exchange, self.step):
            return "polish_out_of_step"
        size = self.dso.rows.sizes[self.sites.index(msg.sender)]
        first = msg.response is None or msg.response.part == 0
        if not first:
            return None
        wants_values = self.step > 0
        if wants_values and len(msg.values) != size:
            return "invalid"
        if (0 < self.step < VERDICT_STEP) != bool(msg.correction) or (
            msg.correction and len(msg.correction) != size
        ):
            return "invalid"
        changed = bool(msg.joined or msg.left)
        wants_response = self.step == 0 or (self.step == VERDICT_STEP and changed)
        if wants_response != (msg.response is not None):
            return "invalid"
        return None

    def _complete(self, site: str) -> bool:
        parts = self._in.parts.get(site, {})
        first = parts.get(0)
        if first is None:
            return False
        return first.response is None or len(parts) == first.response.parts

    def _answer(self, reports: dict[str, dict[int, PolishReport]]) -> list[PolishPrices]:
        for site, parts in reports.items():
            if parts[0].response is not None:
                size = self.dso.rows.sizes[self.sites.index(site)]
                response = assembled({p: m.response for p, m in parts.items() if m.response}, size)
                if response is None:
                    self.ignored["invalid"] += 1
                    self.verdict = "abandoned"  # a response that does not fit: no try with it
                    return self._verdicts()
                self.responses[site] = response
        if self.step == 0:
            return self._prices()
        values = [np.asarray(reports[s][0].values) for s in self.sites]
        if self.step < VERDICT_STEP:
            corrections = [np.asarray(reports[s][0].correction) for s in self.sites]
            deltas = self.dso.correct(corrections, np.concatenate(values))
            self.step += 1
            return self._messages(deltas, self.step - 1)
        self.values = values
        changes = self.dso.check(np.concatenate(values))
        changed = changes.any or any(reports[s][0].joined or reports[s][0].left for s in self.sites)
        if not changed:
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
        return [
            PolishPrices(round=self.round, recipient=s, exchange=self.exchange, step=step, prices=p.tolist())
            for s, p in zip(self.sites, prices, strict=True)
        ]

    def _verdicts(self) -> list[PolishPrices]:
        assert self.verdict is not None
        return [
            PolishPrices(
                round=self.round, recipient=s, exchange=self.exchange, step=VERDICT_STEP, verdict=self.verdict
            )
            for s in self.sites
        ]

    def _send(self, messages: list[PolishPrices]) -> list[PolishPrices]:
        self.sent = messages
        return messages
