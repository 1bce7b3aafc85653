"""A fake Discord webhook API, served over real HTTP on loopback for the notifier tests.

It follows Discord's documented webhook behaviour: execute (``POST /api/webhooks/ID/TOKEN``,
``?wait=true`` returns the message, ``?thread_id=`` posts into a thread), edit (``PATCH
.../messages/ID``), every documented length limit answered with 400 and the offending path
in Discord's error format, ``allowed_mentions`` resolved into who would really be pinged, and
a per-webhook rate-limit bucket with the real ``X-RateLimit-*`` headers and 429 answers.
Everything received is recorded for the tests to inspect. The package never imports it.

Lengths are counted in UTF-16 units, the stricter reading of Discord's "characters".
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.harness import free_port, wait_until

LIMITS = {
    "content": 2000,
    "embeds": 10,
    "title": 256,
    "description": 4096,
    "fields": 25,
    "field.name": 256,
    "field.value": 1024,
    "footer.text": 2048,
    "author.name": 256,
    "total": 6000,
    "url": 2048,
}
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_EVERYONE = re.compile(r"@(everyone|here)")


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Received:
    """One request as the fake saw it, and what it answered."""

    method: str
    webhook_id: str
    path: str
    query: dict[str, str]
    body: Any
    status: int
    at: float


@dataclass
class Webhook:
    webhook_id: str
    token: str
    limit: int
    window: float
    threads: set[str] = field(default_factory=set)
    count: int = 0
    reset_at: float = 0.0
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    injected: list[tuple[int, Any, dict[str, str]] | None] = field(default_factory=list)


class FakeDiscord:
    """The fake server; ``add_webhook`` returns a webhook URL with its own bucket."""

    def __init__(self, *, limit: int = 5, window: float = 2.0) -> None:
        self.limit = limit
        self.window = window
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.webhooks: dict[str, Webhook] = {}
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1_100_000_000_000_000_000)
        self._webhook_ids = itertools.count(900_000_000_000_000_000)
        routes = [
            Route("/api/webhooks/{webhook_id}/{token}", self._execute, methods=["POST"]),
            Route(
                "/api/v{version:int}/webhooks/{webhook_id}/{token}", self._execute, methods=["POST"]
            ),
            Route(
                "/api/webhooks/{webhook_id}/{token}/messages/{message_id}",
                self._message,
                methods=["PATCH", "GET"],
            ),
        ]
        self.app = Starlette(routes=routes)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- control from tests ----------------------------------------------------------------

    def start(self) -> FakeDiscord:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server is not None and self._server.started, what="fake Discord")
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def add_webhook(
        self,
        *,
        limit: int | None = None,
        window: float | None = None,
        threads: tuple[str, ...] = (),
    ) -> str:
        webhook_id = str(next(self._webhook_ids))
        token = f"tok-{webhook_id}-{'x' * 40}"
        with self._lock:
            self.webhooks[webhook_id] = Webhook(
                webhook_id,
                token,
                self.limit if limit is None else limit,
                self.window if window is None else window,
                set(threads),
            )
        return f"{self.base_url}/api/webhooks/{webhook_id}/{token}"

    def inject(
        self,
        url: str,
        status: int,
        body: Any = None,
        *,
        count: int = 1,
        after: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer ``count`` requests with ``status`` and ``body``, once ``after`` went through."""
        webhook = self.webhooks[_webhook_id(url)]
        with self._lock:
            webhook.injected.extend([None] * after + [(status, body, headers or {})] * count)

    def requests_for(self, url: str) -> list[Received]:
        webhook_id = _webhook_id(url)
        with self._lock:
            return [r for r in self.received if r.webhook_id == webhook_id]

    def delete_message(self, url: str, message_id: str) -> None:
        """What a moderator deleting the message in the Discord client does."""
        webhook = self.webhooks[_webhook_id(url)]
        with self._lock:
            del webhook.messages[message_id]

    def messages_for(self, url: str) -> list[dict[str, Any]]:
        """Messages the webhook holds now, in creation order (edits applied)."""
        webhook = self.webhooks[_webhook_id(url)]
        with self._lock:
            return [json.loads(json.dumps(m)) for m in webhook.messages.values()]

    # -- the API ---------------------------------------------------------------------------

    async def _execute(self, request: Request) -> Response:
        webhook, early = self._admit(request)
        if early is not None:
            return early
        assert webhook is not None
        body, problem = await _read_json(request)
        if problem is None:
            problem = validate_message(body, require_content=True)
        thread_id = request.query_params.get("thread_id")
        if problem is None and thread_id is not None and thread_id not in webhook.threads:
            problem = JSONResponse({"message": "Unknown Channel", "code": 10003}, 400)
        if problem is not None:
            return self._answer(request, webhook, body, problem)

        message = {
            "id": str(next(self._ids)),
            "type": 0,
            "channel_id": thread_id or "800000000000000000",
            "webhook_id": webhook.webhook_id,
            "content": body.get("content", ""),
            "embeds": body.get("embeds", []),
            "author": {"username": body.get("username", "Alerts"), "bot": True},
            "avatar_url": body.get("avatar_url"),
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
            "pinged": pinged(body.get("content", ""), body.get("allowed_mentions")),
            "allowed_mentions": body.get("allowed_mentions"),
            "thread_id": thread_id,
        }
        with self._lock:
            webhook.messages[message["id"]] = message
        if request.query_params.get("wait") == "true":
            return self._answer(request, webhook, body, JSONResponse(message, 200))
        return self._answer(request, webhook, body, Response(status_code=204))

    async def _message(self, request: Request) -> Response:
        webhook, early = self._admit(request)
        if early is not None:
            return early
        assert webhook is not None
        message = webhook.messages.get(request.path_params["message_id"])
        thread_id = request.query_params.get("thread_id")
        if message is None or message["thread_id"] != thread_id:
            unknown = JSONResponse({"message": "Unknown Message", "code": 10008}, 404)
            return self._answer(request, webhook, None, unknown)
        if request.method == "GET":
            return self._answer(request, webhook, None, JSONResponse(message))
        body, problem = await _read_json(request)
        if problem is None:
            problem = validate_message(body, require_content=False)
        if problem is not None:
            return self._answer(request, webhook, body, problem)
        with self._lock:
            for key in ("content", "embeds", "allowed_mentions"):
                if key in body:
                    message[key] = body[key]
            message["edited_timestamp"] = datetime.now(UTC).isoformat()
        return self._answer(request, webhook, body, JSONResponse(message))

    def _admit(self, request: Request) -> tuple[Webhook | None, Response | None]:
        """Authenticate, take from the bucket and apply injected failures."""
        webhook = self.webhooks.get(request.path_params["webhook_id"])
        if webhook is None:
            response = JSONResponse({"message": "Unknown Webhook", "code": 10015}, 404)
            self._record(request, request.path_params["webhook_id"], None, response.status_code)
            return None, response
        if request.path_params["token"] != webhook.token:
            response = JSONResponse({"message": "Invalid Webhook Token", "code": 50027}, 401)
            self._record(request, webhook.webhook_id, None, response.status_code)
            return None, response

        now = time.monotonic()
        with self._lock:
            if now >= webhook.reset_at:
                webhook.count, webhook.reset_at = 0, now + webhook.window
            headers = self._bucket_headers(webhook, now, remaining=webhook.limit - webhook.count)
            if webhook.count >= webhook.limit:
                retry_after = math.ceil((webhook.reset_at - now) * 1000) / 1000
                headers["Retry-After"] = str(max(math.ceil(retry_after), 1))
                headers["X-RateLimit-Scope"] = "user"
                response = JSONResponse(
                    {
                        "message": "You are being rate limited.",
                        "retry_after": retry_after,
                        "global": False,
                    },
                    429,
                    headers=headers,
                )
                self._record(request, webhook.webhook_id, None, 429, locked=True)
                return None, response
            webhook.count += 1
            injected = webhook.injected.pop(0) if webhook.injected else None
        if injected is not None:
            status, body, extra = injected
            response = (
                JSONResponse(body, status, headers=extra)
                if body is not None
                else Response(status_code=status, headers=extra)
            )
            self._record(request, webhook.webhook_id, None, status)
            return None, response
        return webhook, None

    def _bucket_headers(self, webhook: Webhook, now: float, remaining: int) -> dict[str, str]:
        reset_after = max(webhook.reset_at - now, 0.0)
        return {
            "X-RateLimit-Limit": str(webhook.limit),
            "X-RateLimit-Remaining": str(max(remaining, 0)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{math.ceil(reset_after * 1000) / 1000:.3f}",
            "X-RateLimit-Bucket": f"bucket-{webhook.webhook_id[-6:]}",
        }

    def _answer(
        self, request: Request, webhook: Webhook, body: Any, response: Response
    ) -> Response:
        now = time.monotonic()
        with self._lock:
            response.headers.update(
                self._bucket_headers(webhook, now, remaining=webhook.limit - webhook.count)
            )
        self._record(request, webhook.webhook_id, body, response.status_code)
        return response

    def _record(
        self, request: Request, webhook_id: str, body: Any, status: int, *, locked: bool = False
    ) -> None:
        entry = Received(
            request.method,
            webhook_id,
            request.url.path,
            dict(request.query_params),
            body,
            status,
            time.monotonic(),
        )
        if locked:
            self.received.append(entry)
        else:
            with self._lock:
                self.received.append(entry)


def _webhook_id(url: str) -> str:
    return url.split("/api/webhooks/")[1].split("/")[0]


async def _read_json(request: Request) -> tuple[Any, Response | None]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None, JSONResponse({"message": "400: Bad Request", "code": 0}, 400)
    if not isinstance(body, dict):
        return None, JSONResponse({"message": "400: Bad Request", "code": 0}, 400)
    return body, None


def validate_message(body: dict[str, Any], *, require_content: bool) -> Response | None:
    """Discord's documented limits; the first problems found, in Discord's error shape."""
    errors: dict[str, Any] = {}

    def too_long(path: list[str | int], limit: int) -> None:
        node = errors
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = {
            "_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {limit} or fewer in length."}
            ]
        }

    def required(path: list[str | int]) -> None:
        node = errors
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = {
            "_errors": [{"code": "BASE_TYPE_REQUIRED", "message": "This field is required"}]
        }

    content = body.get("content") or ""
    embeds = body.get("embeds") or []
    if require_content and not content and not embeds:
        return JSONResponse({"message": "Cannot send an empty message", "code": 50006}, 400)
    if utf16_length(content) > LIMITS["content"]:
        too_long(["content"], LIMITS["content"])
    if len(embeds) > LIMITS["embeds"]:
        too_long(["embeds"], LIMITS["embeds"])
    total = 0
    first_over: int | None = None
    for index, embed in enumerate(embeds):
        for key in ("title", "description"):
            if utf16_length(embed.get(key, "")) > LIMITS[key]:
                too_long(["embeds", index, key], LIMITS[key])
        if utf16_length(embed.get("url", "")) > LIMITS["url"]:
            too_long(["embeds", index, "url"], LIMITS["url"])
        fields = embed.get("fields", [])
        if len(fields) > LIMITS["fields"]:
            too_long(["embeds", index, "fields"], LIMITS["fields"])
        for number, item in enumerate(fields):
            for key in ("name", "value"):
                text = item.get(key, "")
                if not text.strip():
                    required(["embeds", index, "fields", number, key])
                elif utf16_length(text) > LIMITS[f"field.{key}"]:
                    too_long(["embeds", index, "fields", number, key], LIMITS[f"field.{key}"])
        footer = embed.get("footer", {}).get("text", "")
        if utf16_length(footer) > LIMITS["footer.text"]:
            too_long(["embeds", index, "footer", "text"], LIMITS["footer.text"])
        author = embed.get("author", {}).get("name", "")
        if utf16_length(author) > LIMITS["author.name"]:
            too_long(["embeds", index, "author", "name"], LIMITS["author.name"])
        colour = embed.get("color", 0)
        if not isinstance(colour, int) or not 0 <= colour <= 0xFFFFFF:
            errors.setdefault("embeds", {}).setdefault(str(index), {})["color"] = {
                "_errors": [
                    {"code": "NUMBER_TYPE_MAX", "message": "int value should be <= 16777215."}
                ]
            }
        total += sum(
            utf16_length(part)
            for part in (embed.get("title", ""), embed.get("description", ""), footer, author)
        )
        total += sum(
            utf16_length(f.get("name", "")) + utf16_length(f.get("value", "")) for f in fields
        )
        if total > LIMITS["total"] and first_over is None:
            first_over = index
    mentions = body.get("allowed_mentions")
    if mentions is not None:
        parse = mentions.get("parse", [])
        if any(kind not in ("roles", "users", "everyone") for kind in parse):
            errors["allowed_mentions"] = {
                "_errors": [{"code": "ENUM", "message": "Invalid parse type"}]
            }
        for kind in ("roles", "users"):
            if kind in parse and mentions.get(kind):
                errors["allowed_mentions"] = {
                    "_errors": [
                        {
                            "code": "MUTUALLY_EXCLUSIVE",
                            "message": f"parse {kind} and a {kind} list are exclusive.",
                        }
                    ]
                }
            if len(mentions.get(kind, [])) > 100:
                too_long(["allowed_mentions", kind], 100)
    if errors:
        return JSONResponse({"code": 50035, "errors": errors, "message": "Invalid Form Body"}, 400)
    if first_over is not None:
        # Discord reports the 6,000-character total by the index of the embed that crossed it.
        return JSONResponse({"embeds": [str(first_over)]}, 400)
    return None


def pinged(content: str, allowed: dict[str, Any] | None) -> dict[str, Any]:
    """Who a message would notify: mentions in ``content`` filtered by ``allowed_mentions``.

    Mentions in embeds never notify anyone, so only ``content`` is read.
    """
    users = _USER_MENTION.findall(content)
    roles = _ROLE_MENTION.findall(content)
    everyone = bool(_EVERYONE.search(content))
    if allowed is None:
        return {"everyone": everyone, "roles": roles, "users": users}
    parse = allowed.get("parse", [])
    return {
        "everyone": everyone and "everyone" in parse,
        "roles": [r for r in roles if "roles" in parse or r in allowed.get("roles", [])],
        "users": [u for u in users if "users" in parse or u in allowed.get("users", [])],
    }
