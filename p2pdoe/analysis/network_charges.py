"""DLMP network charges: each community pays the prices of the envelope capacity it was granted, and
the DSO keeps what they add up to, its merchandising surplus (docs/markets.md, "Network charges").

In this market the network's limits bind on the envelopes, not on the energy that flows: the DSO's
safe set is G_up UP <= h_up and G_lo LO >= h_lo (p2pdoe.core.envelope), and its DLMPs are those rows'
multipliers at each bus, mu_exp = G_up' lambda_up / dt and mu_imp = G_lo' lambda_lo / dt
(`Results.dlmp`). So the charge is levied on the granted capacity:

    charge_c = sum_t dt (mu_exp[c, t] UP[c, t] + mu_imp[c, t] (-LO[c, t])),

split into its voltage and congestion parts. An envelope wholly on one side of zero earns a credit
there: UP < 0 (a site that must import at least -UP) relieves the export limits it is priced on.

By complementary slackness the charges add up to the feeder's headroom at its shadow prices,
sum(lambda_up h_up) - sum(lambda_lo h_lo): the DSO sells the capacity its limits leave, at the price
the market put on it, and collects no more and no less.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pdoe.core.schemas.results import Results


@dataclass(frozen=True)
class NetworkCharge:
    """One community's charge for its envelope over the day, EUR, by part (negative: a credit)."""

    export_voltage_eur: float
    export_congestion_eur: float
    import_voltage_eur: float
    import_congestion_eur: float

    @property
    def total_eur(self) -> float:
        return (
            self.export_voltage_eur
            + self.export_congestion_eur
            + self.import_voltage_eur
            + (self.import_congestion_eur)
        )


def network_charges(results: Results) -> dict[str, NetworkCharge]:
    """Each community's charge for the envelope `results` granted it, at `results`' DLMPs."""
    prices = {d.id: d for d in results.dlmp}
    out = {}
    for c in results.communities:
        d = prices[c.id]
        up = np.asarray(c.envelope_up_kw) * results.dt_h
        down = -np.asarray(c.envelope_lo_kw) * results.dt_h
        out[c.id] = NetworkCharge(
            export_voltage_eur=float(np.dot(d.export_voltage_eur_per_kwh, up)),
            export_congestion_eur=float(np.dot(d.export_congestion_eur_per_kwh, up)),
            import_voltage_eur=float(np.dot(d.import_voltage_eur_per_kwh, down)),
            import_congestion_eur=float(np.dot(d.import_congestion_eur_per_kwh, down)),
        )
    return out


def merchandising_surplus(charges: dict[str, NetworkCharge]) -> float:
    """What the DSO collects: every community's charge."""
    return float(sum(c.total_eur for c in charges.values()))
