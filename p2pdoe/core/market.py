"""The P2P market: who trades with whom, and every community's QP for a policy.

A trade from seller m to buyer c appears twice: as buy[c -> m] in c's problem and as
sell[m -> c] in m's problem. Reciprocity, buy[c, m, t] = sell[m, c, t], couples the two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from p2pdoe.core.community import CommunityQP, EnvelopeBounds, build_community_qp, envelope_margins
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy


@dataclass(frozen=True)
class TradeLink:
    """Seller `seller` sells to `buyer`; `buyer_pos` / `seller_pos` index each other's peer lists."""

    buyer: int
    seller: int
    buyer_pos: int  # position of the seller in the buyer's peers
    seller_pos: int  # position of the buyer in the seller's peers


def trade_links(peers: tuple[tuple[int, ...], ...]) -> list[TradeLink]:
    """Every ordered (buyer, seller) pair of the trading graph."""
    return [
        TradeLink(buyer, seller, pos, peers[seller].index(buyer))
        for buyer in range(len(peers))
        for pos, seller in enumerate(peers[buyer])
    ]


def envelope_bounds(policy: Policy) -> EnvelopeBounds:
    return EnvelopeBounds.HULL if policy is Policy.STATIC else EnvelopeBounds.PER_INTERVAL


def with_margins(s: Scenario, shares: tuple[float, float]) -> Scenario:
    """`s` with every community keeping envelope margins (what edge agents under the real-time
    controller solve: `envelope_margins`)."""
    return replace(
        s, communities=tuple(replace(c, margin_kw=envelope_margins(c, *shares)) for c in s.communities)
    )


def community_qps(s: Scenario, policy: Policy) -> list[CommunityQP]:
    qps = []
    for i, c in enumerate(s.communities):
        peers = s.market.peers[i]
        fees = s.market.fee_eur_per_kwh[i, list(peers)]
        qps.append(
            build_community_qp(
                c, peers, s.market, fees, s.price_import, s.price_export, s.dt_h, envelope_bounds(policy)
            )
        )
    return qps
