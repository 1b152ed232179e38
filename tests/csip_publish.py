"""Publishes an envelope as the coordinator does (signed, retained, as `dso` of a bundle), from a
cactus-client admin instruction's parameters (tests/cactus_admin): the project's Python runs it.

    python tests/csip_publish.py BUNDLE SITE create-der-control '{"status": "active", "opModExpLimW": 0}'
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.services.provision import access

UNBOUNDED_KW = 1000.0  # a limit the instruction does not set: 1 MW
SUPPORTED = {"status", "opModExpLimW", "opModImpLimW", "duration_seconds", "start_offset_seconds", "primacy"}


def envelope(site: str, kind: str, parameters: dict[str, object], now: datetime) -> Doe:
    """The Doe an instruction asks for: an active control started a minute ago, a scheduled one
    starting in an hour (or `start_offset_seconds`), or the default; limits in W."""
    unsupported = set(parameters) - SUPPORTED
    if unsupported:
        raise SystemExit(f"an envelope sets import and export limits only, not {sorted(unsupported)}")
    up = float(parameters.get("opModExpLimW", UNBOUNDED_KW * 1e3)) / 1e3  # type: ignore[arg-type]
    lo = -float(parameters.get("opModImpLimW", UNBOUNDED_KW * 1e3)) / 1e3  # type: ignore[arg-type]
    start = now.replace(microsecond=0)
    if kind == "create-default-der-control":
        return Doe.from_box(site, None, start - timedelta(minutes=1), 86400, lo, up)
    default_offset = -60 if parameters.get("status", "active") == "active" else 3600
    offset = int(parameters.get("start_offset_seconds", default_offset))  # type: ignore[call-overload]
    duration = int(parameters.get("duration_seconds", 3600))  # type: ignore[call-overload]
    round_id = f"cactus-{secrets.token_hex(4)}"
    return Doe.from_box(site, round_id, start + timedelta(seconds=offset), duration, lo, up)


async def publish(bundle: Path, doe: Doe) -> None:
    description = json.loads((bundle / "provision.json").read_text())
    dso = await access(description, "dso").connect(f"cactus-admin-{secrets.token_hex(3)}", 30.0)
    try:
        kind = "doe/default" if doe.round is None else "doe"
        await dso.publish(topics.site(doe.site, kind), doe.model_dump_json().encode(), retain=True)
    finally:
        await dso.close()


def main(argv: list[str]) -> None:
    bundle, site, kind, parameters = Path(argv[0]), argv[1], argv[2], json.loads(argv[3])
    asyncio.run(publish(bundle, envelope(site, kind, parameters, datetime.now(UTC))))


if __name__ == "__main__":
    main(sys.argv[1:])
