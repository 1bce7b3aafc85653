"""StatsD and DogStatsD over real sockets: the `statsd` client, raw datagrams, TCP, mappings."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import statsd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.errors import ConfigError, StartupError
from sidecar.metrics.ingest_config import DEFAULT_TIMER_BUCKETS
from sidecar.metrics.mapping import Mapper
from sidecar.metrics.statsd import StatsdIngest
from sidecar.metrics.store import IngestStats, Store
from tests.ingest_helpers import (
    OPENMETRICS,
    ingest_sidecar,
    poll,
    promtool_findings,
    samples,
    scrape,
    value,
)


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    instance = ingest_sidecar(
        {
            "statsd": {
                "tcp_listen": "127.0.0.1:0",
                "mappings": [
                    {
                        "match": "app.*.requests",
                        "name": "app_requests",
                        "labels": {"service": "$1"},
                        "help": "Requests per service.",
                    },
                    {
                        "match": r"timing\.(\w+)\.(\w+)",
                        "match_type": "regex",
                        "name": "step_duration_seconds",
                        "labels": {"step": "${1}_$2"},
                        "buckets": [0.1, 1.0],
                        "ttl": "0s",
                    },
                    {"match": "noise.*", "action": "drop"},
                ],
            }
        }
    )
    async with instance.running():
        yield instance


@pytest.fixture
def client(sidecar: Sidecar) -> Iterator[statsd.StatsClient]:
    assert sidecar.ingest.statsd is not None
    assert sidecar.ingest.statsd.udp_address
    host, port = sidecar.ingest.statsd.udp_address
    instance = statsd.StatsClient(host, port)
    yield instance
    instance.close()


def _send_raw(sidecar: Sidecar, payload: bytes) -> None:
    assert sidecar.ingest.statsd is not None
    assert sidecar.ingest.statsd.udp_address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, sidecar.ingest.statsd.udp_address)


async def _wait_for(sidecar: Sidecar, name: str, expected: float, **labels: str) -> str:
    async def check() -> str | None:
        text = (await scrape(sidecar)).text
        return text if value(text, name, **labels) == expected else None

    return str(await poll(check, what=f"{name}{labels} == {expected}"))


async def _wait_datagrams(sidecar: Sidecar, count: int) -> None:
    assert sidecar.ingest.statsd is not None
    listener = sidecar.ingest.statsd

    async def check() -> bool:
        return listener.ingest.datagrams >= count

    await poll(check, what=f"{count} datagrams")


async def test_statsd_client_counters_gauges_timers_and_sample_rates(
    sidecar: Sidecar, client: statsd.StatsClient
) -> None:
    client.incr("orders.created")
    client.incr("orders.created", 4)
    client.incr("orders.sampled", 1, rate=1.0)
    client.gauge("queue.depth", 10)
    client.gauge("queue.depth", 5, delta=True)
    client.gauge("queue.depth", -3, delta=True)
    client.timing("db.query", 250)
    client.timing("db.query", 2000)
    client.decr("orders.created", 0)

    await _wait_for(sidecar, "orders_created_total", 5)
    text = await _wait_for(sidecar, "db_query_count", 2)
    assert value(text, "queue_depth") == 12
    assert value(text, "orders_sampled_total") == 1
    assert value(text, "db_query_sum") == pytest.approx(2.25)
    assert value(text, "db_query_bucket", le="0.25") == 1
    assert value(text, "db_query_bucket", le="2.5") == 2
    assert value(text, "sidecar_ingest_samples_total", source="statsd") == 9


async def test_sampled_lines_are_scaled_by_their_rate(sidecar: Sidecar) -> None:
    _send_raw(sidecar, b"hits:1|c|@0.1\nlat:100|ms|@0.5\nlevel:3|g|@0.5")

    text = await _wait_for(sidecar, "hits_total", 10)
    assert value(text, "lat_count") == 2
    assert value(text, "lat_sum") == pytest.approx(0.2)
    assert value(text, "level") == 3


async def test_statsd_client_pipeline_sends_a_multi_line_datagram(
    sidecar: Sidecar, client: statsd.StatsClient
) -> None:
    with client.pipeline() as pipe:
        pipe.incr("batch.a")
        pipe.incr("batch.b", 2)
        pipe.timing("batch.t", 5)
        pipe.gauge("batch.g", 7)

    text = await _wait_for(sidecar, "batch_g", 7)
    assert value(text, "batch_a_total") == 1
    assert value(text, "batch_b_total") == 2
    assert value(text, "batch_t_count") == 1
    assert sidecar.ingest.statsd is not None
    assert sidecar.ingest.statsd.ingest.datagrams == 1


async def test_histogram_and_distribution_types_are_observed_as_sent(sidecar: Sidecar) -> None:
    _send_raw(sidecar, b"payload:0.3|h\npayload:7|d")

    text = await _wait_for(sidecar, "payload_count", 2)
    assert value(text, "payload_sum") == pytest.approx(7.3)
    assert value(text, "payload_bucket", le="0.5") == 1


async def test_dogstatsd_tags_become_labels(sidecar: Sidecar) -> None:
    _send_raw(
        sidecar,
        b"web.hits:2|c|#route:/a,method:GET\n"
        b"web.hits:3|c|@1|#method:GET,route:/a|c:abc123|T1700000000\n"
        b"web.hits:1|c|#route:/b,method:POST,flag\n"
        b"web.latency:20|ms|#route:/a",
    )

    text = await _wait_for(sidecar, "web_hits_total", 5, method="GET", route="/a")
    assert value(text, "web_hits_total", method="POST", route="/b") == 1
    assert value(text, "web_latency_count", route="/a") == 1


async def test_mappings_rename_label_drop_and_set_buckets(sidecar: Sidecar) -> None:
    _send_raw(
        sidecar,
        b"app.checkout.requests:1|c\napp.search.requests:2|c\n"
        b"timing.load.parse:500|ms\nnoise.x:1|c",
    )

    text = await _wait_for(sidecar, "app_requests_total", 2, service="search")
    assert value(text, "app_requests_total", service="checkout") == 1
    assert value(text, "step_duration_seconds_bucket", step="load_parse", le="1.0") == 1
    assert value(text, "step_duration_seconds_bucket", step="load_parse", le="0.1") == 0
    assert "# HELP app_requests_total Requests per service.\n" in text
    assert "noise" not in text.replace('reason="mapping_drop"', "")
    # The ingest counters are rendered before the application's families: a scrape may show
    # the datagram's samples while its count of dropped lines still reads the moment before.
    await _wait_for(
        sidecar, "sidecar_ingest_rejected_samples_total", 1, source="statsd", reason="mapping_drop"
    )


async def test_tcp_lines_are_ingested_and_an_endless_line_is_rejected(sidecar: Sidecar) -> None:
    assert sidecar.ingest.statsd is not None
    assert sidecar.ingest.statsd.tcp_address
    host, port = sidecar.ingest.statsd.tcp_address

    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"tcp.count:2|c\ntcp.count:3|c\n")
    await writer.drain()
    await _wait_for(sidecar, "tcp_count_total", 5)
    writer.write(b"x" * 70_000)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # the sidecar hung up
    writer.close()

    text = await _wait_for(
        sidecar,
        "sidecar_ingest_rejected_samples_total",
        1,
        source="statsd",
        reason="line_too_long",
    )
    assert value(text, "tcp_count_total") == 5


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"nocolon", "malformed"),
        (b":1|c", "malformed"),
        (b"a:1", "malformed"),
        (b"a:1|c|unknown", "malformed"),
        (b"a:one|c", "invalid_value"),
        (b"a:-1|c", "invalid_value"),
        (b"a:nan|c", "invalid_value"),
        (b"a:nan|ms", "invalid_value"),
        (b"a:1|s", "invalid_type"),
        (b"a:1|c|@0", "invalid_sample_rate"),
        (b"a:1|c|@2", "invalid_sample_rate"),
        (b"a:1|c|@x", "invalid_sample_rate"),
        (b"\xff\xfe:1|c", "invalid_utf8"),
        (b"sidecar_build_info:1|g", "reserved_name"),
        (b"l:1|c|#a:b", "label_conflict"),
        (b"l:1|g", "type_conflict"),
    ],
)
async def test_invalid_lines_are_counted_by_reason_and_valid_ones_still_apply(
    sidecar: Sidecar, line: bytes, reason: str
) -> None:
    _send_raw(sidecar, b"l:1|c")
    _send_raw(sidecar, line + b"\nafter:1|c")

    await _wait_for(sidecar, "after_total", 1)
    # See the mapping test: the counts may trail the samples by one scrape.
    await _wait_for(
        sidecar, "sidecar_ingest_rejected_samples_total", 1, source="statsd", reason=reason
    )
    assert (await scrape(sidecar)).status_code == 200


async def test_statsd_exporter_failure_cases_leave_metrics_clean(sidecar: Sidecar) -> None:
    # Type conflict, label-set conflict and a timer `x` next to a counter `x_count`: each
    # made statsd_exporter answer 500 on /metrics.
    _send_raw(sidecar, b"conflict.type:1|c\nconflict.type:1|g")
    _send_raw(sidecar, b"conflict.labels:1|c|#a:1\nconflict.labels:1|c|#b:1")
    _send_raw(sidecar, b"x:10|ms\nx_count:1|c")
    _send_raw(sidecar, b"y_count:1|c\ny:10|ms")
    _send_raw(sidecar, b"done:1|c")

    await _wait_for(sidecar, "done_total", 1)
    for reason, count in (("type_conflict", 1), ("label_conflict", 1), ("name_conflict", 2)):
        await _wait_for(
            sidecar, "sidecar_ingest_rejected_samples_total", count, source="statsd", reason=reason
        )
    for accept in ("", OPENMETRICS):
        response = await scrape(sidecar, accept)
        assert response.status_code == 200
        if not accept:
            assert promtool_findings(response.content) == ""


async def test_full_exposition_with_host_metrics_stays_clean_after_conflicts() -> None:
    instance = ingest_sidecar(host=True)
    async with instance.running():
        _send_raw(instance, b"a:1|c\na:1|g\nb:1|ms\nb_count:1|c\nc:1|c|#k:v\nc:1|c")
        await _wait_datagrams(instance, 1)

        response = await scrape(instance)

    assert response.status_code == 200
    assert value(response.text, "b_count") == 1
    assert promtool_findings(response.content) == ""


async def test_a_second_listener_on_the_same_port_fails_with_a_clear_error(
    sidecar: Sidecar,
) -> None:
    assert sidecar.ingest.statsd is not None
    assert sidecar.ingest.statsd.udp_address
    port = sidecar.ingest.statsd.udp_address[1]
    other = ingest_sidecar({"statsd": {"listen": f"127.0.0.1:{port}"}})

    with pytest.raises(StartupError, match=f"cannot listen for statsd on 127.0.0.1:{port}"):
        async with other.running():
            pass


async def test_receive_buffer_granted_is_exported(sidecar: Sidecar) -> None:
    text = (await scrape(sidecar)).text

    granted = value(text, "sidecar_statsd_receive_buffer_bytes")
    assert granted is not None
    assert granted > 0
    assert sidecar.ingest.statsd is not None
    assert granted == sidecar.ingest.statsd.receive_buffer


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"listen": "nowhere"}, "ingest.statsd.listen"),
        ({"receive_buffer": "-1"}, "ingest.statsd.receive_buffer"),
        ({"timer_buckets": [1, 0.5]}, "ingest.statsd.timer_buckets"),
        ({"timer_buckets": []}, "ingest.statsd.timer_buckets"),
        ({"mappings": [{"match": "a.*"}]}, "ingest.statsd.mappings[0]"),
        (
            {"mappings": [{"match": "a(", "match_type": "regex", "name": "x"}]},
            "ingest.statsd.mappings[0]",
        ),
        ({"mappings": [{"match": "a b", "name": "x"}]}, "ingest.statsd.mappings[0]"),
        ({"mappings": [{"match": "a", "name": "bad-name"}]}, "ingest.statsd.mappings[0].name"),
        (
            {"mappings": [{"match": "a", "name": "x", "labels": {"bad-label": "v"}}]},
            "ingest.statsd.mappings[0].labels.bad-label.[key]",
        ),
        (
            {"mappings": [{"match": "a", "name": "x", "ttl": "soon"}]},
            "ingest.statsd.mappings[0].ttl",
        ),
        (
            {"mappings": [{"match": "a", "name": "x", "buckets": [2, 1]}]},
            "ingest.statsd.mappings[0].buckets",
        ),
        ({"unknown": 1}, "ingest.statsd.unknown"),
    ],
)
def test_invalid_statsd_config_names_the_field(section: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"ingest": {"statsd": section}})

    assert path in [problem.path for problem in raised.value.problems], raised.value.problems


# Property tests of the parser: any bytes, and lines built from the grammar's pieces.
_pieces = st.sampled_from(
    [
        b"a",
        b"b.c",
        b"x_count",
        b":",
        b"|",
        b"1",
        b"-2.5",
        b"+3",
        b"c",
        b"g",
        b"ms",
        b"h",
        b"d",
        b"s",
        b"@0.5",
        b"@0",
        b"#k:v",
        b"#k",
        b",",
        b"\n",
        b"\xff",
        b"nan",
        b"inf",
        b"T1",
        b"c:x",
        b"1e308",
        b"e",
    ]
)
_grammar_lines = st.lists(_pieces, max_size=12).map(b"".join)


def _parser() -> tuple[StatsdIngest, Store, IngestStats]:
    store = Store()
    stats = IngestStats()
    return StatsdIngest(store, stats, Mapper([]), DEFAULT_TIMER_BUCKETS), store, stats


def _lines(datagram: bytes) -> int:
    return sum(1 for line in datagram.split(b"\n") if line)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=60), _grammar_lines), max_size=8))
def test_parser_never_crashes_and_accounts_for_every_line(datagrams: list[bytes]) -> None:
    ingest, store, stats = _parser()

    for datagram in datagrams:
        ingest.handle_datagram(datagram)

    accepted, rejected = stats.snapshot()
    handled = accepted["statsd"] + sum(rejected.values())
    assert handled == sum(_lines(d) for d in datagrams)
    text = store.render().decode()
    samples(text)  # the exposition still parses
    assert ingest.datagrams == len(datagrams)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="abc._-", min_size=1, max_size=8),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from(["c", "g", "ms"]),
)
def test_every_valid_line_is_applied(name: str, number: float, kind: str) -> None:
    ingest, store, stats = _parser()

    ingest.handle_datagram(f"{name}:{number!r}|{kind}".encode())

    accepted, rejected = stats.snapshot()
    assert accepted["statsd"] + sum(rejected.values()) == 1
    if accepted["statsd"] == 0:
        # Only a name that sanitises to a reserved gauge suffix may be refused.
        assert set(rejected) == {("statsd", "reserved_suffix")}
    else:
        assert store.series_count == 1
