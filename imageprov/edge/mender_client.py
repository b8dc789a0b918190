"""The only code that talks to the Mender server: login, preauthorize, and the forwarded auth request.

Every call has an explicit timeout; a server that is down, slow or failing
(5xx) is ``UpstreamUnavailable``, which the service answers with 503 and
Retry-After so that the device tries again. Endpoints, from Mender's API:

- ``POST /api/management/v1/useradm/auth/login``, HTTP Basic: the JWT as text
  (``application/jwt``), kept and renewed when the server answers 401;
- ``POST /api/management/v2/devauth/devices`` with ``identity_data`` and
  ``pubkey`` (and ``force`` for a reissued device's new key): 201
  (preauthorized; ``Location`` names the device) or 409 (the device exists;
  the body is the device), both fine;
- ``GET /api/management/v2/devauth/devices/{id}``: the device with its auth
  sets, to see what Mender holds of a device it refused (``MenderDevice``);
- ``PUT .../devices/{id}/auth/{aid}/status`` with ``{"status": "rejected"}``,
  or ``DELETE .../devices/{id}/auth/{aid}`` for a set still preauthorized
  (Mender rejects only pending and accepted ones): a revoked certificate's
  auth set is cut, and Mender stops honouring the device's token wherever it
  is used;
- ``POST /api/devices/v1/authentication/auth_requests``: the device's request,
  passed on byte for byte.

Every call goes through the forward proxy that ``HTTPS_PROXY`` (``HTTP_PROXY``
for an ``http://`` server) names, unless ``NO_PROXY`` lists the server
(``proxy_for``), as Mender Gateway and curl read them.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json as json_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from yarl import URL

from imageprov.edge.config import Login, Token
from imageprov.errors import ImageprovError, UsageError

LOGIN = "/api/management/v1/useradm/auth/login"
PREAUTHORIZE = "/api/management/v2/devauth/devices"
DEVICE = "/api/management/v2/devauth/devices/{id}"
AUTH_SET = "/api/management/v2/devauth/devices/{id}/auth/{aid}"
AUTH_SET_STATUS = "/api/management/v2/devauth/devices/{id}/auth/{aid}/status"
AUTH_REQUESTS = "/api/devices/v1/authentication/auth_requests"

# RFC 9110 7.6.1: connection-specific headers are not forwarded; the length
# and host are set anew for the next hop.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip


class UpstreamUnavailable(ImageprovError):
    """The Mender server did not answer in time, or answered with a server error."""


class UpstreamRefused(ImageprovError):
    """The Mender server refused the edge itself (login, token, permission, or a request it calls invalid)."""


@dataclass(frozen=True)
class Preauthorized:
    """Mender's answer to a preauthorization: 201 or 409, and the device's id when Mender named it."""

    status: int
    device_id: str | None


@dataclass(frozen=True)
class AuthSet:
    """One key Mender holds for a device, and what Mender decided of it."""

    id: str
    status: str  # pending, preauthorized, accepted or rejected
    pubkey: str  # PEM, as Mender normalized it

    def holds(self, key: Any) -> bool:
        return _same_key(self.pubkey, key)


@dataclass(frozen=True)
class MenderDevice:
    """A device as Mender's management API shows it: its status and every auth set."""

    id: str
    status: str
    # Deleted soon: Mender refuses its auth requests until its decommissioning workflow has run.
    decommissioning: bool
    auth_sets: tuple[AuthSet, ...]


@dataclass(frozen=True)
class Proxy:
    """The forward proxy every upstream call goes through; its credentials (in ``url``) are never shown."""

    shown: str  # without credentials
    url: URL = field(repr=False)  # aiohttp sends its user and password as Proxy-Authorization

    def __str__(self) -> str:
        return self.shown


def proxy_for(upstream: str, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy ``environ`` names for ``upstream`` (None: connect directly), as Go reads them (Mender Gateway).

    ``https_proxy``/``HTTPS_PROXY`` for an https server, ``http_proxy``/``HTTP_PROXY``
    for an http one (the lowercase name first); none for a server on loopback
    (``localhost``, 127.0.0.0/8, ::1: Go never proxies those) or one that
    ``no_proxy``/``NO_PROXY`` lists (``bypassed``). Raises ``UsageError`` for a
    proxy that is not ``http://`` or ``https://``."""
    target = URL(upstream)
    host = (target.host or "").lower()

    def named(name: str) -> str:
        return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()

    given = named(f"{target.scheme}_proxy")
    if not given or _loopback(host) or bypassed(host, target.port, named("no_proxy")):
        return None
    # A bare host:port is an http proxy, as curl takes it.
    proxy = URL(given if "://" in given else f"http://{given}")
    shown = str(proxy.with_user(None))
    if proxy.scheme not in ("http", "https") or not proxy.host:
        raise UsageError(
            f"{target.scheme.upper()}_PROXY={shown} is not an http:// or https:// proxy",
            hint="the edge speaks to HTTP proxies (CONNECT for an https server); unset it or name one",
        )
    return Proxy(shown, proxy)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``no_proxy`` lists ``host`` as Go's net/http reads it (Mender Gateway is Go), and curl mostly:
    entries split by commas, ``*`` for every host, a domain for itself and its subdomains (``.domain`` for
    its subdomains only), an address or a CIDR block for the addresses in it, ``:PORT`` for that port only."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name, only_port = entry, None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):
            name, _, port_text = entry.rpartition(":")
            only_port = int(port_text) if port_text.isdigit() else -1
        name = name.strip("[]").rstrip(".")
        subdomains_only = name.startswith(".")
        name = name.lstrip(".")
        if not name or (only_port is not None and only_port != port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                continue
        elif (host == name and not subdomains_only) or host.endswith("." + name):
            return True
    return False


@dataclass(frozen=True)
class Answer:
    """The upstream's answer to a forwarded request, to be returned as it is."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def forwardable(headers: Iterable[tuple[str, str]], drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    dropped = HOP_BY_HOP | {name.lower() for name in drop}
    return [(name, value) for name, value in headers if name.lower() not in dropped]


class MenderClient:
    """Calls to one Mender server through the application's ``ClientSession``."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, credentials: Login | Token, timeout: float,
        proxy: Proxy | None = None,
    ) -> None:  # fmt: skip
        self.session = session
        self.base_url = base_url
        self.credentials = credentials
        # Given on every call, rather than the session's trust_env: that would also
        # read ~/.netrc into every call without credentials (a device's auth
        # request included, and the management calls, whose Bearer header aiohttp
        # then refuses to combine with it), and ask the environment on a thread
        # for each call. The process's environment does not change: read once.
        self.proxy = proxy
        # Timeouts on what the server does (connecting, then each read), not on the
        # wait for a pooled connection: in a burst, requests queue here, and the
        # caller bounds the whole exchange with a deadline of its own.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 5.0), sock_read=timeout)
        self._jwt: str | None = credentials.token.reveal() if isinstance(credentials, Token) else None
        self._login_lock = asyncio.Lock()

    async def _call(
        self, path: str, *, body: bytes | None = None, json: Any = None,
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None, method: str = "POST",
    ) -> Answer:  # fmt: skip
        url = self.base_url + path
        try:
            async with self.session.request(
                method, url, data=body, json=json, headers=headers, timeout=self.timeout,
                allow_redirects=False, proxy=self.proxy.url if self.proxy else None,
            ) as response:  # fmt: skip
                data = await response.read()
                return Answer(response.status, tuple(response.headers.items()), data)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"{path}: {type(exc).__name__} {exc}".strip()) from exc

    async def _token(self, stale: str | None = None) -> str:
        """The JWT to send; a fresh login if there is none, or if ``stale`` was refused."""
        if isinstance(self.credentials, Token):
            if stale is not None:
                raise UpstreamRefused("the personal access token was refused (401)", hint="issue a new one")
            assert self._jwt is not None
            return self._jwt
        async with self._login_lock:
            # Another request may have logged in while this one waited.
            if self._jwt is not None and self._jwt != stale:
                return self._jwt
            self._jwt = await self._login(self.credentials)
            return self._jwt

    async def _login(self, login: Login) -> str:
        answer = await self._call(LOGIN, headers={"Authorization": _basic(login.username, login.password.reveal())})
        if answer.status >= 500:
            raise UpstreamUnavailable(f"login: the Mender server answered {answer.status}")
        if answer.status != 200:
            raise UpstreamRefused(
                f"login as {login.username} refused ({answer.status})", hint="check the user name and password"
            )
        token = answer.body.decode("utf-8", "replace").strip().strip('"')
        if not token:
            raise UpstreamUnavailable("login: the Mender server answered an empty token")
        return token

    async def _management(self, method: str, path: str, json: Any = None) -> Answer:
        """A management call with the service user's token, logged in again once if it has expired."""
        token = await self._token()
        answer = await self._call(path, json=json, headers={"Authorization": f"Bearer {token}"}, method=method)
        if answer.status == 401:
            token = await self._token(stale=token)
            answer = await self._call(path, json=json, headers={"Authorization": f"Bearer {token}"}, method=method)
        if answer.status >= 500:
            raise UpstreamUnavailable(f"{method} {path}: the Mender server answered {answer.status}")
        return answer

    async def preauthorize(self, identity: dict[str, Any], pubkey_pem: str, *, force: bool = False) -> Preauthorized:
        """Preauthorize (identity, key); 201 or 409 (already known), else raise.

        ``force``: the device may exist with other keys (a reissued certificate); add this one anyway."""
        payload: dict[str, Any] = {"identity_data": identity, "pubkey": pubkey_pem}
        if force:
            payload["force"] = True
        answer = await self._management("POST", PREAUTHORIZE, payload)
        if answer.status == 201:
            if force:
                # Mender's Location after a forced preauthorization names an id it made
                # up for the request, not the device that took the key: no id is known.
                return Preauthorized(201, None)
            location = dict((k.lower(), v) for k, v in answer.headers).get("location", "")
            return Preauthorized(201, location.rstrip("/").rpartition("/")[2] or None)
        if answer.status == 409:
            return Preauthorized(409, _device_id(answer.body))
        raise UpstreamRefused(
            f"preauthorize: the Mender server answered {answer.status}: {answer.body[:200]!r}",
            hint="the service user needs permission to preauthorize devices",
        )

    async def device(self, device_id: str) -> MenderDevice | None:
        """The device ``device_id`` with its auth sets; None when Mender no longer knows it."""
        answer = await self._management("GET", DEVICE.format(id=device_id))
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise UpstreamRefused(f"device {device_id}: the Mender server answered {answer.status}",
                                  hint="the service user needs permission to read devices")  # fmt: skip
        return _mender_device(device_id, answer.body)

    async def reject(self, device_id: str, pubkey: Any) -> int:
        """Cut every auth set of the device whose key is ``pubkey``; how many were cut.

        An accepted or pending set is rejected; a preauthorized one is removed, since
        Mender rejects only the others and would accept it at the device's next request.
        A device that Mender no longer knows (decommissioned) has nothing left to cut."""
        device = await self.device(device_id)
        if device is None:
            return 0
        cut = 0
        for auth_set in device.auth_sets:
            if auth_set.status == "rejected" or not auth_set.holds(pubkey):
                continue
            if auth_set.status == "preauthorized":
                path, method, body = AUTH_SET.format(id=device_id, aid=auth_set.id), "DELETE", None
            else:
                path, method = AUTH_SET_STATUS.format(id=device_id, aid=auth_set.id), "PUT"
                body = {"status": "rejected"}
            status = (await self._management(method, path, body)).status
            if status == 400 and await self._cut_elsewhere(device_id, auth_set.id):
                continue  # another edge (or its own loop) was quicker: Mender refuses to reject twice
            if status not in (204, 404):
                raise UpstreamRefused(f"rejecting device {device_id}: the Mender server answered {status}",
                                      hint="the service user needs permission to reject devices")  # fmt: skip
            cut += status == 204
        return cut

    async def _cut_elsewhere(self, device_id: str, auth_set_id: str) -> bool:
        device = await self.device(device_id)
        found = [a for a in device.auth_sets if a.id == auth_set_id] if device is not None else []
        return all(a.status == "rejected" for a in found)

    async def reachable(self) -> None:
        """Raise unless the server answers the service user: one device listed, as the readiness probe."""
        answer = await self._management("GET", PREAUTHORIZE + "?per_page=1")
        if answer.status != 200:
            raise UpstreamRefused(f"listing devices: the Mender server answered {answer.status}",
                                  hint="the service user needs permission to list devices")  # fmt: skip

    async def forward_auth_request(self, body: bytes, headers: Iterable[tuple[str, str]]) -> Answer:
        """Pass the device's auth request on unchanged, and return the server's answer."""
        answer = await self._call(AUTH_REQUESTS, body=body, headers=list(headers))
        return Answer(answer.status, tuple(forwardable(answer.headers)), answer.body)


def _device_id(body: bytes) -> str | None:
    try:
        value = json_module.loads(body)
    except ValueError:
        return None
    found = value.get("id") if isinstance(value, dict) else None
    return found if isinstance(found, str) else None


def _mender_device(device_id: str, body: bytes) -> MenderDevice:
    """Mender's device object, read strictly: an auth set left unread could be the one that says "rejected"."""
    try:
        value = json_module.loads(body)
    except ValueError:
        value = None
    sets = value.get("auth_sets", []) if isinstance(value, dict) else None
    fields = ("id", "status", "pubkey")
    if not isinstance(sets, list) or not all(
        isinstance(a, dict) and all(isinstance(a.get(name), str) for name in fields) for a in sets
    ):
        raise UpstreamUnavailable(f"device {device_id}: the Mender server answered a device that does not parse")
    assert isinstance(value, dict)
    auth_sets = tuple(AuthSet(a["id"], a["status"], a["pubkey"]) for a in sets)
    return MenderDevice(device_id, str(value.get("status", "")), value.get("decommissioning") is True, auth_sets)


def _same_key(pem: object, key: Any) -> bool:
    if not isinstance(pem, str):
        return False
    try:
        return bool(serialization.load_pem_public_key(pem.encode()) == key)
    except (ValueError, UnsupportedAlgorithm):
        return False


def _basic(username: str, password: str) -> str:
    """HTTP Basic credentials (RFC 7617), UTF-8 as browsers and curl send them (aiohttp's BasicAuth is
    deprecated, and took Latin-1 only)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
