"""Runs a ``Sidecar`` under uvicorn until SIGTERM or SIGINT, then shuts it down in order.

Shutdown phases:

1. the first signal marks the lifecycle as draining: readiness fails, everything else still
   works, for ``server.shutdown_delay``;
2. the listeners stop accepting and requests in flight get ``server.shutdown_timeout``;
3. components stop in reverse order of their start. A second signal skips the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from sidecar import __version__
from sidecar.app import Listener, Sidecar
from sidecar.errors import StartupError
from sidecar.fields import split_host_port

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``serve``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(address: str) -> socket.socket:
    """Open a listening TCP socket, or raise StartupError saying why it cannot be opened."""
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {address}: {error.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        hint = ""
        if error.errno == errno.EADDRINUSE:
            hint = " (another process listens there; stop it or choose another port)"
        elif error.errno == errno.EACCES:
            hint = " (ports below 1024 need privileges)"
        raise StartupError(f"cannot listen on {address}: {error.strerror}{hint}") from None
    sock.setblocking(False)
    return sock


def _uvicorn_server(listener: Listener, sidecar: Sidecar) -> _Server:
    server_config = sidecar.config.server
    config = uvicorn.Config(
        listener.app,
        lifespan="off",
        log_config=None,
        access_log=server_config.access_log,
        http="httptools",
        loop="none",
        server_header=False,
        date_header=True,
        proxy_headers=False,
        timeout_graceful_shutdown=max(1, round(server_config.shutdown_timeout)),
    )
    return _Server(config)


async def serve(sidecar: Sidecar) -> None:
    """Serve until a signal arrives or ``sidecar.lifecycle.stopping`` is set."""
    listeners = sidecar.listeners
    sockets = []
    try:
        for listener in listeners:
            sockets.append(bind(listener.address))
    except StartupError:
        for sock in sockets:
            sock.close()
        raise

    async with sidecar.running():
        servers = [_uvicorn_server(listener, sidecar) for listener in listeners]
        loop = asyncio.get_running_loop()
        received: list[int] = []
        forced = asyncio.Event()

        def on_signal(number: int) -> None:
            received.append(number)
            if len(received) == 1:
                logger.info("received %s; shutting down", signal.Signals(number).name)
                sidecar.lifecycle.stopping.set()
            else:
                forced.set()
                for server in servers:
                    server.force_exit = True

        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, on_signal, number)

        async def stop_when_asked() -> None:
            await sidecar.lifecycle.stopping.wait()
            sidecar.lifecycle.begin_drain()
            delay = sidecar.config.server.shutdown_delay
            if delay and not forced.is_set():
                logger.info("readiness failing; closing listeners in %.1fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(forced.wait(), timeout=delay)
            for server in servers:
                server.should_exit = True

        stopper = asyncio.create_task(stop_when_asked())
        serving = [
            asyncio.create_task(server.serve(sockets=[sock]))
            for server, sock in zip(servers, sockets, strict=True)
        ]
        await _until_started(servers, serving)
        # What start-up built lives as long as the process: moved out of the collector's
        # generations, it is no longer walked by every full collection while serving.
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        logger.info(
            "sidecar %s serving %s; endpoints %s",
            __version__,
            ", ".join(f"{listener.name} on {listener.address}" for listener in listeners),
            " ".join(link.path for link in sidecar.links),
        )
        try:
            await asyncio.gather(*serving)
        finally:
            stopper.cancel()
            for number in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(number)
    logger.info("sidecar stopped")


async def _until_started(servers: list[_Server], tasks: list[asyncio.Task[None]]) -> None:
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            return
        await asyncio.sleep(0.01)
