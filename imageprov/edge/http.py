"""The accept service's HTTP layer: parse, call the checks and the Mender client, answer.

nginx terminates TLS, verifies the client certificate and sends the auth
request here with that certificate in ``X-SSL-Client-Cert`` (a header nginx
sets itself, whatever the client sent). Every check is made again here; a
request is passed to the Mender server only once all of them hold, and only
after the device is preauthorized. nginx also asks ``CHECK`` before every
other device request (``auth_request``), so that a revoked certificate is cut
off on every route within ``--recheck`` seconds, and a background task
rejects a revoked device's auth set in Mender, so that its token dies even
where the edge is not in the way. One JSON log line per decision;
``/healthz`` (readiness: the registry and the Mender server answer),
``/livez`` and ``/metrics`` (Prometheus) for operations.

A device accepted once is remembered (``CACHE``), and its later requests skip
preauthorization; but the cache never has the last word over Mender's state.
When Mender refuses (401) a request forwarded after a cached skip, or after a
409, the edge reads what Mender holds of the device and, where that is how
to bring it back (decommissioned there, or left pending, or its certificate
reissued with a new key), preauthorizes it with ``force`` and forwards the
same request once more (``_readmit``, ``checks.Readmission``). A key that
someone rejected in Mender stays rejected: keeping a device out is the
revocation's job, checked before anything reaches Mender, and an operator's
rejection in Mender is never undone here; accepting it there, or a new
certificate, brings it back. Every call to Mender goes through the proxy
``HTTPS_PROXY`` names unless ``NO_PROXY`` lists the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from imageprov.edge import checks, identity
from imageprov.edge.checks import AuthRequest, Readmission, Reason, Refused
from imageprov.edge.config import BODY_LIMIT, IdentityRule, ServeSettings
from imageprov.edge.mender_client import (
    AUTH_REQUESTS,
    Answer,
    MenderClient,
    Preauthorized,
    UpstreamRefused,
    UpstreamUnavailable,
    forwardable,
    proxy_for,
)
from imageprov.edge.nginx import CHECK
from imageprov.edge.revocation import CrlSource, DenylistSource, RevocationSource
from imageprov.edge.standing import RegistryGate, Standing
from imageprov.errors import ImageprovError
from imageprov.pki.registry import Pin

CERT_HEADER = "X-SSL-Client-Cert"
# The deadline of one auth request upstream, in --upstream-timeout units: login,
# preauthorize and forward, with room to wait for a pooled connection.
DEADLINE_CALLS = 3
# The deadline of a readmission (a device Mender refused after a cached skip or a 409), on top:
# preauthorize, read the device, preauthorize with force, forward again.
READMIT_CALLS = 4
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
        self.route_checks = Counter(
            "imageprov_edge_route_checks", "Device requests nginx asked about, by result and reason",
            ["result", "reason"], registry=self.registry,
        )  # fmt: skip
        self.cut_off = Counter(
            "imageprov_edge_cut_off", "Revoked devices whose auth sets were rejected in Mender", registry=self.registry
        )
        self.readmitted = Counter(
            "imageprov_edge_readmitted", "Devices Mender refused after a cached skip or a 409, by what Mender held",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.settings = Gauge(
            "imageprov_edge_settings", "1 for the identity rule in force and whether revocation is checked",
            ["identity", "revocation"], registry=self.registry,
        )  # fmt: skip
        self.enrollments = Counter(
            "imageprov_edge_enrollments", "EST enrollments (edge serve --est), by operation, result and reason",
            ["operation", "result", "reason"], registry=self.registry,
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


class Recent:
    """Serials found in good standing, each for ``seconds``: what a device route need not ask again."""

    def __init__(self, seconds: float, size: int) -> None:
        self.seconds = seconds
        self.size = size
        self._until: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, serial: str) -> bool:
        until = self._until.get(serial)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[serial]
            return False
        return True

    def add(self, serial: str) -> None:
        if self.seconds <= 0 or self.size == 0:
            return
        self._until[serial] = time.monotonic() + self.seconds
        self._until.move_to_end(serial)
        while len(self._until) > self.size:
            self._until.popitem(last=False)


@dataclass
class Readiness:
    """The last readiness probe: when, and what was wrong (empty: ready)."""

    checked: float = float("-inf")
    problems: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


SETTINGS = web.AppKey("settings", ServeSettings)
CLIENT = web.AppKey("client", MenderClient)
SOURCES = web.AppKey("sources", list[RevocationSource])
GATE = web.AppKey("gate", RegistryGate)
METRICS = web.AppKey("metrics", Metrics)
# (certificate, identity, key) already preauthorized and accepted upstream.
CACHE = web.AppKey("cache", Remembered)
# Digests of certificates whose signature by the fleet CA was verified.
ISSUED = web.AppKey("issued", Remembered)
RECENT = web.AppKey("recent", Recent)
READINESS = web.AppKey("readiness", Readiness)
# Serials revoked in a CRL or denylist that the cut-off has already dealt with.
FILE_REVOKED = web.AppKey("file_revoked", set[str])
# Seconds between two readiness probes, and between two rounds of cutting revoked devices off in Mender.
PROBE_INTERVAL = 2.0
CUT_INTERVAL = 1.0
# How long a replica's claim on a cut-off holds: longer than the calls to Mender it covers take (each under
# the client's deadline); one that died mid-call is taken over by another replica after that.
CUT_CLAIM = 60.0


@dataclass(frozen=True)
class Claim:
    """An auth request that passed every check: what Mender is asked to admit, and the request to forward."""

    serial: str
    auth: AuthRequest
    body: bytes
    headers: tuple[tuple[str, str], ...]
    key: bytes  # in CACHE once Mender accepted it


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
    # What Mender held of a device it refused after a cached skip or a 409 (checks.Readmission).
    readmitted: str | None = None

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
            "readmitted": self.readmitted,
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


def signed_by_fleet_ca(app: web.Application, cert: x509.Certificate) -> None:
    """Refuse a certificate the fleet CA did not sign itself (``checks.check_issuer``), each verified once."""
    # The signature on a certificate never changes: verified once, remembered by its digest.
    issued = hashlib.sha256(cert.tbs_certificate_bytes + cert.signature).digest()
    if issued not in app[ISSUED]:
        checks.check_issuer(cert, app[SETTINGS].ca_cert)
        app[ISSUED].add(issued)


async def _checked(app: web.Application, cert: x509.Certificate) -> None:
    """The certificate nginx verified, checked again: the fleet CA's, no bootstrap certificate (that one is for
    EST alone), valid now, for clientAuth."""
    signed_by_fleet_ca(app, cert)
    checks.check_not_bootstrap(cert)
    checks.check_validity_and_usage(cert, dt.datetime.now(dt.UTC))


async def check_revocation_sources(app: web.Application, serial: str) -> None:
    """Refuse if a revocation source (--crl, --denylist) says revoked.

    Raises ``ImageprovError`` (503 for the device) when a source cannot answer within its deadline."""
    settings = app[SETTINGS]
    try:
        async with asyncio.timeout(settings.timeout):
            for source in app[SOURCES]:
                if await source.revoked(serial):
                    raise Refused(Reason.REVOKED, f"the certificate is revoked ({source.name})")
    except TimeoutError:
        raise ImageprovError(f"a revocation source did not answer within {settings.timeout:g} s") from None


async def _standing(app: web.Application, serial: str) -> None:
    """Refuse unless every revocation source says not revoked and the registry says delivered, and a device
    certificate: never a bootstrap certificate, whatever its extensions say.

    Raises ``ImageprovError`` (503 for the device) when a source cannot answer within its deadline."""
    await check_revocation_sources(app, serial)
    gate = app.get(GATE)
    if gate is None:
        return
    standing = await gate.standing(serial)
    if standing is Standing.BOOTSTRAP:
        raise Refused(Reason.BOOTSTRAP, "a bootstrap certificate is for enrollment (EST) only (registry)")
    if standing is Standing.REVOKED:
        raise Refused(Reason.REVOKED, "the certificate is revoked (registry)")
    if standing is Standing.PENDING:
        raise Refused(Reason.NOT_DELIVERED, "the certificate was never confirmed delivered by the line")
    if standing is Standing.UNKNOWN:
        raise Refused(Reason.UNKNOWN_CERTIFICATE, "the registry has no record of this certificate")


async def _decide(request: web.Request, decision: Decision) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    retry = {"Retry-After": str(settings.retry_after)}
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        decision.reason = Reason.BAD_REQUEST.value
        return _error(413, f"the auth request is larger than {BODY_LIMIT} bytes")
    force = False
    try:
        cert = checks.parse_client_cert(request.headers.get(CERT_HEADER))
        decision.cn, decision.serial = checks.common_name(cert), checks.serial_hex(cert)
        auth = checks.parse_auth_request(body)
        decision.identity = auth.identity_hash
        await _checked(app, cert)
        await _standing(app, decision.serial)
        checks.check_key_matches(cert, auth)
        checks.verify_signature(auth.pubkey, body, request.headers.get("X-MEN-Signature"))
        # The identity is bound last: only a request proven to come from the key may pin one.
        policy = settings.identity
        if policy.rule is IdentityRule.ATTRIBUTE:
            assert policy.attribute is not None
            identity.check_attribute(auth.identity, policy.attribute, decision.cn)
        key = hashlib.sha256(decision.serial.encode() + b"\0" + auth.cache_key).digest()
        known = key in app[CACHE]
        if policy.rule is IdentityRule.PIN and not known:
            force = identity.check_pin(await app[GATE].pin(decision.serial, checks.canonical(auth.identity).decode()))
    except Refused as refused:
        decision.reason = refused.reason.value
        return _error(refused.status, refused.message)
    except ImageprovError as exc:  # a source that cannot answer: never accept without it
        decision.decision, decision.reason = "unavailable", "revocation-unknown"
        log.warning(str(exc))
        return _error(503, "the edge cannot check this certificate now", **retry)
    claim = Claim(
        serial=decision.serial, auth=auth, body=body, key=key,
        headers=tuple(forwardable(request.headers.items(), drop=[CERT_HEADER])),
    )  # fmt: skip
    try:
        # Every call has its own timeouts; this bounds the whole exchange, queueing included.
        async with asyncio.timeout(settings.timeout * DEADLINE_CALLS):
            done = None if known else await _preauthorize(app, claim, decision, force=force)
            decision.preauthorized = not known
            answer = await app[CLIENT].forward_auth_request(body, claim.headers)
        if answer.status == 401 and (done is None or done.status == 409):
            # Refused where the edge took Mender's word for it (a cached skip, or a 409):
            # never let that hide what Mender holds now. Asked, and retried once at most.
            app[CACHE].discard(key)
            async with asyncio.timeout(settings.timeout * READMIT_CALLS):
                answer = await _readmit(app, claim, decision, done) or answer
    except Refused as refused:  # the identity pin, asked again before a readmission
        decision.reason = refused.reason.value
        return _error(refused.status, refused.message)
    except (UpstreamUnavailable, UpstreamRefused, TimeoutError) as exc:
        decision.decision = "unavailable"
        decision.reason = "upstream-refused" if isinstance(exc, UpstreamRefused) else "upstream-unavailable"
        log.warning(str(exc) or "the Mender server did not answer in time")
        return _error(503, "the Mender server is unavailable; try again", **retry)
    except ImageprovError as exc:  # the registry, recording the Mender device id
        decision.decision, decision.reason = "unavailable", "registry-unavailable"
        log.warning(str(exc))
        return _error(503, "the edge cannot record this device now", **retry)
    decision.upstream_status = answer.status
    return _answer(answer, decision, app[CACHE], key, retry)


async def _preauthorize(app: web.Application, claim: Claim, decision: Decision, *, force: bool) -> Preauthorized:
    """Preauthorize the claim's identity and key; with a pinned identity, record which Mender device took it."""
    done = await app[CLIENT].preauthorize(claim.auth.identity, claim.auth.pubkey_pem, force=force)
    decision.upstream_status = done.status
    if done.device_id is not None and GATE in app and app[SETTINGS].identity.rule is IdentityRule.PIN:
        # A decommissioned device that comes back is a new device in Mender: the cut-off needs the new id.
        await app[GATE].set_mender_device(claim.serial, done.device_id)
    return done


async def _readmit(app: web.Application, claim: Claim, decision: Decision, done: Preauthorized | None) -> Answer | None:
    """Mender refused a device that passed every check here: read what Mender holds, and retry once where
    that is how to bring the device back; the retry's answer, or None where Mender's refusal stands.

    Every check of this request (certificate, revocation, key, signature, identity) has held; the retry
    sends the same signed request. ``done``: this request's 409, naming the device; None where the cache
    skipped preauthorization, which is done now (after the identity pin, which the cache skipped too).
    See ``checks.Readmission`` for which state of Mender's brings what; a key someone rejected there
    stays rejected: an operator's decision in Mender is not overridden here."""
    settings, client = app[SETTINGS], app[CLIENT]
    decision.preauthorized = True
    if done is None:
        force = False
        if settings.identity.rule is IdentityRule.PIN:
            force = identity.check_pin(
                await app[GATE].pin(claim.serial, checks.canonical(claim.auth.identity).decode())
            )
        done = await _preauthorize(app, claim, decision, force=force)
        if done.status == 201:  # Mender forgot the device since the forwarded request, or its key moved
            decision.readmitted = "preauthorized"
            app[METRICS].readmitted.labels(outcome=decision.readmitted).inc()
            return await client.forward_auth_request(claim.body, claim.headers)
    # A 409 that names no device: nothing to read, and no force without reading.
    device = await client.device(done.device_id) if done.device_id is not None else None
    verdict = checks.readmission(device, claim.auth.pubkey, bound=settings.identity.rule is not IdentityRule.NONE)
    decision.readmitted = verdict.value
    app[METRICS].readmitted.labels(outcome=verdict.value).inc()
    if verdict is Readmission.FORCE:
        await _preauthorize(app, claim, decision, force=True)
    elif verdict is not Readmission.RETRY:
        return None
    return await client.forward_auth_request(claim.body, claim.headers)


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


async def check(request: web.Request) -> web.Response:
    """nginx's ``auth_request`` before every device request: 204 lets it through, 403 cuts it off.

    The certificate is checked as for an auth request, and its standing asked again
    at most every ``--recheck`` seconds; a source that cannot answer gives 503."""
    app = request.app
    metrics = app[METRICS]
    serial = None
    try:
        cert = checks.parse_client_cert(request.headers.get(CERT_HEADER))
        serial = checks.serial_hex(cert)
        await _checked(app, cert)
        if serial not in app[RECENT]:
            await _standing(app, serial)
            app[RECENT].add(serial)
    except Refused as refused:
        metrics.route_checks.labels(result="refused", reason=refused.reason.value).inc()
        fields = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": "route-refused",
            "serial": serial,
            "reason": refused.reason.value,
            "uri": request.headers.get("X-Original-URI"),
        }
        log.info("route refused", extra={"fields": fields})
        return _error(401 if refused.reason is Reason.NO_CERTIFICATE else 403, refused.message)
    except ImageprovError as exc:
        metrics.route_checks.labels(result="unavailable", reason="registry-unavailable").inc()
        log.warning(str(exc))
        return _error(503, "the edge cannot check this certificate now")
    metrics.route_checks.labels(result="allowed", reason="").inc()
    return web.Response(status=204)


async def _probe(app: web.Application) -> dict[str, str]:
    """What keeps the service from deciding now: the registry, the Mender server (empty: ready)."""
    problems: dict[str, str] = {}
    gate = app.get(GATE)
    if gate is not None:
        try:
            await gate.ping()
        except ImageprovError as exc:
            problems["registry"] = exc.message
    try:
        async with asyncio.timeout(app[SETTINGS].timeout):
            await app[CLIENT].reachable()
    except (ImageprovError, TimeoutError) as exc:
        problems["upstream"] = getattr(exc, "message", "") or "the Mender server did not answer in time"
    return problems


async def healthz(request: web.Request) -> web.Response:
    """Readiness: 200 while the registry and the Mender server answer, else 503 saying which does not."""
    readiness = request.app[READINESS]
    async with readiness.lock:  # one probe at a time, however many load balancers ask
        if time.monotonic() - readiness.checked > PROBE_INTERVAL:
            readiness.problems = await _probe(request.app)
            readiness.checked = time.monotonic()
    if readiness.problems:
        return web.json_response({"status": "not-ready", "problems": readiness.problems}, status=503)
    return web.json_response({"status": "ready"})


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _cut(app: web.Application, pin: Pin, source: str) -> bool:
    """Reject ``pin``'s device's auth set in Mender (its token dies there) and record that it was.

    Claimed in the registry first, for CUT_CLAIM seconds: of the replicas that find the same revoked
    pin, one acts (False for the others). A failed call gives the claim back for the next round.
    """
    gate, client = app[GATE], app[CLIENT]
    if not await gate.claim_cut(pin.serial, CUT_CLAIM):
        return False
    try:
        record = await gate.record_of(pin.serial)
        rejected = 0
        if pin.mender_device_id is not None and record is not None:
            key = serialization.load_pem_public_key(record.public_key.encode())
            rejected = await client.reject(pin.mender_device_id, key)
    except BaseException:
        with contextlib.suppress(ImageprovError, TimeoutError):  # else the claim runs out by itself
            await gate.release_cut(pin.serial)
        raise
    await gate.mark_cut(pin.serial)
    app[METRICS].cut_off.inc()
    log.info("cut off", extra={"fields": {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "event": "cut-off", "source": source,
        "serial": pin.serial, "mender_device": pin.mender_device_id, "auth_sets_rejected": rejected}})  # fmt: skip
    return True


async def cut_off_revoked(app: web.Application) -> int:
    """One round: reject in Mender the auth set of every revoked certificate not yet cut off; how many were.

    Revoked in the registry: its own list of those not cut off yet. Revoked
    in a CRL or denylist file: the serials new since the last round, each
    looked up in the registry for the device it pinned."""
    gate = app[GATE]
    done = 0
    for pin in await gate.uncut_revoked_pins():
        done += await _cut(app, pin, "registry")
    seen = app[FILE_REVOKED]
    for source in app[SOURCES]:
        serials = await source.revoked_serials()
        for serial in sorted(serials - seen):
            pinned = await gate.pin_of(serial)
            if pinned is not None and pinned.cut_at is None:
                done += await _cut(app, pinned, source.name)
            seen.add(serial)  # once cut (or never pinned: refused before it could be), never asked again
    return done


async def _cut_off_loop(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            try:
                await cut_off_revoked(app)
            except (ImageprovError, TimeoutError) as exc:  # the next round tries again
                log.warning(f"cutting revoked devices off in Mender: {exc}")
            await asyncio.sleep(CUT_INTERVAL)

    task = asyncio.create_task(loop()) if GATE in app else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # The system's CAs (hosted Mender), or a bundle of one's own (a self-hosted server).
    verify: ssl.SSLContext | bool = True
    if settings.upstream_ca is not None:
        verify = ssl.create_default_context(cafile=str(settings.upstream_ca))
    # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as Mender Gateway honours them: for every call to the server.
    proxy = proxy_for(settings.upstream, os.environ)
    log.info(f"calls to {settings.upstream} go " + (f"through the proxy {proxy}" if proxy else "directly"))
    # auto_decompress off: the upstream's answer goes back to the device byte for byte.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, ssl=verify), auto_decompress=False
    ) as session:
        app[CLIENT] = MenderClient(session, settings.upstream, settings.credentials, settings.timeout, proxy)
        yield


async def _registry_gate(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.registry_dir is not None:
        app[GATE] = RegistryGate(settings.registry_dir, timeout=settings.timeout)
    yield
    if GATE in app:
        # In a thread: it may wait for a call still running (see close).
        await asyncio.to_thread(app[GATE].close)


def revocation_sources(settings: ServeSettings) -> list[RevocationSource]:
    """The revocation files configured; each is asked, and any one can refuse. (The registry is asked apart.)"""
    sources: list[RevocationSource] = []
    if settings.crl is not None:
        sources.append(CrlSource(settings.crl, settings.ca_cert))
    if settings.denylist is not None:
        sources.append(DenylistSource(settings.denylist))
    return sources


def make_app(settings: ServeSettings) -> web.Application:
    """The aiohttp application of ``imageprov edge serve`` (edge/artifacts.py's ``install`` adds the artifact
    routes, building on this module's keys)."""
    app = web.Application(client_max_size=BODY_LIMIT)
    app[SETTINGS] = settings
    app[SOURCES] = revocation_sources(settings)
    app[METRICS] = Metrics()
    app[METRICS].settings.labels(
        identity=str(settings.identity), revocation="checked" if settings.revocation_checked else "disabled"
    ).set(1)
    app[CACHE] = Remembered(settings.cache_size)
    app[ISSUED] = Remembered(settings.cache_size)
    app[RECENT] = Recent(settings.recheck, settings.cache_size)
    app[READINESS] = Readiness()
    app[FILE_REVOKED] = set()
    # Order matters: the registry and the client exist before the cut-off loop starts, and outlive it.
    app.cleanup_ctx.extend([_registry_gate, _upstream_session, _cut_off_loop])
    app.router.add_post(AUTH_REQUESTS, auth_request)
    app.router.add_get(CHECK, check)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    return app
