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
- ``GET /api/management/v2/devauth/devices/{id}`` and
  ``PUT .../devices/{id}/auth/{aid}/status`` with ``{"status": "rejected"}``:
  a revoked certificate's auth set is rejected, and Mender stops honouring
  the device's token wherever it is used;
- ``POST /api/devices/v1/authentication/auth_requests``: the device's request,
  passed on byte for byte.
"""

from __future__ import annotations

import asyncio
import json as json_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from imageprov.edge.config import Login, Token
from imageprov.errors import ImageprovError

LOGIN = "/api/management/v1/useradm/auth/login"
PREAUTHORIZE = "/api/management/v2/devauth/devices"
DEVICE = "/api/management/v2/devauth/devices/{id}"
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

    def __init__(self, session: aiohttp.ClientSession, base_url: str, credentials: Login | Token, timeout: float):
        self.session = session
        self.base_url = base_url
        self.credentials = credentials
        # Timeouts on what the server does (connecting, then each read), not on the
        # wait for a pooled connection: in a burst, requests queue here, and the
        # caller bounds the whole exchange with a deadline of its own.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 5.0), sock_read=timeout)
        self._jwt: str | None = credentials.token.reveal() if isinstance(credentials, Token) else None
        self._login_lock = asyncio.Lock()

    async def _call(
        self, path: str, *, body: bytes | None = None, json: Any = None,
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None, auth: aiohttp.BasicAuth | None = None,
        method: str = "POST",
    ) -> Answer:  # fmt: skip
        url = self.base_url + path
        try:
            async with self.session.request(
                method, url, data=body, json=json, headers=headers, auth=auth, timeout=self.timeout,
                allow_redirects=False,
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
        answer = await self._call(LOGIN, auth=aiohttp.BasicAuth(login.username, login.password.reveal()))
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
            location = dict((k.lower(), v) for k, v in answer.headers).get("location", "")
            return Preauthorized(201, location.rstrip("/").rpartition("/")[2] or None)
        if answer.status == 409:
            return Preauthorized(409, _device_id(answer.body))
        raise UpstreamRefused(
            f"preauthorize: the Mender server answered {answer.status}: {answer.body[:200]!r}",
            hint="the service user needs permission to preauthorize devices",
        )

    async def reject(self, device_id: str, pubkey: Any) -> int:
        """Reject every auth set of the device whose key is ``pubkey``; how many were rejected.

        A device that Mender no longer knows (decommissioned) has nothing left to reject."""
        answer = await self._management("GET", DEVICE.format(id=device_id))
        if answer.status == 404:
            return 0
        if answer.status != 200:
            raise UpstreamRefused(f"device {device_id}: the Mender server answered {answer.status}",
                                  hint="the service user needs permission to read and reject devices")  # fmt: skip
        rejected = 0
        for auth_set in _auth_sets(answer.body):
            if auth_set.get("status") == "rejected" or not _same_key(auth_set.get("pubkey"), pubkey):
                continue
            path = AUTH_SET_STATUS.format(id=device_id, aid=auth_set["id"])
            status = (await self._management("PUT", path, {"status": "rejected"})).status
            if status not in (204, 404):
                raise UpstreamRefused(f"rejecting device {device_id}: the Mender server answered {status}",
                                      hint="the service user needs permission to reject devices")  # fmt: skip
            rejected += status == 204
        return rejected

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


def _auth_sets(body: bytes) -> list[dict[str, Any]]:
    try:
        value = json_module.loads(body)
    except ValueError:
        return []
    sets = value.get("auth_sets") if isinstance(value, dict) else None
    return [a for a in sets if isinstance(a, dict) and isinstance(a.get("id"), str)] if isinstance(sets, list) else []


def _same_key(pem: object, key: Any) -> bool:
    if not isinstance(pem, str):
        return False
    try:
        return bool(serialization.load_pem_public_key(pem.encode()) == key)
    except (ValueError, UnsupportedAlgorithm):
        return False
