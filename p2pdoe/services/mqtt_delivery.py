"""Waiting for a QoS 1 acknowledgement the way a field network needs: through a broker that stalls,
and across a connection lost meanwhile. `MqttTransport.publish` sends a message, then asks
`Delivery.acknowledged` whether it arrived (True) or must be sent again on the next connection
(False); only what no retry can mend raises `TransportError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from p2pdoe.services.transport_api import TransportError

log = logging.getLogger("p2pdoe.services.transport")


@dataclass
class Delivery:
    """One publish in flight: `patience_s` between warnings while no acknowledgement comes (`on_slow`
    is called at the first); `grace_s` for the receive loop to notice a connection the client already
    calls lost."""

    client_id: str
    topic: str
    patience_s: float
    grace_s: float
    on_slow: Callable[[], None]

    async def acknowledged(
        self, sending: asyncio.Future[None], lost: asyncio.Future[None], connected: Callable[[], bool]
    ) -> bool:
        """True once `sending` is acknowledged; False if the connection was lost first."""
        waited_s = 0.0
        while True:
            await asyncio.wait({sending, lost}, timeout=self.patience_s, return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and sending.exception() is None:
                return True
            if lost.done():
                return False
            if sending.done():
                return await self._refused(sending.exception(), lost, connected())
            if not waited_s:
                self.on_slow()
            waited_s += self.patience_s
            log.warning(
                "%s: no acknowledgement of %s for %g s; still waiting (a stalled broker?)",
                self.client_id, self.topic, waited_s,
            )  # fmt: skip

    async def _refused(self, exc: BaseException | None, lost: asyncio.Future[None], connected: bool) -> bool:
        """The client refused the message: while connected no retry mends that; when it says it is not
        connected (a frozen process resumed, a dead link not yet noticed), wait for the receive loop to
        see the connection go, then send again."""
        failed = TransportError(f"publish to {self.topic!r} failed: {exc}")
        if connected:
            raise failed from exc
        try:
            await asyncio.wait_for(asyncio.shield(lost), timeout=self.grace_s)
        except TimeoutError:
            raise failed from exc
        return False
