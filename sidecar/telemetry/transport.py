"""The HTTP transport of the OTLP exporters, on httpx instead of requests.

The sidecar already carries httpx for its notifiers; requests would add about 4 MB resident
for the same job. The exporter keeps its own retry logic (429/502/503/504, ``Retry-After``,
connection errors) and calls this transport once per attempt. The transport also remembers how
its last request went, because the exporter itself only reports success or failure, and the
operator needs the cause in the log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

# NOTE: BaseHTTPTransport and the exporters' `_transport` argument are the SDK's pluggable
# transport interface, still marked private in opentelemetry-exporter-http-transport 0.66b2;
# every export test runs through this class, so a change there fails the tests at once.
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport

# Headers the exporter itself sets for the protocol; every other one comes from the config.
_PROTOCOL_HEADERS = frozenset({"content-type", "content-encoding", "user-agent"})
_CONNECTION_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


@dataclass(frozen=True, slots=True)
class HttpxResult(BaseHTTPResult):
    response: httpx.Response | None = field(default=None, compare=False)

    def content(self) -> bytes:
        return b"" if self.response is None else self.response.content

    def headers(self) -> Mapping[str, str]:
        return {} if self.response is None else self.response.headers


class HttpxTransport(BaseHTTPTransport):
    """One keep-alive connection pool per exporter; ``last_outcome`` describes the last try."""

    def __init__(self, tls: bool, headers: Mapping[str, str]) -> None:
        # trust_env=False: proxies and certificates come from the configuration only, never
        # from variables read behind its back. Without TLS (an http:// endpoint, redirects
        # off) the CA bundle is not loaded: it would cost about 2 MB for nothing.
        self._client = httpx.Client(follow_redirects=False, trust_env=False, verify=tls)
        self._headers = dict(headers)
        self.last_outcome = "no request was sent"

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        # The exporter merges OTEL_EXPORTER_OTLP_*HEADERS from the environment into its own
        # headers; the configuration already decided between file and environment, so only its
        # headers are sent.
        sent = {
            name: value
            for name, value in (headers or {}).items()
            if name.lower() in _PROTOCOL_HEADERS
        }
        sent.update(self._headers)
        try:
            response = self._client.request(
                method, url, headers=sent, content=data, timeout=timeout
            )
        except httpx.TimeoutException as error:
            self.last_outcome = f"no answer within the timeout ({type(error).__name__})"
            return HttpxResult(error=error)
        except httpx.HTTPError as error:
            found = _ERRNO.search(str(error))
            reason = found.group(0) if found else (str(error) or type(error).__name__)
            self.last_outcome = f"cannot connect ({reason})"
            return HttpxResult(error=error)
        self.last_outcome = f"answered {response.status_code} {response.reason_phrase}"
        return HttpxResult(
            status_code=response.status_code, reason=response.reason_phrase, response=response
        )

    def is_connection_error(self, exception: Exception | None) -> bool:
        return isinstance(exception, _CONNECTION_ERRORS)

    def close(self) -> None:
        self._client.close()
