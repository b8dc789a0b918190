"""Artifacts through the edge, as Mender Gateway does it: a device that reaches only the edge can update.

A ``deployments/next`` answer carries the artifact's storage link
(``artifact.source.uri``: S3, MinIO, Azure, a presigned URL the device could not
reach behind the edge). nginx sends that route here (after its ``auth_request``
check); the service asks the Mender server, and replaces the link with
``https://<the host the device reached>/imageprov/artifacts/<token>``. The token
is a capability: the storage URL, an expiry (the link's own ``expire``, at most
``max_age`` from now) and the SHA-256 fingerprint of the device's certificate,
signed with HMAC-SHA256 under a key read from a file (shared by every instance)
or made at start. ``GET /imageprov/artifacts/<token>`` (also behind nginx's check)
is served only to the certificate it was issued for, before its expiry, for a
storage host still on the allowlist; it streams from storage with ``Range``
passed through (a cut download resumes), or from the disk cache.

Allowlist: a link to a host off ``--artifact-host`` is refused with 502 (logged
and counted): the edge never hands a device a link it would not serve, and never
passes on a storage link the device cannot use; the device retries its check
for updates later, as after any server error.

Token: ``<payload>.<mac>``, both base64url without padding; the payload is the
JSON ``{"u": url, "e": expiry (Unix seconds), "d": certificate SHA-256 hex}``.
It is signed, not encrypted: the device can read the storage URL it names, as it
could read Mender's own answer without an edge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from prometheus_client import Counter, Gauge

from imageprov.edge import checks
from imageprov.edge.artifact_cache import ArtifactCache, TooLarge
from imageprov.edge.checks import Refused
from imageprov.edge.http import CERT_HEADER, CLIENT, METRICS, SETTINGS
from imageprov.edge.mender_client import forwardable, proxy_for
from imageprov.edge.nginx import ARTIFACTS, NEXT_V1, NEXT_V2
from imageprov.errors import ImageprovError, UsageError

# A link lives at most this long, whatever the storage link's own expiry (Mender's is minutes to hours).
MAX_AGE = 24 * 3600.0
KEY_BYTES = 32
_DOMAIN = b"imageprov-artifact-v1."
# A deployments/next answer is a few hundred bytes; anything near this is not one.
ANSWER_LIMIT = 1024 * 1024
CHUNK = 256 * 1024
# The headers of a storage answer that go to the device: what a resumed download needs, and the type.
_PASSED = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified",
           "Content-Encoding", "Content-Disposition")  # fmt: skip
# The host a device reached, as nginx passes it: a name or address, and a port.
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
log = logging.getLogger("imageprov.edge")


class ArtifactError(ImageprovError):
    """An artifact link or download the edge will not serve."""


class KeyFileError(UsageError):
    """The artifact key file cannot be read or made."""


@dataclass(frozen=True)
class ArtifactSettings:
    """``edge serve --artifact-*``: the storage hosts served, the signing key, the cache."""

    hosts: tuple[str, ...]
    key: bytes = field(repr=False)
    max_age: float = MAX_AGE
    cache_dir: Path | None = None
    cache_size: int = 0
    # Where the key came from; None: made for this process, so other instances cannot redeem its links.
    key_file: Path | None = None

    def allowed(self, url: str) -> bool:
        """``url`` is http(s) on a host of the allowlist (``HOST``, ``HOST:PORT`` or ``*.DOMAIN``)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            return False
        for entry in self.hosts:
            if entry.startswith("*."):
                if host.endswith(entry[1:]):
                    return True
            elif entry in (host, f"{host}:{port}"):
                return True
        return False


def load_key(path: Path | None) -> bytes:
    """The HMAC key: read from ``path``, made there (0600, atomically) when it does not exist yet, so that
    instances started together share one; without a file, made for this process alone."""
    if path is None:
        return secrets.token_bytes(KEY_BYTES)
    try:
        # O_EXCL: of instances starting at once, one writes the key and the others read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyFileError(f"cannot make --artifact-key-file {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(KEY_BYTES).encode() + b"\n")
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read --artifact-key-file {path}: {exc.strerror}") from None
    if len(data) < KEY_BYTES:
        # Never the content in the message: it is the secret.
        raise KeyFileError(
            f"--artifact-key-file {path} holds fewer than {KEY_BYTES} bytes",
            hint="remove it to have one made, or write 32 random bytes or more (e.g. openssl rand -hex 32)",
        )
    return data


def parse_hosts(hosts: list[str]) -> tuple[str, ...]:
    checked = []
    for host in hosts:
        entry = host.strip().lower()
        if not entry or "/" in entry or "@" in entry or not _HOST.fullmatch(entry.removeprefix("*.")):
            raise UsageError(f"--artifact-host {host!r} is not HOST, HOST:PORT or *.DOMAIN",
                             hint="e.g. --artifact-host my-bucket.s3.eu-west-1.amazonaws.com")  # fmt: skip
        checked.append(entry)
    return tuple(checked)


@dataclass(frozen=True)
class Capability:
    """What a token grants: ``url`` to the certificate ``device`` until ``expires`` (Unix seconds)."""

    url: str
    expires: int
    device: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: bytes, capability: Capability) -> str:
    value = {"u": capability.url, "e": capability.expires, "d": capability.device}
    payload = _b64(json.dumps(value, separators=(",", ":")).encode())
    mac = hmac.new(key, _DOMAIN + payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def redeem(key: bytes, token: str, device: str, now: float) -> Capability:
    """The capability ``token`` holds, for the certificate ``device``, at ``now``; else ArtifactError."""
    payload, dot, mac = token.partition(".")
    try:
        given = _unb64(mac)
    except (binascii.Error, ValueError):
        given = b""
    expected = hmac.new(key, _DOMAIN + payload.encode(), hashlib.sha256).digest()
    if not dot or not hmac.compare_digest(given, expected):
        raise ArtifactError("bad-signature")
    value = json.loads(_unb64(payload))  # signed by this edge: well formed
    capability = Capability(url=value["u"], expires=int(value["e"]), device=value["d"])
    if not hmac.compare_digest(capability.device, device):
        raise ArtifactError("other-device")
    if capability.expires <= now:
        raise ArtifactError("expired")
    return capability


def _expiry(expire: Any, now: float, max_age: float) -> int:
    """The link's ``expire`` (RFC 3339, Go's nanoseconds included), at most ``max_age`` from ``now``."""
    limit = int(now + max_age)
    if not isinstance(expire, str):
        return limit
    text = re.sub(r"(\.\d{6})\d+", r"\1", expire)  # Python reads microseconds at most
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return limit
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(limit, int(when.timestamp()))


class ArtifactMetrics:
    """Links rewritten and downloads served, in the service's registry."""

    def __init__(self, registry: Any) -> None:
        self.links = Counter("imageprov_edge_artifact_links", "deployments/next answers with an artifact link, "
                             "by result", ["result"], registry=registry)  # fmt: skip
        self.downloads = Counter("imageprov_edge_artifact_downloads", "Artifact downloads through the edge, "
                                 "by result", ["result"], registry=registry)  # fmt: skip
        self.bytes = Counter("imageprov_edge_artifact_bytes", "Artifact bytes sent to devices, by where from",
                             ["source"], registry=registry)  # fmt: skip
        self.fetches = Counter("imageprov_edge_artifact_storage_fetches", "Requests made to storage",
                               registry=registry)  # fmt: skip
        self.active = Gauge("imageprov_edge_artifact_downloads_active", "Artifact downloads in progress",
                            registry=registry)  # fmt: skip


ARTIFACT_SETTINGS = web.AppKey("artifact_settings", ArtifactSettings)
ARTIFACT_METRICS = web.AppKey("artifact_metrics", ArtifactMetrics)
STORAGE = web.AppKey("storage", aiohttp.ClientSession)
ARTIFACT_CACHE = web.AppKey("artifact_cache", ArtifactCache)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _event(event: str, **fields: Any) -> None:
    line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
    log.info(event, extra={"fields": line})


def _device(request: web.Request) -> str:
    """The SHA-256 fingerprint of the certificate nginx verified (raises ``Refused``)."""
    cert = checks.parse_client_cert(request.headers.get(CERT_HEADER))
    return cert.fingerprint(hashes.SHA256()).hex()


def _storage_host(url: str) -> str:
    try:
        return urlsplit(url).netloc.rpartition("@")[2]  # never a user or password a link might hold
    except ValueError:
        return "?"


async def deployments_next(request: web.Request) -> web.Response:
    """The device's check for an update, asked of the Mender server; the artifact link pointed at the edge."""
    app = request.app
    settings, metrics = app[ARTIFACT_SETTINGS], app[ARTIFACT_METRICS]
    try:
        device = _device(request)
    except Refused as refused:
        return _error(refused.status, refused.message)
    body = await request.read()
    client = app[CLIENT]
    # Accept-Encoding dropped: the answer is read and rewritten here, so it must come plain.
    headers = forwardable(request.headers.items(), drop=[CERT_HEADER, "Accept-Encoding"])
    try:
        async with client.session.request(
            request.method, client.base_url + request.path_qs, data=body or None, headers=headers,
            timeout=client.timeout, allow_redirects=False, proxy=client.proxy.url if client.proxy else None,
        ) as answer:  # fmt: skip
            data = await answer.content.read(ANSWER_LIMIT)
            status, answer_headers = answer.status, forwardable(answer.headers.items())
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.warning(f"deployments/next: the Mender server did not answer: {type(exc).__name__}")
        retry = str(app[SETTINGS].retry_after)
        return web.json_response({"error": "the Mender server is unavailable; try again"}, status=503,
                                 headers={"Retry-After": retry})  # fmt: skip
    instructions = _instructions(data) if status == 200 else None
    if instructions is None:
        response = web.Response(status=status, body=data)
        for name, value in answer_headers:
            response.headers.add(name, value)
        return response
    source = instructions["artifact"]["source"]
    url = source["uri"]
    if not settings.allowed(url):
        metrics.links.labels(result="refused-host").inc()
        _event("artifact-refused", host=_storage_host(url), reason="storage host not in --artifact-host")
        return _error(502, "the artifact's storage host is not one this edge serves")
    now = time.time()
    expires = _expiry(source.get("expire"), now, settings.max_age)
    token = issue(settings.key, Capability(url=url, expires=expires, device=device))
    host = request.headers.get("X-Forwarded-Host") or request.host
    if not _HOST.fullmatch(host):
        host = request.host
    source["uri"] = f"https://{host}{ARTIFACTS}{token}"
    source["expire"] = dt.datetime.fromtimestamp(expires, dt.UTC).isoformat().replace("+00:00", "Z")
    metrics.links.labels(result="rewritten").inc()
    kept = [(n, v) for n, v in answer_headers if n.lower() not in ("content-type", "content-encoding", "etag")]
    response = web.json_response(instructions, status=200)
    for name, value in kept:
        response.headers.add(name, value)
    return response


def _instructions(data: bytes) -> dict[str, Any] | None:
    """Mender's DeploymentInstructions with a link to rewrite; None: anything else, passed on unchanged."""
    try:
        value = json.loads(data)
        uri = value["artifact"]["source"]["uri"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(uri, str) and isinstance(value["artifact"]["source"], dict) else None


async def download(request: web.Request) -> web.StreamResponse:
    """``GET /imageprov/artifacts/<token>``: the artifact, for the certificate the token was issued to."""
    app = request.app
    settings, metrics = app[ARTIFACT_SETTINGS], app[ARTIFACT_METRICS]
    try:
        device = _device(request)
        capability = redeem(settings.key, request.match_info["token"], device, time.time())
        if not settings.allowed(capability.url):  # the allowlist may have shrunk since the link was made
            raise ArtifactError("host-not-allowed")
    except Refused as refused:
        metrics.downloads.labels(result="refused").inc()
        return _error(refused.status, refused.message)
    except ArtifactError as refused:
        metrics.downloads.labels(result="refused").inc()
        _event("artifact-download-refused", reason=refused.message, device=device[:16])
        return _error(403, "the download link has expired or is not this device's")
    metrics.active.inc()
    try:
        cache = app.get(ARTIFACT_CACHE)
        if cache is not None:
            try:
                path = await cache.get(capability.url, lambda part, limit: _fill(app, capability.url, part, limit))
            except (TimeoutError, aiohttp.ClientError, ArtifactError) as exc:
                metrics.downloads.labels(result="storage-error").inc()
                log.warning(f"artifact from {_storage_host(capability.url)}: {type(exc).__name__} {exc}")
                return _error(502, "the artifact's storage did not answer; try again")
            if path is not None:
                metrics.downloads.labels(result="cache").inc()
                response = web.FileResponse(path, chunk_size=CHUNK)
                await response.prepare(request)
                # FileResponse sends the file itself (sendfile): its length is what went out.
                metrics.bytes.labels(source="cache").inc(response.content_length or 0)
                return response
        return await _stream(request, capability.url)
    finally:
        metrics.active.dec()


async def _stream(request: web.Request, url: str) -> web.StreamResponse:
    """Storage's answer passed to the device as it arrives, ``Range`` and all, never held whole."""
    app = request.app
    metrics = app[ARTIFACT_METRICS]
    headers = {name: request.headers[name] for name in ("Range", "If-Range") if name in request.headers}
    metrics.fetches.inc()
    started = False
    try:
        async with app[STORAGE].get(url, headers=headers, timeout=_timeout(app), proxy=_proxy(url)) as answer:
            if answer.status not in (200, 206, 416):
                metrics.downloads.labels(result="storage-error").inc()
                log.warning(f"artifact from {_storage_host(url)}: storage answered {answer.status}")
                return _error(502, f"the artifact's storage answered {answer.status}")
            response = web.StreamResponse(status=answer.status)
            for name in _PASSED:
                if name in answer.headers:
                    response.headers[name] = answer.headers[name]
            await response.prepare(request)
            started = True
            async for chunk in answer.content.iter_chunked(CHUNK):
                await response.write(chunk)
                metrics.bytes.labels(source="storage").inc(len(chunk))
            await response.write_eof()
    except (TimeoutError, aiohttp.ClientError) as exc:
        metrics.downloads.labels(result="storage-error").inc()
        log.warning(f"artifact from {_storage_host(url)}: {type(exc).__name__} {exc}")
        if started:
            raise  # part sent: the connection is cut, and the device resumes with Range
        return _error(502, "the artifact's storage did not answer; try again")
    metrics.downloads.labels(result="partial" if answer.status == 206 else "storage").inc()
    return response


async def _fill(app: web.Application, url: str, part: Path, limit: int) -> int:
    """Fetch the whole object at ``url`` into ``part``, at most ``limit`` bytes (else TooLarge)."""
    app[ARTIFACT_METRICS].fetches.inc()
    async with app[STORAGE].get(url, timeout=_timeout(app), proxy=_proxy(url)) as answer:
        if answer.status != 200:
            raise ArtifactError(f"storage answered {answer.status}")
        if (answer.content_length or 0) > limit:
            raise TooLarge("larger than the cache")
        size = 0
        with open(part, "wb") as handle:
            async for chunk in answer.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge("larger than the cache")
                await asyncio.to_thread(handle.write, chunk)
    if answer.content_length is not None and size != answer.content_length:
        raise ArtifactError(f"storage sent {size} of {answer.content_length} bytes")
    return size


def _timeout(app: web.Application) -> aiohttp.ClientTimeout:
    # No total: an artifact takes as long as it takes; a storage that stops sending is given up.
    seconds = app[SETTINGS].timeout
    return aiohttp.ClientTimeout(total=None, sock_connect=min(seconds, 5.0), sock_read=seconds * 3)


def _proxy(url: str) -> Any:
    proxy = proxy_for(url, os.environ)
    return proxy.url if proxy else None


async def _storage_session(app: web.Application) -> AsyncIterator[None]:
    # A session of its own: storage is verified with the system's CAs, not the Mender server's
    # --upstream-ca; auto_decompress off, so that the bytes go to the device as storage sent them.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200), auto_decompress=False) as session:
        app[STORAGE] = session
        yield


def install(app: web.Application, settings: ArtifactSettings) -> None:
    """Add the rewritten ``deployments/next`` and the download route to ``edge serve``'s application."""
    app[ARTIFACT_SETTINGS] = settings
    app[ARTIFACT_METRICS] = ArtifactMetrics(app[METRICS].registry)
    if settings.cache_dir is not None and settings.cache_size > 0:
        app[ARTIFACT_CACHE] = ArtifactCache(settings.cache_dir, settings.cache_size)
    app.cleanup_ctx.append(_storage_session)
    app.router.add_get(NEXT_V1, deployments_next)
    app.router.add_post(NEXT_V2, deployments_next)
    app.router.add_get(ARTIFACTS + "{token}", download)
