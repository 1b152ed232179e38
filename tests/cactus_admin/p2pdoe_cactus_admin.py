"""cactus-client's admin plugin for p2pdoe (entry point group `cactus_client.admin`): a procedure's
envelope instructions become envelopes the coordinator's way, over MQTT (tests/csip_publish.py run by
the project's Python), which csip-server then serves. Set P2PDOE_CACTUS_PYTHON, _PUBLISH, _BUNDLE and
_SITE. An end device is there by provisioning; other instructions are left unhandled."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from cactus_client.admin.plugins import hookimpl
from cactus_client.model.execution import ActionResult

ENVELOPES = ("create-der-control", "create-default-der-control")


@hookimpl
async def admin_instruction(instruction: Any, step: Any, context: Any) -> ActionResult | None:
    kind = str(instruction.type)
    if kind == "ensure-end-device":
        return ActionResult.done() if instruction.parameters.get("registered", True) else None
    if kind not in ENVELOPES:
        return None
    env = os.environ
    command = [env["P2PDOE_CACTUS_PYTHON"], env["P2PDOE_CACTUS_PUBLISH"], env["P2PDOE_CACTUS_BUNDLE"]]
    command += [env["P2PDOE_CACTUS_SITE"], kind, json.dumps(instruction.parameters)]
    run = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    _, err = await run.communicate()
    if run.returncode != 0:
        return ActionResult.failed(f"publishing the envelope failed: {err.decode(errors='replace')[-300:]}")
    return ActionResult.done()
