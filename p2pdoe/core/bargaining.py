"""Nash-bargaining payments over the trading links, decentralized: pure.

Stage 2 of the cooperative design (Wang & Huang, IEEE Trans. Smart Grid 2018; Kim, Lee, Bahrami &
Wong 2019). After the welfare agreement (stage 1) community i knows, and keeps to itself, its gain
g_i = C0_i - C*_i: its cost trading alone less its cost at the welfare optimum before any payment to
peers. The communities agree on a payment pi_e for every trading link e = (i, j), i paying j when
positive, to maximise

    sum_i w_i ln(g_i - sum_{e at i} s_ie pi_e)          (s_ie = +1 if i pays on e, -1 if it receives)

by consensus ADMM: each end of a link holds its own copy p_ie of pi_e, and the copies must agree.
Each community's step has a closed form (below); each link's agreement is the mean of its two
copies, which both ends compute from each other's proposals, like the trade prices of stage 1. What
crosses the wire is the proposed payments, never a gain: the messages and the machines that carry
them, and `bargain` that runs them in-process, are in p2pdoe.core.agreement.payments.

On a connected graph every vector of net payments that sums to zero is reachable, so the optimum
gives community i the share w_i / sum(w) of the total gain (`closed_form_gains`): with equal weights
every community gains the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Link = tuple[str, str]  # (payer when positive, payee), the link's own orientation


class BargainingError(ValueError):
    """The bargaining problem has no solution: there is no gain to share."""


def closed_form_gains(gains: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Each community's gain after the payments, on a connected trading graph: w_i / sum(w) of the
    total."""
    total, w = sum(gains.values()), sum(weights[c] for c in gains)
    if total <= 0:
        raise BargainingError(f"there is no gain to share (the total is {total:.2f} EUR)")
    return {c: weights[c] / w * total for c in gains}


@dataclass
class BargainingCommunity:
    """One community's part: its private gain, its weight, and its copies of its links' payments."""

    id: str
    gain_eur: float  # g_i: private
    weight: float
    links: Sequence[Link]
    rho: float
    copies: dict[Link, float] = field(default_factory=dict)  # p_ie, in the link's orientation
    duals: dict[Link, float] = field(default_factory=dict)  # lambda_ie
    agreed: dict[Link, float] = field(default_factory=dict)  # z_e

    def __post_init__(self) -> None:
        for e in self.links:
            self.copies.setdefault(e, 0.0)
            self.duals.setdefault(e, 0.0)
            self.agreed.setdefault(e, 0.0)

    def sign(self, e: Link) -> float:
        return 1.0 if e[0] == self.id else -1.0

    def propose(self) -> dict[Link, float]:
        """Minimise -w ln(g - sum_e x_e) + sum_e [l_e x_e + rho/2 (x_e - v_e)^2] over x_e = s_e p_e
        (what it pays on e), with l_e = s_e lambda_e and v_e = s_e z_e. Stationarity gives
        x_e = v_e - l_e / rho - w / (rho u) with u = g - sum_e x_e > 0, so u solves
        u^2 - (g - a) u - d w / rho = 0, a = sum_e (v_e - l_e / rho), d the number of links."""
        if not self.links:
            return {}
        d = len(self.links)
        base = {e: self.sign(e) * (self.agreed[e] - self.duals[e] / self.rho) for e in self.links}
        a = sum(base.values())
        b = self.gain_eur - a
        u = (b + math.sqrt(b * b + 4.0 * d * self.weight / self.rho)) / 2.0
        for e in self.links:
            self.copies[e] = self.sign(e) * (base[e] - self.weight / (self.rho * u))
        return dict(self.copies)

    def agree(self, theirs: Mapping[Link, float]) -> float:
        """Each link's agreement from both copies, then the dual step; the largest gap between the
        two copies of a link (EUR), the primal residual this community sees."""
        gap = 0.0
        for e in self.links:
            mine = self.copies[e]
            self.agreed[e] = 0.5 * (mine + theirs[e])
            self.duals[e] += self.rho * (mine - self.agreed[e])
            gap = max(gap, abs(mine - theirs[e]))
        return gap

    def net_payment(self) -> float:
        """What it pays its peers in all, at the agreed payments."""
        return sum(self.sign(e) * self.agreed[e] for e in self.links)


def rho_for_saving(weights: Mapping[str, float], saving_eur: float) -> float:
    """The log's curvature at an equal share, mean(w) / (S / n)^2 (1/EUR^2), S the saving to share:
    a public figure once the welfare agreement's saving is announced."""
    n = len(weights)
    return sum(weights.values()) / n / (saving_eur / n) ** 2


def default_rho(weights: Mapping[str, float], shares: Mapping[str, float]) -> float:
    """`rho_for_saving` of the total of `shares`."""
    return rho_for_saving({c: weights[c] for c in shares}, sum(shares.values()))


@dataclass(frozen=True)
class Bargain:
    payments: dict[Link, float]  # the agreed pi_e, payer first
    gains: dict[str, float]  # each community's gain after the payments
    iterations: int
    converged: bool


def links_of(peers: Mapping[str, Sequence[str]]) -> list[Link]:
    """Each trading link once, oriented from the community listed first in `peers`."""
    order = {c: k for k, c in enumerate(peers)}
    return sorted({(a, b) if order[a] < order[b] else (b, a) for a in peers for b in peers[a]}, key=str)
