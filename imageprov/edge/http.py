"""The accept service's HTTP layer: parse, call the checks and the Mender client, answer.

nginx terminates TLS, verifies the client certificate and sends the auth
request here with that certificate in ``X-SSL-Client-Cert`` (a header nginx
sets itself, whatever the client sent). Every check is made again here; a
request is passed to the Mender server only once all of them hold, and only
after the device is preauthorized. One JSON log line per decision; ``/healthz``
and ``/metrics`` (Prometheus) for operations.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from imageprov.edge import checks
from imageprov.edge.checks import Reason, Refused
from imageprov.edge.config import BODY_LIMIT, ServeSettings
from imageprov.edge.mender_client import (
    AUTH_REQUESTS,
    Answer,
    MenderClient,
    UpstreamRefused,
    UpstreamUnavailable,
    forwardable,
)
from imageprov.edge.revocation import CrlSource, DenylistSource, RegistrySource, RevocationSource
from imageprov.errors import ImageprovError

CERT_HEADER = "X-SSL-Client-Cert"
# The deadline of one auth request upstream, in --upstream-timeout units: login,
# preauthorize and forward, with room to wait for a pooled connection.
DEADLINE_CALLS = 3
log = logging.getLogger("imageprov.edge")


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter(
            "imageprov_edge_accepted", "Auth requests passed to the Mender server after every check",
            ["preauthorized"], registry=self.registry,
        )  # fmt: skip
        self.refused = Counter(
            "imageprov_edge_refused", "Auth requests refused, by reason", ["reason"], registry=self.registry
        )
        self.upstream_errors = Counter(
            "imageprov_edge_upstream_errors", "Mender server calls that failed (503 to the device)",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "imageprov_edge_request_seconds", "Time to answer an auth request", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )  # fmt: skip


class Remembered:
    """A bounded set, least recently used out: what the edge need not do again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        if key in self._items:
            self._items.move_to_end(key)
            return True
        return False

    def add(self, key: bytes) -> None:
        if self.size == 0:
            return
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def discard(self, key: bytes) -> None:
        self._items.pop(key, None)


SETTINGS = web.AppKey("settings", ServeSettings)
CLIENT = web.AppKey("client", MenderClient)
SOURCES = web.AppKey("sources", list[RevocationSource])
METRICS = web.AppKey("metrics", Metrics)
# (identity, key) pairs already preauthorized and accepted upstream.
CACHE = web.AppKey("cache", Remembered)
# Digests of certificates whose signature by the fleet CA was verified.
ISSUED = web.AppKey("issued", Remembered)


@dataclass
class Decision:
    """What one log line says about one auth request."""

    started: float = field(default_factory=time.monotonic)
    cn: str | None = None
    serial: str | None = None
    identity: str | None = None
    decision: str = "refused"
    reason: str | None = None
    upstream_status: int | None = None
    preauthorized: bool | None = None

    def line(self) -> dict[str, Any]:
        return {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "cn": self.cn,
            "serial": self.serial,
            "identity": self.identity,
            "decision": self.decision,
            "reason": self.reason,
            "upstream_status": self.upstream_status,
            "preauthorized": self.preauthorized,
            "ms": round((time.monotonic() - self.started) * 1000, 1),
        }


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the decision's fields, or the message of any other record."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            return json.dumps(fields, ensure_ascii=False)
        line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "message": record.getMessage()}  # fmt: skip
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _error(status: int, message: str, **headers: str) -> web.Response:
    # Mender's error body: {"error": "..."}.
    return web.json_response({"error": message}, status=status, headers=headers or None)


async def auth_request(request: web.Request) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    decision = Decision()
    try:
        response = await _decide(request, decision)
    except Exception:  # a bug: logged with its traceback; the device gets 500 and retries
        log.exception("auth request failed")
        decision.decision, decision.reason = "error", "internal-error"
        response = _error(500, "internal error")
    finally:
        metrics.latency.observe(time.monotonic() - decision.started)
        if decision.decision == "accepted":
            metrics.accepted.labels(preauthorized="cached" if not decision.preauthorized else "now").inc()
        elif decision.decision == "refused":
            metrics.refused.labels(reason=decision.reason or "").inc()
        elif decision.decision == "unavailable":
            metrics.upstream_errors.labels(kind=decision.reason or "").inc()
        log.info("decision", extra={"fields": decision.line()})
    return response


async def _decide(request: web.Request, decision: Decision) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    retry = {"Retry-After": str(settings.retry_after)}
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        decision.reason = Reason.BAD_REQUEST.value
        return _error(413, f"the auth request is larger than {BODY_LIMIT} bytes")
    try:
        cert = checks.parse_client_cert(request.headers.get(CERT_HEADER))
        decision.cn, decision.serial = checks.common_name(cert), checks.serial_hex(cert)
        auth = checks.parse_auth_request(body)
        decision.identity = auth.identity_hash
        # The signature on a certificate never changes: verified once, remembered by its digest.
        issued = hashlib.sha256(cert.tbs_certificate_bytes + cert.signature).digest()
        if issued not in app[ISSUED]:
            checks.check_issuer(cert, settings.ca_cert)
            app[ISSUED].add(issued)
        checks.check_validity_and_usage(cert, dt.datetime.now(dt.UTC))
        for source in app[SOURCES]:
            if await source.revoked(decision.serial):
                raise Refused(Reason.REVOKED, f"the certificate is revoked ({source.name})")
        checks.check_key_matches(cert, auth)
        checks.verify_signature(auth.pubkey, body, request.headers.get("X-MEN-Signature"))
    except Refused as refused:
        decision.reason = refused.reason.value
        return _error(refused.status, refused.message)
    except ImageprovError as exc:  # a revocation source that cannot answer: never accept without it
        decision.decision, decision.reason = "unavailable", "revocation-unknown"
        log.warning(str(exc))
        return _error(503, "the edge cannot check revocation now", **retry)
    cache, client = app[CACHE], app[CLIENT]
    known = auth.cache_key in cache
    try:
        # Every call has its own timeouts; this bounds the whole exchange, queueing included.
        async with asyncio.timeout(settings.timeout * DEADLINE_CALLS):
            if not known:
                decision.upstream_status = await client.preauthorize(auth.identity, auth.pubkey_pem)
            decision.preauthorized = not known
            headers = forwardable(request.headers.items(), drop=[CERT_HEADER])
            answer = await client.forward_auth_request(body, headers)
    except (UpstreamUnavailable, UpstreamRefused, TimeoutError) as exc:
        decision.decision = "unavailable"
        decision.reason = "upstream-refused" if isinstance(exc, UpstreamRefused) else "upstream-unavailable"
        log.warning(str(exc) or "the Mender server did not answer in time")
        return _error(503, "the Mender server is unavailable; try again", **retry)
    decision.upstream_status = answer.status
    return _answer(answer, decision, cache, auth.cache_key, retry)


def _answer(answer: Answer, decision: Decision, cache: Remembered, key: bytes, retry: dict[str, str]) -> web.Response:
    if answer.status >= 500:
        decision.decision, decision.reason = "unavailable", "upstream-error"
        return _error(503, f"the Mender server answered {answer.status}; try again", **retry)
    if 200 <= answer.status < 300:
        decision.decision = "accepted"
        cache.add(key)
    else:
        # Checks held, but the server says no (a device rejected or decommissioned
        # there): its answer stands, and the next request preauthorizes again.
        decision.decision, decision.reason = "upstream-refused", f"upstream-{answer.status}"
        cache.discard(key)
    response = web.Response(status=answer.status, body=answer.body)
    for name, value in answer.headers:
        response.headers.add(name, value)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # The system's CAs (hosted Mender), or a bundle of one's own (a self-hosted server).
    verify: ssl.SSLContext | bool = True
    if settings.upstream_ca is not None:
        verify = ssl.create_default_context(cafile=str(settings.upstream_ca))
    # auto_decompress off: the upstream's answer goes back to the device byte for byte.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, ssl=verify), auto_decompress=False
    ) as session:
        app[CLIENT] = MenderClient(session, settings.upstream, settings.credentials, settings.timeout)
        yield


def revocation_sources(settings: ServeSettings) -> list[RevocationSource]:
    """Every revocation source configured; each is asked, and any one can refuse."""
    sources: list[RevocationSource] = []
    if settings.registry_dir is not None:
        sources.append(RegistrySource(settings.registry_dir))
    if settings.crl is not None:
        sources.append(CrlSource(settings.crl, settings.ca_cert))
    if settings.denylist is not None:
        sources.append(DenylistSource(settings.denylist))
    return sources


def make_app(settings: ServeSettings) -> web.Application:
    """The aiohttp application of ``imageprov edge serve``."""
    app = web.Application(client_max_size=BODY_LIMIT)
    app[SETTINGS] = settings
    app[SOURCES] = revocation_sources(settings)
    app[METRICS] = Metrics()
    app[CACHE] = Remembered(settings.cache_size)
    app[ISSUED] = Remembered(settings.cache_size)
    app.cleanup_ctx.append(_upstream_session)
    app.router.add_post(AUTH_REQUESTS, auth_request)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
