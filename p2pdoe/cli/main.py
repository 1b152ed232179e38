"""The `p2pdoe` command line: powerflow, solve, compare, schema, site-config, provision, monitor,
demo.

Every error a user can cause ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from p2pdoe.errors import P2PDoeError

EXIT_USAGE = 2
ENVELOPE_HELP = (
    "the envelope policy: dynamic (agreed per interval with the DSO), static (one fixed box per site "
    "for the day) or none (no envelope; the network unchecked); default dynamic"
)


def build_parser() -> argparse.ArgumentParser:
    from p2pdoe import __version__

    parser = argparse.ArgumentParser(
        prog="p2pdoe",
        description="P2P energy trading between energy communities under dynamic operating envelopes.",
    )
    parser.add_argument("--version", action="version", version=f"p2pdoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _powerflow_parser(sub)
    _solve_parser(sub)
    _compare_parser(sub)
    _schema_parser(sub)
    _site_config_parser(sub)
    _provision_parser(sub)
    _monitor_parser(sub)
    _csip_parser(sub)
    _demo_parser(sub)
    return parser


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run the whole system here: a broker, the coordinator and one edge agent per community"
    )
    _scenario_args(p)
    p.add_argument("--broker", help="mqtt://host:port of a running broker (default: start the embedded one)")
    p.add_argument(
        "--secure",
        action="store_true",
        help="provision a bundle (out/bundle) and run everything under Mosquitto with TLS and the ACL",
    )
    p.add_argument("--envelope", choices=["dynamic", "static", "none"], default="dynamic", help=ENVELOPE_HELP)
    p.add_argument("--day-ahead", action="store_true", help="stop after the day-ahead round")
    p.add_argument(
        "--default-sharing",
        choices=["max-min", "equal", "proportional-capacity", "proportional-need"],
        help="how the default envelopes share the network's room (default: the scenario's, max-min)",
    )
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours of the real-time day (24)")
    p.add_argument("--days", type=int, default=1, help="whole real-time days one after another (1)")
    p.add_argument(
        "--dated",
        action="store_true",
        help="each date its own scenario (its seeded profiles): the meters follow it and every site "
        "gets it as its forecast (out/forecasts); without it every date reads the configured day",
    )
    p.add_argument(
        "--speed",
        type=float,
        help="run on the scaled clock at this many simulated seconds per wall second (real-time pressure; "
        "default: the lockstep clock, whose outcome does not depend on the machine's speed)",
    )
    p.add_argument("--meter-rate-s", type=float, default=30.0, help="simulated seconds between readings")
    p.add_argument(
        "--lead-s",
        type=float,
        default=20.0,
        help="with --speed: wall seconds from start to the day's start (the day-ahead round)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="output folder (results.json, plots, logs)"
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from p2pdoe.cli.demo import RealTime, run_demo

    if not args.day_ahead and args.intervals is None and args.dt_h is None:
        args.intervals, args.dt_h = 96, 0.25  # the real-time day runs on 15-minute intervals
    overrides = _overrides(args)
    speed_ok = args.speed is None or args.speed > 0
    if not 0 < args.hours <= 24 or not speed_ok or not args.meter_rate_s > 0 or not args.lead_s > 0:
        raise P2PDoeError(
            "--hours must lie in (0, 24]; --speed, --meter-rate-s and --lead-s must be positive"
        )
    if args.days < 1 or (args.days > 1 and (args.day_ahead or args.hours != 24.0)):
        raise P2PDoeError(
            "--days must be at least 1, and several days run whole days: no --hours or --day-ahead"
        )
    clock: Literal["lockstep", "scaled"] = "lockstep" if args.speed is None else "scaled"
    speed = 640.0 if args.speed is None else args.speed
    if args.dated and args.day_ahead:
        raise P2PDoeError("--dated is for the real-time days: leave out --day-ahead")
    rt = RealTime(args.hours, speed, args.meter_rate_s, args.lead_s, clock, days=args.days, dated=args.dated)
    run_demo(
        args.scenario, overrides, args.broker, args.out, args.day_ahead, args.envelope, rt, args.secure,
        args.default_sharing,
    )  # fmt: skip
    return 0


def _monitor_parser(sub: Any) -> None:
    from p2pdoe.cli.monitor import add_monitor_arguments

    p = sub.add_parser(
        "monitor", help="show live each site's status and envelope, and the coordinator's round"
    )
    add_monitor_arguments(p)
    p.set_defaults(run=_run_monitor)


def _run_monitor(args: argparse.Namespace) -> int:
    from p2pdoe.cli.monitor import run_monitor

    return run_monitor(args)


def _csip_parser(sub: Any) -> None:
    p = sub.add_parser(
        "csip-server", help="serve each site's envelopes over HTTPS as CSIP-AUS (IEEE 2030.5) resources"
    )
    p.add_argument("--bundle", type=Path, required=True, help="the deployment bundle (p2pdoe provision)")
    p.add_argument("--host", help="the address to listen on (default: the bundle's broker host)")
    p.add_argument("--port", type=int, help="the HTTPS port (default: the bundle's, 8443)")
    p.add_argument(
        "--pen",
        type=int,
        default=0,
        help="the operator's IANA private enterprise number: the last 8 digits of every mRID (default 0)",
    )
    p.add_argument(
        "--csipaus",
        choices=["1.2", "1.3"],
        default="1.2",
        help="the CSIP-AUS version whose namespace the limits are written in (default 1.2)",
    )
    p.add_argument(
        "--fail-safe-import-w",
        type=float,
        metavar="W",
        help="with --fail-safe-export-w: the DefaultDERControl served while no valid default envelope is "
        "heard (e.g. the connection agreement's; default: none: 2030.5 leaves the device to its own)",
    )
    p.add_argument("--fail-safe-export-w", type=float, metavar="W", help="see --fail-safe-import-w")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S", help="broker wait (10 s)")
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="WARNING",
        help="INFO also logs each refused request and the broker's reconnections (default WARNING)",
    )
    p.set_defaults(run=_run_csip)


def _run_csip(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from p2pdoe.services.csip_server import load_config, serve
    from p2pdoe.services.settings import configure_logging

    fail_safe = (args.fail_safe_import_w, args.fail_safe_export_w)
    if (fail_safe[0] is None) != (fail_safe[1] is None):
        raise P2PDoeError("--fail-safe-import-w and --fail-safe-export-w go together")
    chosen = None if fail_safe[0] is None or fail_safe[1] is None else (fail_safe[0], fail_safe[1])
    config, broker = load_config(args.bundle, args.host, args.port, args.pen, args.csipaus, chosen)
    configure_logging(args.log_level, "csip-server")

    async def started(_: object) -> None:
        print(f"CSIP-AUS server on https://{config.host}:{config.port}/dcap", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, broker, args.connect_timeout, started))
    return 0


def _site_config_parser(sub: Any) -> None:
    p = sub.add_parser(
        "site-config", help="split a scenario into one edge configuration per community (its data only)"
    )
    p.add_argument("--scenario", default="default", help="a named scenario or a scenario file")
    p.add_argument(
        "--out", type=Path, required=True, help="writes OUT/sites/<id>.json and OUT/coordinator.json"
    )
    p.set_defaults(run=_run_site_config)


def _run_site_config(args: argparse.Namespace) -> int:
    from p2pdoe.io.scenarios import load_scenario
    from p2pdoe.io.site_configs import write_site_configs

    for path in write_site_configs(load_scenario(args.scenario), args.out):
        print(f"wrote {path}")
    return 0


def _provision_parser(sub: Any) -> None:
    p = sub.add_parser(
        "provision", help="a deployment bundle: CA and TLS, identities, the broker's ACL and configuration"
    )
    p.add_argument("--scenario", default="default", help="the sites (and their peers) of this scenario")
    p.add_argument("--out", type=Path, help="a new bundle's folder (secrets inside: mode 0600)")
    p.add_argument("--host", default="127.0.0.1", help="the broker's host name or IP (in its certificate)")
    p.add_argument("--port", type=int, default=8883, help="the broker's TLS port (8883)")
    p.add_argument(
        "--alt-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address the servers' certificates carry besides --host (a loopback "
        "--host carries localhost, 127.0.0.1 and ::1); repeatable",
    )
    p.add_argument(
        "--feeder",
        action="append",
        type=_feeder_bundle,
        metavar="ID=BUNDLE",
        help="a DSO core broker instead (--out, --host, --port its own), bridged from each feeder's bundle "
        "(its broker forwards its topics under feeder/ID/ over TLS); repeatable",
    )
    change = p.add_argument_group("changing a bundle (then reload the broker: kill -HUP)")
    change.add_argument("--bundle", type=Path, help="an existing bundle's folder")
    what = change.add_mutually_exclusive_group()
    what.add_argument("--rotate", metavar="ID", help="a new password for a site (its id), dso or monitor")
    what.add_argument("--revoke", metavar="SITE", help="remove a site's identity from the broker")
    p.set_defaults(run=_run_provision)


def _feeder_bundle(text: str) -> tuple[str, Path]:
    feeder, _, bundle = text.partition("=")
    if not feeder or not bundle:
        raise argparse.ArgumentTypeError(f"give a feeder as ID=BUNDLE, not {text!r}")
    return feeder, Path(bundle)


def _run_provision(args: argparse.Namespace) -> int:
    from p2pdoe.io.scenarios import load_scenario
    from p2pdoe.services.provision import site_peers, write_bundle

    if args.bundle is not None or args.rotate is not None or args.revoke is not None:
        if args.feeder:
            raise P2PDoeError("--feeder provisions a new core: leave out --bundle, --rotate and --revoke")
        return _change_bundle(args)
    if args.out is None:
        raise P2PDoeError("give --out DIR for a new bundle, or --bundle DIR with --rotate or --revoke")
    if not 0 < args.port < 65536:
        raise P2PDoeError(f"--port must lie in 1..65535, not {args.port}")
    if (args.out / "provision.json").exists():
        raise P2PDoeError(f"{args.out} already holds a bundle: provision into a new folder")
    if args.feeder:
        return _provision_core(args)
    s = load_scenario(args.scenario)
    bundle = write_bundle(args.out, site_peers(s.ids, s.market.peers), args.host, args.port, args.alt_name)
    print(f"wrote {args.out / 'provision.json'}: {len(bundle['identities'])} identities")  # type: ignore[arg-type]
    print(f"broker: mosquitto -c {args.out.resolve() / 'broker' / 'mosquitto.conf'}")
    print(f"CSIP-AUS devices: p2pdoe csip-server --bundle {args.out} (certificates in {args.out / 'csip'})")
    return 0


def _provision_core(args: argparse.Namespace) -> int:
    from p2pdoe.services.bridges import write_core_bundle
    from p2pdoe.services.provision import BundleError

    feeders = dict(args.feeder)
    if len(feeders) < len(args.feeder):
        raise P2PDoeError("--feeder: each feeder once")
    try:
        write_core_bundle(args.out, feeders, args.host, args.port, args.alt_name)
    except BundleError as exc:
        raise P2PDoeError(f"--feeder: {exc}") from None
    out = args.out.resolve()
    print(f"wrote {args.out / 'provision.json'}: the core broker and {len(feeders)} bridged feeders")
    print(f"core broker: mosquitto -c {out / 'broker' / 'mosquitto.conf'}")
    for feeder, bundle in feeders.items():
        print(
            f"feeder {feeder}: bridged by {bundle / 'broker' / 'bridges' / 'core.conf'} (restart its broker)"
        )
    watch = " ".join(f"--feeder {f}={out / 'feeders' / f / 'public-keys.json'}" for f in feeders)
    print(
        f"monitor: p2pdoe monitor --broker mqtts://monitor@{args.host}:{args.port} "
        f"--password-file {out / 'identities' / 'monitor.password'} --ca-cert {out / 'ca' / 'ca.crt'} {watch}"
    )
    return 0


def _change_bundle(args: argparse.Namespace) -> int:
    from p2pdoe.services.provision import BundleError, revoke, rotate

    if args.bundle is None or args.out is not None or (args.rotate is None) == (args.revoke is None):
        raise P2PDoeError("changing a bundle takes --bundle DIR and one of --rotate ID or --revoke SITE")
    try:
        if args.rotate is not None:
            username = rotate(args.bundle, args.rotate)
            done = f"new password for {username} in {args.bundle / 'identities' / f'{username}.password'}"
        else:
            username = revoke(args.bundle, args.revoke)
            done = f"revoked {username}: removed from the broker's password file and ACL"
    except BundleError as exc:
        raise P2PDoeError(str(exc)) from None
    print(done)
    print("reload the broker to apply it: kill -HUP <mosquitto's pid> (or restart its pod)")
    return 0


def _schema_parser(sub: Any) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of every wire message (or of one kind)")
    p.add_argument("--kind", help="one message kind, e.g. doe, proposal, grant")
    p.set_defaults(run=_run_schema)


def _run_schema(args: argparse.Namespace) -> int:
    from p2pdoe.core.schemas.runtime import ALL_MESSAGES

    schemas = {m.model_fields["kind"].default: m.model_json_schema() for m in ALL_MESSAGES}
    if args.kind is not None:
        if args.kind not in schemas:
            raise P2PDoeError(f"no message kind {args.kind!r}; known: {', '.join(schemas)}")
        schemas = {args.kind: schemas[args.kind]}
    print(json.dumps(schemas, indent=1))
    return 0


def _powerflow_parser(sub: Any) -> None:
    p = sub.add_parser(
        "powerflow", help="AC power flow (backward/forward sweep) of a feeder at its nominal load"
    )
    p.add_argument("--feeder", default="ieee33", help="a named feeder (ieee33) or a MATPOWER .m file")
    p.add_argument("--v0-pu", type=float, default=1.0, help="substation voltage (p.u.)")
    p.add_argument("--load-scale", type=float, default=1.0, help="factor on every bus load")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_powerflow)


def _scenario_args(p: argparse.ArgumentParser) -> None:
    from p2pdoe.core.schemas.scenario import DESIGNS

    p.add_argument(
        "--scenario",
        default="default",
        help="a named scenario (default, synthetic-N[-peersK][-seedS]) or a scenario file",
    )
    p.add_argument(
        "--intervals",
        type=_whole_positive,
        help="the horizon's number of intervals; alone, the scenario's day keeps its length (96: 15 minutes)",
    )
    p.add_argument(
        "--dt-h",
        type=_positive_hours,
        help="the interval length in hours; alone, the scenario's day keeps its length (0.25: 96 intervals)",
    )
    p.add_argument(
        "--market",
        choices=DESIGNS,
        help="the market design (default: the scenario's, welfare): docs/markets.md",
    )


def _solve_parser(sub: Any) -> None:
    p = sub.add_parser("solve", help="solve a scenario under one envelope policy and write results.json")
    _scenario_args(p)
    p.add_argument(
        "--mode",
        choices=["centralized", "admm"],
        default="centralized",
        help="centralized: one cvxpy problem; admm: the decentralized agreement, in-process",
    )
    p.add_argument("--envelope", choices=["dynamic", "static", "none"], default="dynamic", help=ENVELOPE_HELP)
    p.add_argument("--out", type=Path, required=True, help="output folder for results.json")
    p.set_defaults(run=_run_solve)


def _compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="solve none / static / dynamic (centralized) and dynamic by ADMM; print the table, write plots",
    )
    _scenario_args(p)
    p.add_argument("--out", type=Path, default=Path("out/compare"), help="output folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument(
        "--markets",
        action="store_true",
        help="compare the market designs instead (dynamic envelopes, decentralized): docs/markets.md",
    )
    p.set_defaults(run=_run_compare)


def _run_powerflow(args: argparse.Namespace) -> int:
    from p2pdoe.cli.powerflow import powerflow_report

    report = powerflow_report(args.feeder, args.v0_pu, args.load_scale)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        from p2pdoe.cli.powerflow import print_powerflow

        print_powerflow(report)
    return 0 if report["converged"] else 1


def _whole_positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of hours, not {text}")
    return value


def _horizon(args: argparse.Namespace) -> dict[str, Any]:
    """--intervals and --dt-h; one alone keeps the length of the scenario's horizon."""
    if args.intervals is None and args.dt_h is None:
        return {}
    if args.intervals is not None and args.dt_h is not None:
        return {"intervals": args.intervals, "dt_h": args.dt_h}
    from p2pdoe.io.scenarios import scenario_horizon

    intervals, dt_h = scenario_horizon(args.scenario)
    span_h = intervals * dt_h
    if args.intervals is not None:
        return {"intervals": args.intervals, "dt_h": span_h / args.intervals}
    count = round(span_h / args.dt_h)
    if count < 1 or abs(count * args.dt_h - span_h) > 1e-9 * span_h:
        raise P2PDoeError(
            f"--dt-h {args.dt_h:g} does not divide the scenario's {span_h:g} h: give --intervals too"
        )
    return {"intervals": count, "dt_h": args.dt_h}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    horizon = _horizon(args)
    out: dict[str, Any] = {"horizon": horizon} if horizon else {}
    if getattr(args, "market", None) is not None:
        out["market"] = {"design": args.market}
    return out


def _run_solve(args: argparse.Namespace) -> int:
    from p2pdoe.cli.jobs import solve_one

    solve_one(args.scenario, _overrides(args), args.envelope, args.mode, args.out)
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from p2pdoe.cli.jobs import compare, compare_markets

    if args.markets:
        if args.market is not None:
            raise P2PDoeError("--markets compares every design: leave out --market")
        compare_markets(args.scenario, _overrides(args), args.out, plots=not args.no_plots)
        return 0
    compare(args.scenario, _overrides(args), args.out, plots=not args.no_plots)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except P2PDoeError as exc:
        print(f"p2pdoe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        print(
            f"p2pdoe: error: {exc.name} is not installed; install the extra that provides it, "
            "e.g. pip install 'p2pdoe[all]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`p2pdoe schema | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more at exit either
        return 1


if __name__ == "__main__":
    sys.exit(main())
