"""The P2P market: who trades with whom, and every community's QP for a policy.

A trade from seller m to buyer c appears twice: as buy[c -> m] in c's problem and as
sell[m -> c] in m's problem. Reciprocity, buy[c, m, t] = sell[m, c, t], couples the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pdoe.core.community import CommunityQP, EnvelopeBounds, build_community_qp
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy


@dataclass(frozen=True)
class TradeLink:
    """Seller `seller` sells to `buyer`; `buyer_pos` / `seller_pos` index each other's peer lists."""

    buyer: int
    seller: int
    buyer_pos: int  # position of the seller in the buyer's peers
    seller_pos: int  # position of the buyer in the seller's peers


def peers_of(c: int, n: int) -> tuple[int, ...]:
    return tuple(m for m in range(n) if m != c)


def trade_links(n: int) -> list[TradeLink]:
    links = []
    for buyer in range(n):
        for seller in peers_of(buyer, n):
            links.append(
                TradeLink(buyer, seller, peers_of(buyer, n).index(seller), peers_of(seller, n).index(buyer))
            )
    return links


def envelope_bounds(policy: Policy) -> EnvelopeBounds:
    return EnvelopeBounds.HULL if policy is Policy.STATIC else EnvelopeBounds.PER_INTERVAL


def community_qps(s: Scenario, policy: Policy) -> list[CommunityQP]:
    n = len(s.communities)
    qps = []
    for i, c in enumerate(s.communities):
        peers = peers_of(i, n)
        fees = s.market.fee_eur_per_kwh[i, list(peers)]
        qps.append(
            build_community_qp(
                c, peers, s.market, fees, s.price_import, s.price_export, s.dt_h, envelope_bounds(policy)
            )
        )
    return qps
