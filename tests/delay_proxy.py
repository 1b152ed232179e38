"""A TCP proxy that delays every byte by a fixed time each way (this kernel has no netem), for the
tests of lossy and slow links (tests/test_lossy_link.py). Order is kept: each chunk is written
`delay_ms` after it was read, in the order read.

    python tests/delay_proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay_s, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((loop.time() + delay_s, b""))
    with contextlib.suppress(Exception):
        await sender
    writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, broker_w, delay_s), _pipe(broker_r, client_w, delay_s))

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    host, port, t_host, t_port, delay_ms = sys.argv[1:6]
    asyncio.run(serve((host, int(port)), (t_host, int(t_port)), float(delay_ms) / 1000))
