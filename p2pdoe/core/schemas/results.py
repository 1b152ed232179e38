"""results.json, schema version 1 (docs/results.md describes every field).

Conventions: powers in kW (injections export-positive), energies in kWh, money in EUR, prices in
EUR/kWh; time series are lists over intervals; `bus` numbers are the feeder's own (1-based for
IEEE 33-bus); matrices are [interval][bus] with bus 1 first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESULTS_SCHEMA_VERSION = 1

Series = list[float]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeederInfo(Model):
    name: str
    v0_pu: float
    vmin_pu: float
    vmax_pu: float
    vmin_margin_pu: float
    vmax_margin_pu: float
    bus_ids: list[int]
    branches: list[str]
    rating_kva: list[float | None]


class CostBreakdown(Model):
    grid_import_eur: float
    grid_export_eur: float  # revenue counted negative
    p2p_net_eur: float  # payments to peers minus receipts from peers
    network_fees_eur: float
    discomfort_eur: float
    battery_wear_eur: float


class CommunityResult(Model):
    id: str
    bus: int
    net_injection_kw: Series
    q_kvar: Series
    envelope_lo_kw: Series
    envelope_up_kw: Series
    cost_eur: float
    cost_breakdown: CostBreakdown
    envelope_value_eur: float
    p2p_bought_kwh: float
    p2p_sold_kwh: float
    curtailed_kwh: float
    grid_import_kw: Series
    grid_export_kw: Series
    pv_kw: Series
    wind_kw: Series
    flexible_load_kw: Series
    battery_charge_kw: Series
    battery_discharge_kw: Series
    soc_kwh: Series


class Trade(Model):
    seller: str
    buyer: str
    interval: int
    kw: float
    price_eur_per_kwh: float


class DlmpResult(Model):
    """Prices of envelope capacity at a community's bus (>= 0): voltage plus congestion parts."""

    id: str
    export_eur_per_kwh: Series
    export_voltage_eur_per_kwh: Series
    export_congestion_eur_per_kwh: Series
    import_eur_per_kwh: Series
    import_voltage_eur_per_kwh: Series
    import_congestion_eur_per_kwh: Series


class Totals(Model):
    p2p_traded_kwh: float
    curtailed_kwh: float
    cost_eur: float
    gross_energy_eur: float
    grid_import_kwh: float
    grid_export_kwh: float
    mean_envelope_width_kw: float  # up - lo, averaged over communities and intervals
    mean_usable_envelope_width_kw: float  # the part of each box the community's assets can reach


class NetworkState(Model):
    """Extremes of one operating point over the horizon; intervals 0-based, buses by number."""

    converged: bool
    vmin_pu: float
    vmin_bus: int
    vmin_interval: int
    vmax_pu: float
    vmax_bus: int
    vmax_interval: int
    max_loading_pct: float
    max_loading_branch: str
    max_loading_interval: int
    voltage_violations: int  # (bus, interval) pairs outside [vmin, vmax]
    thermal_violations: int  # (branch, interval) pairs above 100 % of rating
    losses_kwh: float
    voltage_pu: list[Series]  # [interval][bus]
    loading_pct: list[Series]  # [interval][branch], branches as in feeder.branches


class NetworkCheck(Model):
    schedule: NetworkState
    upper_corner: NetworkState
    lower_corner: NetworkState


class ResidualPoint(Model):
    """One ADMM iteration: l2 residuals and their stopping thresholds (kW), rho (EUR/kW^2h)."""

    iteration: int
    primal_trade_kw: float
    dual_trade_kw: float
    eps_trade_kw: float
    primal_envelope_kw: float
    dual_envelope_kw: float
    eps_envelope_kw: float
    rho_trade: float
    rho_envelope: float
    reciprocity_max_kw: float  # max |buy - sell| over the pairs' proposals
    envelope_gap_max_kw: float  # max |request - grant|
    price_change_max_eur_per_kwh: float = 0.0  # the most any price moved; the round stops within eps_price
    frozen_sites: list[str] | None = None  # closed without their new proposals (bounded staleness)


class SolveTimes(Model):
    """Wall time of one participant's step per iteration (its local solve and coupling update)."""

    id: str
    role: Literal["community", "dso"]
    median_ms: float
    p95_ms: float
    max_ms: float
    steps: int


class PolishResult(Model):
    """The certified polish's tries in a round (docs/agreement.md, "A certified polish")."""

    tries: int
    rounds: int  # solves at the parties' active sets, over every try
    steps: int  # the coordinator's answers, each a round trip through the broker
    certified_at: int | None  # ADMM iterations before the certified try; None: none certified
    messages: int  # both ways
    bytes: int


class SolverResult(Model):
    name: str
    status: str
    iterations: int
    converged: bool
    wall_time_s: float
    # ADMM only (None for the centralized solve):
    critical_path_s: float | None = None  # sum over iterations of slowest community + DSO step
    residual_history: list[ResidualPoint] | None = None
    solve_times: list[SolveTimes] | None = None
    messages_per_iteration: float | None = None  # mean published messages per iteration
    bytes_per_iteration: float | None = None  # mean wire bytes published per iteration
    reciprocity_max_kw: float | None = None  # in the last proposals (the settled trades match exactly)
    envelope_gap_max_kw: float | None = None  # last request against last grant
    final_solve: dict[str, str] | None = None  # per community: what its final schedule pinned
    ignored_messages: dict[str, int] | None = None  # by reason, summed over participants
    polish: PolishResult | None = None  # None: no polish tried


class Attempt(Model):
    """One round the coordinator opened: a site missing an iteration's deadline ends it, and the
    next attempt goes on without that site (on its default envelope)."""

    round: str
    sites: list[str]
    status: str  # converged, max_iterations, or deadline_missed
    iterations: int
    missed_deadline: list[str]


class SiteRuntime(Model):
    id: str
    state: Literal["agreed", "excluded"]
    reason: str | None  # why it was excluded
    reported: bool  # its site report reached the coordinator
    rss_mb: float | None  # the agent's peak resident memory, as it reported
    cpu_s: float | None  # the agent's process CPU time during the round, as it reported
    cpu_steps_s: float | None = None  # of which its participant's steps (solves), as it reported
    cpu_codec_s: float | None = None  # of which decoding and encoding agreement messages


class DefaultEnvelope(Model):
    """A site's default envelope: the box inside it all day, and per interval (a profile)."""

    id: str
    lo_kw: float
    up_kw: float
    need_kw: float | None = None  # the most import it needs to stay whole (held where the network can)
    lo_profile_kw: list[float] | None = None
    up_profile_kw: list[float] | None = None
    need_profile_kw: list[float] | None = None


class CoordinatorCpu(Model):
    """The coordinator's CPU time in the round (seconds), each part in the thread that spent it."""

    round_s: float  # its process's, from the opening to the end of the round
    dso_steps_s: float  # in its DSO participant, every proposal (parsing, checks, the iterations)
    codec_s: float  # decoding proposals, encoding grants and progress


class RuntimeInfo(Model):
    """How a distributed round ran (mode "distributed" only)."""

    protocol: str  # the MQTT version the coordinator's connection speaks
    registration_wait_s: float
    attempts: list[Attempt]
    sites: list[SiteRuntime]
    default_envelopes: list[DefaultEnvelope]
    iteration_wall_ms: dict[str, float]  # median, p95, max: grant to grant at the coordinator
    dropped_messages: dict[str, int]  # by reason, before any participant saw them
    coordinator_cpu: CoordinatorCpu | None = None  # None from a coordinator that does not measure it


class RealtimeInterval(Model):
    """One interval of the real-time day: the rolling round that set its envelopes."""

    interval: int  # of the day, 0-based
    start: str
    round: str | None  # None: no round could be run; the last agreement (or the defaults) stood
    status: str  # converged, stopped (its deadline), max_iterations, failed
    iterations: int
    wall_s: float
    lead_s: float  # simulated seconds between publishing its envelopes and its start
    sites: list[str]
    lo_kw: dict[str, float]  # the envelopes published for it
    up_kw: dict[str, float]


class SettlementResult(Model):
    """One site's settlement of one interval, as the site sent it (see SettlementRecord)."""

    site: str
    interval_start: str
    round: str | None
    measured_kwh: float
    scheduled_kwh: float
    deviation_kwh: float
    p2p_paid_eur: float
    p2p_received_eur: float
    grid_kwh: float
    grid_eur: float
    net_eur: float
    readings: int
    covered_s: float
    envelope: str
    meter_kwh: float | None  # the coordinator's own integral of the site's readings


class ViolationResult(Model):
    site: str
    start: str
    end: str
    readings: int
    worst_kw: float


class EnvelopeViolations(Model):
    """Sustained violations (three readings in a row beyond max(1 kW, 2 %)) from the broker alone."""

    count: int
    by_site: dict[str, int]
    judged_readings: int
    outside_readings: int
    events: list[ViolationResult]


class FallbackEvent(Model):
    site: str
    ts: str
    envelope: str
    reason: str | None
    alarm: str | None
    alarms: list[str] = Field(default_factory=list)  # every alarm the site raised then


class Unsettled(Model):
    """An interval of a site's real-time day without a settlement, and why, as far as the
    coordinator can tell."""

    site: str
    interval_start: str
    cause: str


class RealtimeInfo(Model):
    speed: float
    hours: float
    meter_readings: int
    intervals: list[RealtimeInterval]
    settlements: list[SettlementResult]
    envelope_violations: EnvelopeViolations
    fallback_events: list[FallbackEvent]
    missing_settlements: dict[str, list[str]]  # site -> interval starts never settled
    unsettled: list[Unsettled] = Field(default_factory=list)  # the same, each with its cause
    energy_mismatch_max_pct: float  # journal vs the coordinator's meter integral, worst interval
    measured_ac: NetworkState | None  # AC power flow of the measured mean injections per interval
    clock: str = "scaled"  # wall, scaled, virtual or lockstep
    day_ahead_late_s: float = 0.0  # the day-ahead envelopes came this long after the day began
    failed_rounds: list[str] = Field(default_factory=list)  # rolling rounds that failed, and why
    dropped_messages: dict[str, int] = Field(default_factory=dict)  # by the coordinator all day, by reason


class Payment(Model):
    payer: str
    payee: str
    eur: float  # positive: the payer pays the payee


class CoalitionValue(Model):
    members: list[str]
    value_eur: float  # what the members save together against trading alone


class MarketOutcome(Model):
    """A design's outcome beyond its schedule (docs/markets.md): each community's cost alone (the
    standalone round), the payments (Nash bargaining: agreed over the links; Shapley: each
    community's value; noncooperative: its trades at the prices its bids cleared at), and its gain
    after them."""

    design: Literal["nash-bargaining", "shapley", "noncooperative"]
    baseline_round: str  # the standalone round
    payment_round: str | None  # Nash bargaining's
    status: str
    iterations: int
    weights: dict[str, float]
    baseline_cost_eur: dict[str, float]  # C0 per community
    cost_before_payments_eur: dict[str, float]  # C* per community: its welfare cost less its trades
    payments: list[Payment]
    net_payment_eur: dict[str, float]  # what each pays its peers in all
    gains_eur: dict[str, float]  # C0 - (C* + net payment)
    messages_per_iteration: float | None = None
    bytes_per_iteration: float | None = None
    # Shapley: every coalition's value from its own round (the grand one the welfare round's), and
    # where the values were sampled, each one's standard error
    coalitions: list[CoalitionValue] = Field(default_factory=list)
    sampling_error_eur: dict[str, float] | None = None
    # noncooperative: where best responses ended (one profile: an equilibrium; more: a cycle), each
    # profile's sale markups per community (EUR/kWh), the profile in force (of a cycle the one that
    # saves least), how many profiles were cleared, and the optimal saving over the saving in force
    equilibrium: bool | None = None
    bids: list[dict[str, float]] = Field(default_factory=list)
    bids_in_force: dict[str, float] | None = None
    profiles_cleared: int | None = None
    price_of_anarchy: float | None = None


class Results(Model):
    schema_version: Literal[1] = 1
    kind: Literal["results"] = "results"
    scenario: str
    mode: Literal["centralized", "admm", "distributed"]
    envelope: Literal["dynamic", "static", "none"]
    feeder: FeederInfo
    start: str
    dt_h: float
    intervals: int
    objective_eur: float
    bus_load_kw: list[Series]
    bus_load_kvar: list[Series]
    communities: list[CommunityResult]
    trades: list[Trade]
    dlmp: list[DlmpResult]
    totals: Totals
    ac_check: NetworkCheck
    lindistflow_check: NetworkCheck
    solver: SolverResult
    runtime: RuntimeInfo | None = None
    realtime: RealtimeInfo | None = None
    market: MarketOutcome | None = None  # a design with payments of its own (nash-bargaining)


class DaySummary(Model):
    """A day in a few numbers, beside its results (results/<date>.json): what an operator reads
    first each morning. Energies in kWh, money in EUR; measured figures None without a real-time day."""

    schema_version: Literal[1] = 1
    kind: Literal["day_summary"] = "day_summary"
    date: str  # the DSO's local date
    timezone: str
    start: str  # UTC
    end: str
    intervals: int
    day_ahead_round: str | None  # the agreement the day began with (None: the defaults stood)
    day_ahead_status: str | None
    day_ahead_iterations: int
    sites_agreed: int
    sites_excluded: int
    objective_eur: float  # the day-ahead agreement's
    p2p_traded_kwh: float  # scheduled
    rolling_rounds: int
    failed_rounds: int
    settlements: int
    missing_settlements: int
    sustained_violations: int | None
    worst_violation_kw: float | None
    envelope_switches: int | None
    measured_grid_import_kwh: float | None  # from the settlements
    measured_grid_export_kwh: float | None
    net_cost_eur: float | None  # every site's settled net cost together
    measured_vmin_pu: float | None  # AC power flow of the measured injections
    measured_vmax_pu: float | None
    measured_max_loading_pct: float | None
    # the day's default envelopes: the sharing rule, and Jain's fairness index of each site's mean
    # default width within its connection capacity (1: all equal; 1/n: one site holds all the room)
    default_sharing: str | None = None
    default_fairness: float | None = None
