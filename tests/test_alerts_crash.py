"""Crash safety: a sidecar killed with SIGKILL at random moments loses no accepted notification.

1,000 notifications (500 groups, firing then resolved, 10 alerts each) flow to a destination
that fails 30% of attempts, while the process is killed three times at random points of the
delivery. Afterwards every acknowledged notification was delivered at least once, resolved
never before firing; duplicates are counted and printed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.alerts_processes import JournalingSidecar, Sender, delivery_counts, journal_lines
from tests.alerts_support import alerts_config
from tests.harness import wait_until

pytestmark = pytest.mark.integration

GROUPS = 500
KILLS = 3


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    document = alerts_config(tmp_path, dispatcher={"concurrency": 8})
    sidecar = JournalingSidecar(tmp_path, document, journal, failure_rate=0.3).start()
    items = [(f"crash{g}", status) for g in range(GROUPS) for status in ("firing", "resolved")]
    sender = Sender([sidecar.url], items)
    kill_points = sorted(random.sample(range(50, 2 * GROUPS - 100), KILLS))

    sender.start()
    for point in kill_points:
        wait_until(lambda p=point: len(journal_lines(journal)) >= p, timeout=60, what=f"{point}")
        sidecar.kill()
        sidecar.start()
    sender.join(timeout=90)
    assert sender.error is None, sender.error
    assert not sender.is_alive()
    accepted = set(sender.accepted)
    wait_until(
        lambda: accepted <= set(delivery_counts(journal)),
        timeout=90,
        interval=0.2,
        what="every accepted notification delivered",
    )
    sidecar.stop()

    counts = delivery_counts(journal)
    duplicates = sum(count - 1 for count in counts.values())
    print(
        f"\ncrash test: {len(accepted)} accepted, {sum(counts.values())} deliveries, "
        f"{duplicates} duplicates after {KILLS} SIGKILLs at journal lines {kill_points}"
    )
    assert len(accepted) == 2 * GROUPS
    assert set(counts) == accepted
    lines = journal_lines(journal)
    for group in {group for group, _ in accepted}:
        statuses = [line["status"] for line in lines if line["group"] == group]
        assert statuses.index("resolved") > max(
            i for i, status in enumerate(statuses) if status == "firing"
        ), (group, statuses)
