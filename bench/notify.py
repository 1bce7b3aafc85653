"""Benchmark: delivering a burst to one Discord webhook, against a naive sender as the peer.

The peer posts each notification as soon as it can and, on a 429, waits the ``retry_after``
it was given and tries again (what a simple forwarder does). The sidecar's notifier follows
the ``X-RateLimit-*`` headers instead. Both run in the same process against the fake Discord
API of the tests, on fresh webhooks with the same bucket, and the table shows time, requests
and 429 answers, with the ratio sidecar/peer. Rendering cost of large groups is shown too.

    /work/main/.venv/bin/python -m bench.notify [--notifications 200] [--limit 10] [--window 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

import httpx
from prometheus_client import CollectorRegistry

from sidecar.notify.base import Attempt
from sidecar.notify.discord import DiscordDestination, DiscordNotifier
from sidecar.notify.render import render_messages
from tests.fake_discord import FakeDiscord
from tests.notify_support import MemoryState, alert, notification


async def naive_burst(url: str, count: int) -> None:
    """The peer: concurrent posts, each retried after ``retry_after`` until accepted."""
    async with httpx.AsyncClient(timeout=10) as client:

        async def post(index: int) -> None:
            config = DiscordDestination.model_validate(
                {"name": "peer", "kind": "discord", "webhook_url": url}
            )
            [message] = render_messages(notification([alert(index=index)]), config, now=NOW)
            while True:
                response = await client.post(url + "?wait=true", json=message.body())
                if response.status_code != 429:
                    response.raise_for_status()
                    return
                await asyncio.sleep(float(response.json()["retry_after"]))

        await asyncio.gather(*(post(i) for i in range(count)))


async def sidecar_burst(url: str, count: int) -> None:
    config = DiscordDestination.model_validate(
        {"name": "sidecar", "kind": "discord", "webhook_url": url, "max_rate_limit_wait": "5m"}
    )
    notifier = DiscordNotifier(config, state=MemoryState(), registry=CollectorRegistry())
    try:
        await asyncio.gather(
            *(
                notifier.send(notification([alert(index=i)]), Attempt(f"b-{i}", "sidecar"))
                for i in range(count)
            )
        )
    finally:
        await notifier.close()


NOW = datetime(2026, 12, 3, 16, 30, tzinfo=UTC)


def render_cost(size: int, rounds: int = 20) -> float:
    config = DiscordDestination.model_validate(
        {
            "name": "r",
            "kind": "discord",
            "webhook_url": "https://discord.com/api/webhooks/123456789012345678/" + "t" * 30,
            "max_alerts": 1000,
        }
    )
    payload = notification([alert(index=i) for i in range(size)])
    start = time.perf_counter()
    for _ in range(rounds):
        render_messages(payload, config, now=NOW)
    return (time.perf_counter() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=200)
    parser.add_argument("--limit", type=int, default=10, help="fake bucket size")
    parser.add_argument("--window", type=float, default=0.5, help="fake bucket window (s)")
    options = parser.parse_args()

    fake = FakeDiscord(limit=options.limit, window=options.window).start()
    try:
        rows = []
        for name, burst in (("peer (naive retry on 429)", naive_burst), ("sidecar", sidecar_burst)):
            url = fake.add_webhook()
            start = time.perf_counter()
            asyncio.run(burst(url, options.notifications))
            elapsed = time.perf_counter() - start
            statuses = [r.status for r in fake.requests_for(url)]
            rows.append(
                (name, elapsed, len(statuses), statuses.count(429), len(fake.messages_for(url)))
            )
    finally:
        fake.stop()

    print(f"{options.notifications} notifications, bucket {options.limit} per {options.window}s")
    print(f"{'sender':28} {'seconds':>8} {'requests':>9} {'429s':>6} {'delivered':>10}")
    for name, elapsed, requests, limited, delivered in rows:
        print(f"{name:28} {elapsed:8.2f} {requests:9d} {limited:6d} {delivered:10d}")
    peer, ours = rows
    print(
        f"{'ratio sidecar/peer':28} {ours[1] / peer[1]:8.2f} {ours[2] / peer[2]:9.2f} "
        f"{(ours[3] / peer[3]) if peer[3] else float('nan'):6.2f} {ours[4] / peer[4]:10.2f}"
    )
    print()
    print(f"{'render_messages':28} {'ms':>8}")
    for size in (20, 300):
        print(f"{f'{size}-alert group':28} {render_cost(size) * 1000:8.2f}")


if __name__ == "__main__":
    main()
