"""A round's warm start from the previous round's outcome (docs/agreement.md, "Warm start").

In a rolling horizon the coordinator opens a round every interval over the rest of the day. The
previous round's final agreed values and prices, moved on by the intervals that have passed, are
where the new round's couplings start: the DSO announces them in its `RoundOpen`, so both parties of
every coupling start from the same numbers.
"""

from __future__ import annotations

from p2pdoe.core.agreement.coupling import Agreed
from p2pdoe.core.agreement.dso import DsoOutcome, RoundPlan, links_of
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.messages import WarmEnvelope, WarmStart, WarmTrade


def warm_start_from(
    plan: RoundPlan, outcome: DsoOutcome, shift: int, horizon: int, sites: tuple[str, ...]
) -> WarmStart:
    """The previous round's (`plan`, `outcome`) final agreed trades and envelopes with their prices,
    without its first `shift` intervals and over the next `horizon`, for the couplings between
    `sites` (the new round's); a coupling the previous round did not have starts cold. The new round
    must have the previous round's interval length."""
    previous = outcome.trades.y.shape[1]
    if shift < 0 or horizon < 1 or previous - shift < horizon:
        raise ValueError(f"a {previous}-interval round moved on by {shift} cannot cover {horizon} intervals")
    keep = slice(shift, shift + horizon)
    present = set(sites)
    trades = [
        WarmTrade(
            buyer=plan.sites[b],
            seller=plan.sites[s],
            kw=_series(outcome.trades.y[i, keep]),
            price_eur_per_kwh=_series(outcome.trades.price[i, keep] / plan.dt_h),
        )
        for i, (b, s) in enumerate(links_of(plan.peers))
        if plan.sites[b] in present and plan.sites[s] in present
    ]
    envelopes = []
    if outcome.lo is not None and outcome.up is not None:
        envelopes = [
            _envelope(site, outcome.lo, outcome.up, c, keep, plan.dt_h)
            for c, site in enumerate(plan.sites)
            if site in present
        ]
    return WarmStart(trades=trades, envelopes=envelopes)


def shifted(warm: WarmStart, shift: int, horizon: int, sites: tuple[str, ...]) -> WarmStart:
    """`warm` without its first `shift` intervals, over the next `horizon`, for the couplings between
    `sites`: what `warm_start_from` gives for the same shift, from a warm start kept (or saved) whole."""
    lengths = {len(t.kw) for t in warm.trades} | {len(e.lo_kw) for e in warm.envelopes}
    if shift < 0 or horizon < 1 or any(n - shift < horizon for n in lengths):
        raise ValueError(
            f"a warm start of {sorted(lengths)} intervals moved on by {shift} cannot cover {horizon}"
        )
    keep = slice(shift, shift + horizon)
    present = set(sites)
    return WarmStart(
        trades=[
            WarmTrade(
                buyer=t.buyer, seller=t.seller, kw=t.kw[keep], price_eur_per_kwh=t.price_eur_per_kwh[keep]
            )
            for t in warm.trades
            if t.buyer in present and t.seller in present
        ],
        envelopes=[
            WarmEnvelope(
                site=e.site,
                lo_kw=e.lo_kw[keep],
                up_kw=e.up_kw[keep],
                lo_price_eur_per_kwh=e.lo_price_eur_per_kwh[keep],
                up_price_eur_per_kwh=e.up_price_eur_per_kwh[keep],
            )
            for e in warm.envelopes
            if e.site in present
        ],
    )


def _envelope(site: str, lo: Agreed, up: Agreed, c: int, keep: slice, dt_h: float) -> WarmEnvelope:
    return WarmEnvelope(
        site=site,
        lo_kw=_series(lo.y[c, keep]),
        up_kw=_series(up.y[c, keep]),
        lo_price_eur_per_kwh=_series(lo.price[c, keep] / dt_h),
        up_price_eur_per_kwh=_series(up.price[c, keep] / dt_h),
    )


def _series(values: FloatArray) -> list[float]:
    return [float(v) for v in values]
