"""Sidecar subprocesses with journaling notifiers, and a sender that retries like Alertmanager."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.alerts_support import payload
from tests.harness import REPO_ROOT, free_port, sidecar_env, stop_process, wait_until


class JournalingSidecar:
    """``python -m tests.alerts_process`` on a fixed port, restartable after SIGKILL."""

    def __init__(
        self,
        workdir: Path,
        document: dict[str, Any],
        journal: Path,
        failure_rate: float,
        delay: float = 0.0,
    ) -> None:
        self.delay = delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        document = {**document, "server": {"listen": f"127.0.0.1:{self.port}"}}
        self.config_path = workdir / f"sidecar-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(document))
        self.log_path = workdir / f"sidecar-{self.port}.log"
        self.journal = journal
        self.failure_rate = failure_rate
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> JournalingSidecar:
        command = [
            sys.executable,
            "-m",
            "tests.alerts_process",
            str(self.config_path),
            str(self.journal),
            str(self.failure_rate),
            str(self.delay),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=sidecar_env()
            )
        wait_until(self._answers, timeout=20, what=f"sidecar on {self.url}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sidecar exited: {self.log_path.read_text(errors='replace')}")
        return httpx.get(self.url + "/metrics", timeout=2).status_code == 200

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        return stop_process(self.process)


def journal_lines(journal: Path) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    lines = []
    for line in journal.read_text().splitlines():
        # A line cut by SIGKILL before its newline was never reported as delivered.
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


class Sender(threading.Thread):
    """Posts notifications, retrying connection errors and 5xx until each gets a 2xx.

    ``accepted`` holds (groupKey, status) of every notification acknowledged with 2xx.
    """

    def __init__(self, urls: list[str], items: list[tuple[str, str]], workers: int = 4) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.items = items
        self.workers = workers
        self.accepted: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Firing before resolved for each group, as Alertmanager sends them.
            by_group: dict[str, list[tuple[str, str]]] = {}
            for item in self.items:
                by_group.setdefault(item[0], []).append(item)
            groups = list(by_group.values())
            threads = [
                threading.Thread(target=self._send_groups, args=(groups[i :: self.workers], i))
                for i in range(self.workers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException as error:  # reported to the test thread
            self.error = error

    def _send_groups(self, groups: list[list[tuple[str, str]]], worker: int) -> None:
        with httpx.Client(timeout=10) as client:
            for index, group in enumerate(groups):
                for name, status in group:
                    self._post(client, worker + index, payload(name, status=status, alerts=10))

    def _url(self, slot: int) -> str:
        # Read each time: a test may take a killed replica out of the list.
        urls = self.urls
        return urls[slot % len(urls)]

    def _post(self, client: httpx.Client, slot: int, document: dict[str, Any]) -> None:
        while True:
            try:
                response = client.post(self._url(slot) + "/alerts", json=document)
            except httpx.TransportError:
                wait_until(
                    lambda: _reachable(self._url(slot)), timeout=30, interval=0.05, what="sidecar"
                )
                continue
            if response.status_code >= 500:
                continue
            assert response.status_code == 200, response.text
            with self.lock:
                self.accepted.append((document["groupKey"], document["status"]))
            return


def _reachable(url: str) -> bool:
    try:
        return httpx.get(url + "/metrics", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def delivery_counts(journal: Path) -> Counter[tuple[str, str]]:
    return Counter((line["group"], line["status"]) for line in journal_lines(journal))
