"""The Redis outbox: one stream per destination, shared by every replica through a consumer group.

Keys, all under the configured prefix (one Redis, not a cluster: scripts build key names):

- ``<p>:stream:<destination>`` deliveries ready to attempt; consumer group ``dispatchers``;
- ``<p>:delayed:<destination>`` sorted set of deliveries waiting for a retry (score: due time);
- ``<p>:order:<destination>:<group>`` list of open delivery ids of one alert group, oldest
  first: only the head may be delivered, so a resolved notification never overtakes its firing;
- ``<p>:dedup:<key>`` set for the dedup window; ``<p>:depth`` undelivered count;
- ``<p>:dead`` hash of dead letters; ``<p>:state:<key>`` notifier memory with TTL.

Every change that touches several keys is one Lua script, so Redis applies it atomically: an
accepted notification is either fully queued (and its dedup key set) or not at all. A replica
that dies keeps its claimed entries pending in the group; after ``lease`` of idleness another
replica takes them with XAUTOCLAIM. Durability is Redis's: use ``appendonly yes`` with
``appendfsync always`` (or everysec, accepting one second of loss on a Redis crash).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from sidecar.alerts.outbox.base import (
    Claim,
    DeliveryRecord,
    OutboxFull,
    OutboxStats,
    OutboxUnavailable,
    State,
    group_id,
)
from sidecar.alerts.payload import Notification

logger = logging.getLogger(__name__)

GROUP = "dispatchers"

# Every notification accepted during one turn of the event loop, in one call.
# KEYS: depth. ARGV: prefix, dedup window (ms), max depth, then for each notification: its
# dedup key, group, acceptance time, the number n of destinations, n (destination, delivery
# id) pairs, trace context and body. Returns 1 (stored), 0 (duplicate) or -1 (full) for each.
_ENQUEUE = """
local prefix, window, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local depth = tonumber(redis.call('GET', KEYS[1]) or '0')
local added, results, i = 0, {}, 4
while i <= #ARGV do
  local key, group, accepted, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local trace, body = ARGV[i + 4 + 2 * n], ARGV[i + 5 + 2 * n]
  if redis.call('EXISTS', key) == 1 then
    results[#results + 1] = 0
  elseif n > 0 and depth + added + n > limit then
    results[#results + 1] = -1
  else
    redis.call('SET', key, '1', 'PX', window)
    for j = 0, n - 1 do
      local destination, id = ARGV[i + 4 + 2 * j], ARGV[i + 5 + 2 * j]
      redis.call('RPUSH', prefix .. ':order:' .. destination .. ':' .. group, id)
      redis.call('XADD', prefix .. ':stream:' .. destination, '*', 'id', id, 'group', group,
        'attempts', '0', 'accepted_at', accepted, 'trace', trace, 'body', body)
    end
    added = added + n
    results[#results + 1] = 1
  end
  i = i + 6 + 2 * n
end
if added > 0 then redis.call('INCRBY', KEYS[1], added) end
return results
"""

# KEYS: stream, order, depth, delayed, dead, waiting. ARGV: entry id, delivery id, action,
# score, member, accepted at. A delivery put off (retry, or parked behind its group) waits in
# delayed by due time, and in waiting by acceptance time for the oldest-age metric.
_FINISH = """
if redis.call('XACK', KEYS[1], 'dispatchers', ARGV[1]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
local action = ARGV[3]
if action == 'done' or action == 'dead' then
  redis.call('LREM', KEYS[2], 1, ARGV[2])
  redis.call('DECR', KEYS[3])
  if action == 'dead' then redis.call('HSET', KEYS[5], ARGV[2], ARGV[5]) end
else
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[2])
end
return 1
"""

# KEYS: delayed, stream, waiting. ARGV: now, limit.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local fields = cjson.decode(member)
  redis.call('XADD', KEYS[2], '*', 'id', fields.id, 'group', fields.group,
    'attempts', tostring(fields.attempts), 'accepted_at', tostring(fields.accepted_at),
    'trace', fields.trace or '', 'body', fields.body)
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[3], fields.id)
end
return #due
"""

# KEYS: dead, stream, order, depth. ARGV: delivery id, prefix, now.
_REQUEUE = """
local member = redis.call('HGET', KEYS[1], ARGV[1])
if not member then return 0 end
local fields = cjson.decode(member)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
-- A requeued letter starts again: attempts and the age limit count from now.
redis.call('XADD', KEYS[2], '*', 'id', fields.id, 'group', fields.group, 'attempts', '0',
  'accepted_at', ARGV[3], 'trace', fields.trace or '', 'body', fields.body)
redis.call('INCR', KEYS[4])
return 1
"""


class RedisNotifierState:
    """Notifier memory in ``<prefix>:state:<key>`` string keys, expiring with their TTL."""

    def __init__(self, outbox: RedisOutbox) -> None:
        self._outbox = outbox

    async def get(self, key: str) -> str | None:
        value = await self._outbox.call(self._outbox.redis.get(self._outbox.key("state", key)))
        return None if value is None else str(value)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        milliseconds = max(1, int(ttl * 1000)) if ttl is not None else None
        await self._outbox.call(
            self._outbox.redis.set(self._outbox.key("state", key), value, px=milliseconds)
        )


class RedisOutbox:
    """The outbox for several replicas; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        destinations: list[str],
        max_depth: int,
        dedup_window: float,
        lease: float,
        consumer: str | None = None,
        park_delay: float = 1.0,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.destinations = list(destinations)
        self.max_depth = max_depth
        self.dedup_window = dedup_window
        self.lease = lease
        self.park_delay = park_delay
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._state = RedisNotifierState(self)
        self._claimed: dict[str, tuple[str, str, dict[str, Any]]] = {}
        self._enqueue = redis.register_script(_ENQUEUE)
        self._finish_script = redis.register_script(_FINISH)
        self._unsent: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._promote = redis.register_script(_PROMOTE)
        self._requeue = redis.register_script(_REQUEUE)

    @property
    def state(self) -> RedisNotifierState:
        return self._state

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def call(self, command: Awaitable[Any] | Any) -> Any:
        """Await a Redis command, translating its failure into OutboxUnavailable."""
        try:
            return await command
        except (RedisError, OSError) as error:
            raise OutboxUnavailable(f"Redis outbox: {type(error).__name__}: {error}") from error

    async def start(self) -> None:
        for destination in self.destinations:
            try:
                await self.call(
                    self.redis.xgroup_create(
                        self.key("stream", destination), GROUP, id="0", mkstream=True
                    )
                )
            except OutboxUnavailable as error:
                if isinstance(error.__cause__, ResponseError) and "BUSYGROUP" in str(error):
                    continue
                # Redis may come later; the dispatcher creates groups again when claiming.
                logger.warning("cannot prepare the Redis outbox yet: %s", error)

    async def stop(self) -> None:
        if self._unsent:
            self._send_scripts()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self.redis.aclose()

    async def enqueue(
        self,
        notification: Notification,
        destinations: list[str],
        key: str,
        body: str | None = None,
        trace_context: str = "",
    ) -> bool:
        arguments: list[Any] = [
            self.key("dedup", key),
            group_id(notification.group_key),
            repr(time.time()),
            len(destinations),
        ]
        for destination in destinations:
            arguments += [destination, uuid.uuid4().hex]
        arguments.append(trace_context)
        arguments.append(body if body is not None else notification.to_json())
        # Joined with the other notifications of this turn into one call: see _units.
        result = await self._run_script(self._enqueue, [self.key("depth")], arguments)
        if result == -1:
            raise OutboxFull(f"the Redis outbox holds {self.max_depth} deliveries (max_depth)")
        return bool(result)

    async def claim(self, destination: str, limit: int) -> list[Claim]:
        stream = self.key("stream", destination)
        delayed, waiting = self.key("delayed", destination), self.key("waiting", destination)
        await self.call(self._promote(keys=[delayed, stream, waiting], args=[time.time(), 100]))
        try:
            entries = await self._autoclaim(stream, limit)
            if len(entries) < limit:
                entries += await self._read_new(stream, limit - len(entries))
        except OutboxUnavailable as error:
            if not _group_missing(error):
                raise
            # Redis lost its data (restart without persistence): create the group again.
            await self.start()
            return []

        claims = []
        try:
            for entry_id, fields in entries:
                order = self.key("order", destination, fields["group"])
                head = await self.call(self.redis.lindex(order, 0))
                self._claimed[fields["id"]] = (destination, entry_id, fields)
                if head is not None and head != fields["id"]:
                    # An earlier delivery of this group is still open: wait behind it.
                    await self._settle(fields["id"], "park", time.time() + self.park_delay, fields)
                    continue
                claims.append(
                    Claim(
                        fields["id"],
                        destination,
                        fields["body"],
                        int(fields["attempts"]),
                        float(fields["accepted_at"]),
                        # Entries written before traces were stored have no such field.
                        fields.get("trace", ""),
                    )
                )
        except BaseException:
            # None of these reaches a worker: forget them, and their leases run out in Redis.
            for _, fields in entries:
                self._claimed.pop(fields["id"], None)
            raise
        return claims

    async def _autoclaim(self, stream: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        lease_ms = max(1, int(self.lease * 1000))
        result = await self.call(
            self.redis.xautoclaim(stream, GROUP, self.consumer, lease_ms, "0-0", count=limit)
        )
        # Redis 7 answers [next id, claimed entries, deleted ids]; deleted entries have no fields.
        claimed: list[tuple[str, dict[str, Any]]] = result[1]
        return [(entry_id, fields) for entry_id, fields in claimed if fields]

    async def _read_new(self, stream: str, count: int) -> list[tuple[str, dict[str, Any]]]:
        result = await self.call(
            self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count)
        )
        return [entry for _, entries in result or [] for entry in entries]

    async def _settle(
        self, delivery_id: str, action: str, score: float, fields: dict[str, Any], reason: str = ""
    ) -> None:
        claimed = self._claimed.pop(delivery_id, None)
        if claimed is None:
            return
        destination, entry_id, _ = claimed
        member = json.dumps({**fields, "reason": reason, "destination": destination})
        await self._run_script(
            self._finish_script,
            [
                self.key("stream", destination),
                self.key("order", destination, fields["group"]),
                self.key("depth"),
                self.key("delayed", destination),
                self.key("dead"),
                self.key("waiting", destination),
            ],
            [entry_id, delivery_id, action, score, member, fields["accepted_at"]],
        )

    def _run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run a script with the others called during this turn of the event loop.

        Concurrent webhooks and deliveries thus share one pipeline, one round trip and one
        connection instead of taking one each; every script still applies atomically on its
        own, and each caller gets its own result once Redis has applied it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._unsent:
            loop.call_soon(self._send_scripts)
        self._unsent.append((script, keys, args, future))
        return future

    def _send_scripts(self) -> None:
        calls, self._unsent = self._unsent, []
        task = asyncio.create_task(self._pipeline(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _pipeline(
        self, calls: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            results: list[Any] = await self._evaluate(calls)
        except asyncio.CancelledError:
            for *_, future in calls:
                future.cancel()
            raise
        except Exception as error:
            # Redis failed, or this code did: either way no caller may be left waiting.
            if not isinstance(error, (RedisError, OSError)):
                logger.exception("the Redis outbox could not run %d scripts", len(calls))
            results = [error] * len(calls)
        for (_, _, _, future), result in zip(calls, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                failure = OutboxUnavailable(f"Redis outbox: {type(result).__name__}: {result}")
                failure.__cause__ = result
                future.set_exception(failure)
            else:
                future.set_result(result)

    def _units(
        self, calls: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[tuple[AsyncScript, list[str], list[Any], list[int]]]:
        """The script calls to send, each with the indices of the calls it answers.

        Enqueues become one call of the enqueue script, which takes any number of
        notifications: per notification that saves a command's packing, sending and parsing."""
        units = [
            (script, keys, args, [index])
            for index, (script, keys, args, _) in enumerate(calls)
            if script is not self._enqueue
        ]
        enqueues = [index for index, call in enumerate(calls) if call[0] is self._enqueue]
        if enqueues:
            header = [self.prefix, max(1, int(self.dedup_window * 1000)), self.max_depth]
            arguments = header + [value for index in enqueues for value in calls[index][2]]
            units.append((self._enqueue, [self.key("depth")], arguments, enqueues))
        return units

    async def _evaluate(
        self, calls: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        units = self._units(calls)
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args, _ in units:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        again = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if again:
            # Redis lost its script cache (a restart): load the scripts and run again only
            # the calls that failed for it, which therefore did nothing.
            for script in {id(units[i][0]): units[i][0] for i in again}.values():
                await self.redis.script_load(script.script)
            pipe = self.redis.pipeline(transaction=False)
            for i in again:
                script, keys, args, _ = units[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            for i, answer in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                answers[i] = answer

        results: list[Any] = [None] * len(calls)
        for (script, _, _, indices), answer in zip(units, answers, strict=True):
            if script is not self._enqueue or isinstance(answer, Exception):
                for index in indices:
                    results[index] = answer
            else:
                for index, value in zip(indices, answer, strict=True):
                    results[index] = value
        return results

    def _fields(self, delivery_id: str) -> dict[str, Any]:
        claimed = self._claimed.get(delivery_id)
        return dict(claimed[2]) if claimed else {}

    async def complete(self, delivery_id: str) -> None:
        await self._settle(delivery_id, "done", 0, self._fields(delivery_id))

    async def retry(self, delivery_id: str, delay: float, error: str) -> None:
        fields = self._fields(delivery_id)
        if fields:
            fields["attempts"] = int(fields["attempts"]) + 1
            fields["accepted_at"] = float(fields["accepted_at"])
        await self._settle(delivery_id, "retry", time.time() + delay, fields, error[:2000])

    async def release(self, delivery_id: str) -> None:
        fields = self._fields(delivery_id)
        if fields:
            fields["accepted_at"] = float(fields["accepted_at"])
        await self._settle(delivery_id, "park", time.time(), fields)

    async def bury(self, delivery_id: str, reason: str) -> None:
        fields = self._fields(delivery_id)
        if fields:
            fields["attempts"] = int(fields["attempts"]) + 1
            fields["accepted_at"] = float(fields["accepted_at"])
            fields["failed_at"] = time.time()
        await self._settle(delivery_id, "dead", 0, fields, reason[:2000])

    async def requeue(self, delivery_id: str) -> bool:
        member = await self.call(self.redis.hget(self.key("dead"), delivery_id))
        if member is None:
            return False
        fields = json.loads(member)
        destination = fields["destination"]
        result = await self.call(
            self._requeue(
                keys=[
                    self.key("dead"),
                    self.key("stream", destination),
                    self.key("order", destination, fields["group"]),
                    self.key("depth"),
                ],
                args=[delivery_id, self.prefix, repr(time.time())],
            )
        )
        return bool(result)

    async def list(self, state: State | None = None, limit: int = 100) -> list[DeliveryRecord]:
        records: list[DeliveryRecord] = []
        if state in (None, "dead"):
            cursor = 0
            while len(records) < limit:
                cursor, page = await self.call(
                    self.redis.hscan(self.key("dead"), cursor, count=100)
                )
                for delivery_id, member in page.items():
                    records.append(_record(delivery_id, json.loads(member), "dead"))
                if cursor == 0:
                    break
        if state in (None, "pending", "leased"):
            for destination in self.destinations:
                stream = self.key("stream", destination)
                entries = await self.call(self.redis.xrange(stream, count=limit))
                leased = await self._leased(stream, max(limit, len(entries)))
                for entry_id, fields in entries:
                    entry_state: State = "leased" if entry_id in leased else "pending"
                    if state in (None, entry_state):
                        record = {**fields, "destination": destination}
                        records.append(_record(fields["id"], record, entry_state))
                if state == "leased":
                    continue
                delayed = await self.call(
                    self.redis.zrange(
                        self.key("delayed", destination), 0, limit - 1, withscores=True
                    )
                )
                for member, score in delayed:
                    fields = json.loads(member)
                    records.append(_record(fields["id"], fields, "pending", not_before=score))
        records.sort(key=lambda record: record.accepted_at)
        return records[:limit]

    async def _leased(self, stream: str, count: int) -> set[str]:
        """Ids of the stream's entries read by a dispatcher and not yet acknowledged."""
        try:
            pending = await self.call(self.redis.xpending_range(stream, GROUP, "-", "+", count))
        except OutboxUnavailable as error:
            if not _group_missing(error):
                raise
            return set()  # no dispatcher has read this stream since Redis lost its data
        return {entry["message_id"] for entry in pending}

    async def stats(self) -> OutboxStats:
        depth = await self.call(self.redis.get(self.key("depth")))
        dead = await self.call(self.redis.hlen(self.key("dead")))
        # The oldest of each destination's stream and of its deliveries put off for later.
        accepted: list[float] = []
        for destination in self.destinations:
            first = await self.call(self.redis.xrange(self.key("stream", destination), count=1))
            waiting = await self.call(
                self.redis.zrange(self.key("waiting", destination), 0, 0, withscores=True)
            )
            accepted += [float(fields["accepted_at"]) for _, fields in first]
            accepted += [score for _, score in waiting]
        age = max(0.0, time.time() - min(accepted)) if accepted else 0.0
        return OutboxStats(int(depth or 0), age, int(dead))

    async def prune(self) -> int:
        # Delivered entries are deleted from their stream when acknowledged; dedup and
        # notifier keys expire by themselves.
        return 0

    async def check_storage(self) -> None:
        await self.call(self.redis.ping())


def _group_missing(error: OutboxUnavailable) -> bool:
    """Whether Redis refused for want of the consumer group (it lost its data)."""
    return "NOGROUP" in str(error)


def _record(
    delivery_id: str, fields: dict[str, Any], state: State = "pending", not_before: float = 0.0
) -> DeliveryRecord:
    group_key = ""
    try:
        group_key = str(json.loads(fields.get("body", "{}")).get("groupKey", ""))
    except (ValueError, AttributeError):
        group_key = ""
    return DeliveryRecord(
        delivery_id,
        str(fields.get("destination", "")),
        state,
        int(fields.get("attempts", 0)),
        float(fields.get("accepted_at", 0)),
        not_before,
        str(fields.get("reason", "")),
        group_key,
    )
