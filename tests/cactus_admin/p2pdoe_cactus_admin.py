"""cactus-client's admin plugin for p2pdoe (entry point group `cactus_client.admin`): a procedure's
envelope instructions become envelopes the coordinator's way, over MQTT (tests/csip_publish.py run by
the project's Python, one process and connection for the run), which csip-server then serves. Set
P2PDOE_CACTUS_PYTHON, _PUBLISH, _BUNDLE and _SITE. An end device is there by provisioning; other
instructions are left unhandled.

A step's instructions share one moment, when its first was carried out: `start_offset_seconds` counts
from it, as the procedure's author means (S-ALL-44's 24 controls start 60, 130, ... s on from the step,
70 s apart, however long publishing each takes)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any

from cactus_client.admin.plugins import hookimpl
from cactus_client.model.execution import ActionResult

ENVELOPES = ("create-der-control", "create-default-der-control")
ANSWER_TIMEOUT_S = 60.0

_publishers: dict[asyncio.AbstractEventLoop, asyncio.subprocess.Process] = {}
_moments: dict[int, datetime] = {}  # by the step's id: when its first instruction was carried out


async def _publisher() -> asyncio.subprocess.Process:
    loop = asyncio.get_running_loop()
    running = _publishers.get(loop)
    if running is not None and running.returncode is None:
        return running
    env = os.environ
    command = [env["P2PDOE_CACTUS_PYTHON"], env["P2PDOE_CACTUS_PUBLISH"], env["P2PDOE_CACTUS_BUNDLE"]]
    command.append(env["P2PDOE_CACTUS_SITE"])
    pipe = asyncio.subprocess.PIPE
    _publishers[loop] = await asyncio.create_subprocess_exec(*command, stdin=pipe, stdout=pipe)
    return _publishers[loop]


@hookimpl
async def admin_teardown(context: Any) -> ActionResult:
    """The run is over: the publisher, told so by its stdin's end, disconnects and ends."""
    publisher = _publishers.pop(asyncio.get_running_loop(), None)
    if publisher is not None and publisher.returncode is None:
        assert publisher.stdin is not None
        publisher.stdin.close()
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            await publisher.wait()
    return ActionResult.done()


@hookimpl
async def admin_instruction(instruction: Any, step: Any, context: Any) -> ActionResult | None:
    kind = str(instruction.type)
    if kind == "ensure-end-device":
        return ActionResult.done() if instruction.parameters.get("registered", True) else None
    if kind not in ENVELOPES:
        return None
    at = _moments.setdefault(id(step), datetime.now(UTC))
    asked = {"kind": kind, "parameters": instruction.parameters, "at": at.isoformat()}
    publisher = await _publisher()
    assert publisher.stdin is not None
    assert publisher.stdout is not None
    publisher.stdin.write(json.dumps(asked).encode() + b"\n")
    await publisher.stdin.drain()
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        answer = (await publisher.stdout.readline()).decode(errors="replace").strip()
    if answer != "ok":
        return ActionResult.failed(f"publishing the envelope failed: {answer or 'the publisher ended'}")
    return ActionResult.done()
