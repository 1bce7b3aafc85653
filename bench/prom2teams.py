"""Benchmark of the webhook receiver against prom2teams: accepted notifications per second.

Runs ``wrk`` with the Lua script of ``bench/alerts.py`` (a realistic 10-alert Alertmanager
payload, a distinct group per request), same duration and connections, against:

  prom2teams (werkzeug)  prom2teams 4.2.0 as shipped: its ``prom2teams`` command, Flask on
                         werkzeug's server, which answers one request at a time;
  prom2teams (uWSGI x5)  the same application (the ``wsgi.py`` it installs) under uWSGI with
                         5 processes, as its README recommends for production;
  sidecar (SQLite)       ``sidecar run`` with the default SQLite outbox.

prom2teams forwards every alert of a notification as one message to its Microsoft Teams
connector before it answers. The connector points at an HTTP endpoint in this process that
answers every POST after 50 ms with 200 and ``1`` (what Teams' incoming webhooks answer, and
what prom2teams checks). One notification must reach it through each prom2teams before that is
measured, and the posts it receives during each run are counted. The sidecar acknowledges after
its commit and delivers afterwards, to its default ``log`` destination.

prom2teams needs Python 3.9 (pyenv's 3.9.18). It is installed from PyPI with uWSGI into a
virtualenv outside the repository, ``~/.cache/sidecar-bench/prom2teams-venv``, built on the first
run (about a minute) and reused while it works. Prints accepted/s, p50/p99 latency, wrk's socket
errors (its timeout is 2 s, shorter than most prom2teams answers take), the posts per second
that reached the endpoint, and the sidecar's accepted/s divided by each server's.

    /work/main/.venv/bin/python bench/prom2teams.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alerts import LUA, free_port, run_wrk, start_sidecar, stop, wait_ready

# Importing alerts has put the repository root on sys.path.
from tests.alerts_support import payload

PROM2TEAMS = "prom2teams==4.2.0"
PYTHON39 = Path.home() / ".pyenv" / "versions" / "3.9.18" / "bin" / "python"
VENV = Path.home() / ".cache" / "sidecar-bench" / "prom2teams-venv"
# PyYAML 5.4, which prom2teams pins, does not build from source with Cython 3 (where no wheel
# fits the platform).
CONSTRAINTS = "cython<3\n"
UWSGI_PROCESSES = 5
ENDPOINT_DELAY = 0.05
# The default connector of the configuration below; prom2teams serves it at /v2/<name>.
CONNECTOR = "Connector"

# Prints where the installed wsgi.py is; fails unless the installed prom2teams is usable.
VENV_CHECK = """
from importlib.metadata import distribution
import prom2teams.app.sender
dist = distribution("prom2teams")
assert dist.version == "4.2.0", dist.version
print(next(str(f.locate()) for f in dist.files if f.name == "wsgi.py"))
"""

# wrk calls done() once at the end with its counters: the same numbers as its "Socket errors"
# line, written where this process can read them.
DONE = """
function done(summary, latency, requests)
  local errors = summary.errors
  local file = assert(io.open([==[ERRORS]==], "w"))
  file:write(string.format("%d %d %d %d", errors.connect, errors.read, errors.write,
                           errors.timeout))
  file:close()
end
"""


class Endpoint(ThreadingHTTPServer):
    """The Teams webhook stand-in: answers every POST after 50 ms and counts them."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Answer)
        self.received = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/webhook"

    def count(self) -> None:
        with self._lock:
            self.received += 1

    def __enter__(self) -> Endpoint:
        self._thread.start()
        return self

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A prom2teams stopped at the end of its run leaves its posts unanswered.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: without TCP_NODELAY the body would wait
    # for the client's delayed ACK (40 ms) on every post.
    disable_nagle_algorithm = True
    server: Endpoint

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(ENDPOINT_DELAY)
        self.server.count()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "1")
        self.end_headers()
        self.wfile.write(b"1")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def installed_wsgi(venv: Path) -> Path | None:
    """prom2teams' wsgi.py in ``venv`` if prom2teams and uWSGI work there, else None."""
    python, uwsgi = venv / "bin" / "python", venv / "bin" / "uwsgi"
    if not python.exists() or not uwsgi.exists():
        return None
    check = subprocess.run(
        [str(python), "-c", VENV_CHECK], capture_output=True, text=True, env=clean_env()
    )
    version = subprocess.run([str(uwsgi), "--version"], capture_output=True, env=clean_env())
    if check.returncode != 0 or version.returncode != 0:
        return None
    path = Path(check.stdout.strip())
    return path if path.is_file() else None


def prom2teams_venv() -> tuple[Path, Path]:
    """The virtualenv holding prom2teams and uWSGI, and prom2teams' wsgi.py in it.

    Reused when it works, else (re)built with pyenv's Python 3.9.18.
    """
    wsgi = installed_wsgi(VENV)
    if wsgi is not None:
        print(f"reusing {VENV} ({PROM2TEAMS}, uWSGI)", flush=True)
        return VENV, wsgi
    if not PYTHON39.exists():
        raise SystemExit(
            f"prom2teams needs Python 3.9: {PYTHON39} is missing (pyenv install 3.9.18)"
        )
    print(f"building {VENV} with {PYTHON39}", flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(PYTHON39), "-m", "venv", str(VENV)], check=True, env=clean_env())
    constraints = VENV / "constraints.txt"
    constraints.write_text(CONSTRAINTS)
    # As a wheel (PEP 517), the wsgi.py prom2teams declares under /usr/local/etc lands inside
    # the virtualenv instead of the system's /usr/local/etc.
    command = [
        str(VENV / "bin" / "pip"),
        "install",
        "--progress-bar",
        "off",
        "--use-pep517",
        PROM2TEAMS,
        "uwsgi",
    ]
    print(f"PIP_CONSTRAINT={constraints} {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, env={**clean_env(), "PIP_CONSTRAINT": str(constraints)})
    wsgi = installed_wsgi(VENV)
    if wsgi is None:
        raise SystemExit(f"{PROM2TEAMS} or uWSGI does not work in {VENV} after installing")
    return VENV, wsgi


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that would point Python 3.9 at this venv."""
    names = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PROM2TEAMS_PROMETHEUS_METRICS"}
    env = {name: value for name, value in os.environ.items() if name not in names}
    return {**env, **extra}


def write_config(workdir: Path, port: int, connector_url: str) -> Path:
    """A prom2teams INI file: its default connector, the listen address, warning logs."""
    path = workdir / f"prom2teams-{port}.ini"
    path.write_text(
        "[Microsoft Teams]\n"
        f"{CONNECTOR}: {connector_url}\n"
        "\n"
        "[HTTP Server]\n"
        "Host: 127.0.0.1\n"
        f"Port: {port}\n"
        "\n"
        "[Log]\n"
        "Level: WARNING\n"
    )
    return path


def werkzeug_command(venv: Path, wsgi: Path, config: Path, port: int) -> list[str]:
    return [str(venv / "bin" / "prom2teams"), "--configpath", str(config)]


def uwsgi_command(venv: Path, wsgi: Path, config: Path, port: int) -> list[str]:
    return [
        str(venv / "bin" / "uwsgi"),
        "--master",
        "--processes",
        str(UWSGI_PROCESSES),
        "--http-socket",
        f"127.0.0.1:{port}",
        "--home",
        str(venv),
        "--wsgi-file",
        str(wsgi),
        "--need-app",
        "--die-on-term",
        "--disable-logging",
        "--env",
        f"APP_CONFIG_FILE={config}",
    ]


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stops a server started in a session of its own, with every process it forked."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def probe(url: str, endpoint: Endpoint, name: str) -> None:
    """Sends one notification and fails unless it reached the endpoint."""
    before = endpoint.received
    response = httpx.post(url, json=payload(f"probe{name}", alerts=10), timeout=60)
    posts = endpoint.received - before
    print(f"  one notification: HTTP {response.status_code}, {posts} posts reached the endpoint")
    if not response.is_success or posts == 0:
        raise SystemExit(f"{name} did not forward to {endpoint.url}: {response.text[:500]}")


def wrk_script(workdir: Path, name: str, body: str, path: str) -> tuple[Path, Path]:
    """alerts.py's wrk script posting to ``path``, and where it leaves wrk's error counts."""
    if '"/alerts"' not in LUA:
        raise SystemExit("bench/alerts.py's wrk script no longer posts to /alerts")
    errors = workdir / f"{name}.errors"
    script = workdir / f"{name}.lua"
    lua = LUA.replace('"/alerts"', json.dumps(path)).replace("BODY", body)
    script.write_text(lua + DONE.replace("ERRORS", str(errors)))
    return script, errors


def measure(
    url: str,
    path: str,
    workdir: Path,
    body: str,
    pid: int,
    endpoint: Endpoint,
    args: argparse.Namespace,
    sidecar: bool = False,
) -> dict[str, float]:
    name = f"wrk-{pid}"
    script, errors = wrk_script(workdir, name, body, path)
    before, start = endpoint.received, time.monotonic()
    result = run_wrk(url, script, args.duration, args.connections, pid, sidecar=sidecar)
    result["forwarded"] = (endpoint.received - before) / (time.monotonic() - start)
    connect, read, write, timeout = (int(n) for n in errors.read_text().split())
    result.update(timeouts=timeout, connect_errors=connect, read_errors=read, write_errors=write)
    return result


def run_prom2teams(
    name: str,
    command: Callable[[Path, Path, Path, int], list[str]],
    venv: Path,
    wsgi: Path,
    workdir: Path,
    endpoint: Endpoint,
    body: str,
    args: argparse.Namespace,
) -> dict[str, float]:
    port = free_port()
    config = write_config(workdir, port, endpoint.url)
    log = workdir / f"prom2teams-{port}.log"
    path = f"/v2/{CONNECTOR}"
    url = f"http://127.0.0.1:{port}{path}"
    print(f"{name}: {url}", flush=True)
    with log.open("ab") as output:
        process = subprocess.Popen(
            command(venv, wsgi, config, port),
            cwd=workdir,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=clean_env(APP_CONFIG_FILE=str(config)),
            start_new_session=True,
        )
    try:
        wait_ready(url, process)
        probe(url, endpoint, name)
        result = measure(url, path, workdir, body, process.pid, endpoint, args)
    except (Exception, SystemExit):
        print(f"--- {log} ---\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        stop_group(process)
    print(
        f"  {result['accepted']:.1f} accepted/s, {result['forwarded']:.1f} posts/s reached the"
        " endpoint",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install wrk)")

    began = time.monotonic()
    venv, wsgi = prom2teams_venv()
    prepared = time.monotonic() - began
    body = json.dumps(payload("BENCHGROUP", alerts=10))
    results: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="sidecar-bench-") as temporary,
        Endpoint() as endpoint,
    ):
        workdir = Path(temporary)
        print(f"Teams connector stand-in: {endpoint.url} (answers after 50 ms)", flush=True)
        variants = {
            "prom2teams (werkzeug)": werkzeug_command,
            f"prom2teams (uWSGI x{UWSGI_PROCESSES})": uwsgi_command,
        }
        for name, command in variants.items():
            results[name] = run_prom2teams(name, command, venv, wsgi, workdir, endpoint, body, args)

        sidecar, url = start_sidecar(workdir, {"sqlite": {"path": str(workdir / "outbox.sqlite3")}})
        print(f"sidecar (SQLite): {url}", flush=True)
        try:
            wait_ready(url, sidecar)
            results["sidecar (SQLite)"] = measure(
                url, "/alerts", workdir, body, sidecar.pid, endpoint, args, sidecar=True
            )
        finally:
            stop(sidecar)

    ours = results["sidecar (SQLite)"]
    print(
        f"\nwrk -t1 -c{args.connections} -d{args.duration}s (2 s timeout), {len(body)} byte body"
        " (10 alerts), distinct group per request; prom2teams' connector answers after 50 ms\n"
    )
    print(
        f"{'server':<24} {'accepted/s':>11} {'non-2xx':>8} {'p50 ms':>9} {'p99 ms':>9}"
        f" {'timeouts':>9} {'conn/read/write':>15} {'forwarded/s':>12} {'sidecar ÷ this':>15}"
    )
    for name, result in results.items():
        sidecar_row = result is ours
        ratio = ours["accepted"] / result["accepted"] if result["accepted"] else float("inf")
        errors = "/".join(
            format(result[kind], ".0f")
            for kind in ("connect_errors", "read_errors", "write_errors")
        )
        print(
            f"{name:<24} {result['accepted']:>11.1f} {result['failed']:>8.0f}"
            f" {result['p50']:>9.1f} {result['p99']:>9.1f} {result['timeouts']:>9.0f}"
            f" {errors:>15}"
            f" {'-' if sidecar_row else format(result['forwarded'], '.1f'):>12}"
            f" {ratio:>15.1f}"
        )
    best = max(result["accepted"] for result in results.values() if result is not ours)
    factor = ours["accepted"] / best if best else float("inf")
    print(
        "\naccepted/s counts 2xx answers, including those after wrk's timeout; latencies over"
        " the timeout are not recorded. forwarded/s: posts that reached the 50 ms endpoint (one"
        f" per alert). The sidecar delivered {ours['delivered']:.0f}/s to its log destination"
        " meanwhile. uWSGI's HTTP socket closes the connection after every answer without"
        " saying so (no 'Connection: close'): wrk counts a read error per answer and reconnects."
    )
    print(
        f"goal: sidecar >= 10x prom2teams. sidecar / best prom2teams = {factor:.0f}x:"
        f" {'met' if factor >= 10 else 'NOT met'}"
    )
    print(
        f"took {time.monotonic() - began:.0f} s, of which {prepared:.0f} s preparing the"
        " prom2teams virtualenv"
    )


if __name__ == "__main__":
    main()
