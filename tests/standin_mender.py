"""A stand-in for the Mender server, for the edge's tests, that holds every request to Mender's OpenAPI files.

It does what the edge needs of a Mender server, as Mender's deviceauth does it
(mender-server, backend/services/deviceauth: devauth.go and its store):

- login (HTTP Basic) and personal access tokens;
- preauthorization: a new identity is a new device with a preauthorized auth
  set (201, ``Location: devices/ID``); a known identity is 409 with the device
  (its auth sets are not in that answer), unless ``force``: then the auth set
  of that identity and key is made, or set back to preauthorized whatever it
  was (rejected and accepted included), and the answer is 201 with a
  ``Location`` naming an id made up for the request, which is no device;
- device auth requests, signatures verified: a preauthorized auth set becomes
  accepted (and the device's other accepted sets rejected) and gets a JWT; an
  accepted one gets a JWT; otherwise 401, an unknown identity becoming a new
  pending device and an unknown key a pending auth set;
- the device list and a device with its auth sets; an auth set's status set
  as Mender allows (accept from pending or rejected, rejecting the device's
  other accepted sets; reject from pending or accepted; back to pending from
  anything but preauthorized; else 400); an auth set dismissed (DELETE: the
  device goes too when that was its only set and it was preauthorized);
  decommissioning (DELETE the device: its auth sets and tokens go, at once
  here, where Mender's workflow takes a moment). A device's status is derived
  from its auth sets as Mender derives it.

A device's JWTs work on the device routes (deployments/next, inventory) while
the auth set they were issued for is accepted (deviceauth's VerifyToken): they
die when it is rejected, dismissed, forced back to preauthorized, or its device
decommissioned. Every request it receives and every answer it gives is checked
against the project's description of Mender's API (tests/mender_api.yaml):
the operation exists, required headers and security are present, the body
has the content type, fields, types and required members of its schema, and
the status code is one the description lists. Each deviation is recorded in
``deviations``; the tests' fixture fails the test on any.

It runs an aiohttp server on its own event loop in a thread, so that
synchronous tests and subprocesses can use it alike; over TLS when given a
server context (``tls``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import random
import secrets
import ssl
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.mender_spec import specs

# -- the server's state ---------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _jwt(subject: str) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    header, claims = part({"alg": "RS256", "typ": "JWT"}), part({"sub": subject, "jti": str(uuid.uuid4())})
    return f"{header}.{claims}.{secrets.token_urlsafe(16)}"


def _canonical(identity: Any) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def _same_key(a: str, b: str) -> bool:
    try:
        return serialization.load_pem_public_key(a.encode()) == serialization.load_pem_public_key(b.encode())
    except ValueError:
        return False


@dataclass
class AuthSet:
    id: str
    identity_data: dict[str, Any]
    pubkey: str
    status: str
    ts: str = field(default_factory=_now)

    def to_json(self, device_id: str) -> dict[str, Any]:
        return {"id": self.id, "device_id": device_id, "identity_data": self.identity_data, "pubkey": self.pubkey,
                "status": self.status, "ts": self.ts}  # fmt: skip


@dataclass
class Device:
    id: str
    identity_data: dict[str, Any]
    status: str
    auth_sets: list[AuthSet]
    created_ts: str = field(default_factory=_now)
    updated_ts: str = field(default_factory=_now)
    tokens_issued: int = 0

    def to_json(self, *, auth_sets: bool = True) -> dict[str, Any]:
        found = {"id": self.id, "identity_data": self.identity_data, "status": self.status,
                 "created_ts": self.created_ts, "updated_ts": self.updated_ts, "decommissioning": False}  # fmt: skip
        if auth_sets:  # the devices collection holds none: a 409 answers the device without them
            found["auth_sets"] = [a.to_json(self.id) for a in self.auth_sets]
        return found

    def derive_status(self) -> None:
        """The device's status from its auth sets' (deviceauth's getDeviceStatus)."""
        statuses = {a.status for a in self.auth_sets}
        for status in ("accepted", "preauthorized", "pending", "rejected"):
            if status in statuses:
                self.status = status
                return
        self.status = "noauth"


@dataclass
class Faults:
    """Fail this share of calls: half with 500, half answering only after ``delay`` seconds."""

    rate: float = 0.0
    delay: float = 3.0
    seed: int = 12
    injected: int = 0


class StandinMender:
    """The stand-in server. ``start()`` it, use ``url``, ``stop()`` it; check ``deviations`` is empty."""

    def __init__(
        self, *, users: dict[str, str] | None = None, faults: Faults | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.tls = tls
        self.users = dict(users or {"edge@example.com": "edge-password-1"})
        self.faults = faults or Faults()
        self._random = random.Random(self.faults.seed)
        self.lock = threading.Lock()
        self.deviations: list[str] = []
        self.management_tokens: set[str] = set()
        self.personal_tokens: set[str] = set()
        self.devices: dict[str, Device] = {}
        self.by_identity: dict[str, str] = {}
        self.calls: dict[str, int] = {"login": 0, "preauthorize": 0, "auth_requests": 0, "list": 0, "device_api": 0}
        self.device_tokens: dict[str, AuthSet] = {}  # a device JWT -> the auth set it was issued for
        self.preauthorized: list[dict[str, Any]] = []  # every preauthorization body received
        self.auth_headers: list[dict[str, str]] = []  # the headers (names in lowercase) of every auth request
        self.deployment: dict[str, Any] | None = None  # what deployments/next answers (deploy())
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- running --

    def start(self) -> StandinMender:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name="standin-mender")
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the stand-in Mender server did not start")
        return self

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._check_spec])
        app.router.add_post("/api/management/v1/useradm/auth/login", self.login)
        app.router.add_post("/api/management/v1/useradm/settings/tokens", self.create_token)
        app.router.add_post("/api/management/v2/devauth/devices", self.preauthorize)
        app.router.add_get("/api/management/v2/devauth/devices", self.list_devices)
        app.router.add_get("/api/management/v2/devauth/devices/{id}", self.get_device)
        app.router.add_delete("/api/management/v2/devauth/devices/{id}", self.decommission)
        app.router.add_delete("/api/management/v2/devauth/devices/{id}/auth/{aid}", self.dismiss)
        app.router.add_put("/api/management/v2/devauth/devices/{id}/auth/{aid}/status", self.set_status)
        app.router.add_post("/api/devices/v1/authentication/auth_requests", self.auth_request)
        app.router.add_get("/api/devices/v1/deployments/device/deployments/next", self.next_deployment)
        app.router.add_patch("/api/devices/v1/inventory/device/attributes", self.inventory)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=2048, ssl_context=self.tls)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(30)

    # -- what tests ask --

    def device(self, identity: dict[str, Any]) -> Device | None:
        with self.lock:
            found = self.by_identity.get(_canonical(identity))
            return self.devices.get(found) if found else None

    def statuses(self) -> dict[str, str]:
        with self.lock:
            return {_canonical(d.identity_data): d.status for d in self.devices.values()}

    def personal_token(self) -> str:
        """A personal access token, as a user would create one in the UI."""
        token = _jwt("pat")
        with self.lock:
            self.personal_tokens.add(token)
        return token

    def expire_logins(self) -> None:
        """Forget every login JWT: the next management call with one gets 401."""
        with self.lock:
            self.management_tokens.clear()

    # -- what an operator does in Mender's UI, through the management API (so checked against the spec) --

    def operate(self, method: str, path: str, payload: Any = None, *, context: ssl.SSLContext | None = None) -> int:
        """One management call with a personal access token; its status."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Authorization": f"Bearer {self.personal_token()}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def decommission_device(self, identity: dict[str, Any]) -> None:
        """Decommission the device of ``identity`` (DELETE /devices/{id}), as the UI's "Decommission" does."""
        device = self.device(identity)
        assert device is not None, f"no device {identity}"
        status = self.operate("DELETE", f"/api/management/v2/devauth/devices/{device.id}")
        assert status == 204, status

    def set_auth_status(self, identity: dict[str, Any], status: str, pubkey_pem: str | None = None) -> int:
        """Set the status of the device's auth set for ``pubkey_pem`` (else its only one), as the UI's
        "Reject"/"Accept" do; Mender's answer (204, or 400 for a change it does not allow)."""
        device = self.device(identity)
        assert device is not None, f"no device {identity}"
        with self.lock:
            sets = [a for a in device.auth_sets if pubkey_pem is None or _same_key(a.pubkey, pubkey_pem)]
        assert len(sets) == 1, f"{len(sets)} auth sets match"
        path = f"/api/management/v2/devauth/devices/{device.id}/auth/{sets[0].id}/status"
        return self.operate("PUT", path, {"status": status})

    # -- the spec check, around every request --

    @web.middleware
    async def _check_spec(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self._check_request(request, body)
        if request.method == "POST":  # the calls the edge makes; the tests' own GETs never fail
            fault = self._fault()
            if fault == "error":
                response: web.StreamResponse = web.json_response({"error": "injected fault"}, status=500)
                self._check_response(request, response)
                return response
            if fault == "slow":
                await asyncio.sleep(self.faults.delay)
        response = await handler(request)
        self._check_response(request, response)
        return response

    def _fault(self) -> str | None:
        if not self.faults.rate:
            return None
        with self.lock:
            roll = self._random.random()
            if roll >= self.faults.rate:
                return None
            self.faults.injected += 1
            return "error" if roll < self.faults.rate / 2 else "slow"

    def _deviation(self, request: web.Request, text: str) -> None:
        with self.lock:
            self.deviations.append(f"{request.method} {request.path}: {text}")

    def _check_request(self, request: web.Request, body: bytes) -> None:
        found = specs().operation(request.method, request.path)
        if found is None:
            self._deviation(request, "no such operation in the spec")
            return
        op, doc, where = found
        for requirement in op.get("security", []):
            for scheme_name in requirement:
                scheme = specs().security_scheme(doc, scheme_name, where)
                prefix = {"basic": "Basic ", "bearer": "Bearer "}[scheme["scheme"]]
                if not request.headers.get("Authorization", "").startswith(prefix):
                    self._deviation(request, f"no {prefix.strip()} Authorization ({scheme_name})")
        for parameter in op.get("parameters", []):
            parameter, pwhere = specs().resolve(parameter, where)
            if parameter["in"] == "header":
                if parameter.get("required") and parameter["name"] not in request.headers:
                    self._deviation(request, f"required header {parameter['name']} is missing")
            elif parameter["in"] == "query" and parameter.get("required") and parameter["name"] not in request.query:
                self._deviation(request, f"required query parameter {parameter['name']} is missing")
            elif parameter["in"] == "query" and parameter["name"] in request.query:
                raw = request.query[parameter["name"]]
                schema, _ = specs().resolve(parameter.get("schema", {}), pwhere)
                value: Any = raw
                if schema.get("type") == "integer":
                    value = int(raw) if raw.lstrip("-").isdigit() else raw
                elif schema.get("type") == "array":
                    value = request.query.getall(parameter["name"])
                for error in specs().validate(schema, value, pwhere, f"query {parameter['name']}"):
                    self._deviation(request, error)
        spec_body = op.get("requestBody")
        if spec_body is None:
            return
        spec_body, bwhere = specs().resolve(spec_body, where)
        if not body:
            if spec_body.get("required"):
                self._deviation(request, "the required body is missing")
            return
        media = request.content_type
        if media not in spec_body["content"]:
            self._deviation(request, f"body of type {media}, the spec has {list(spec_body['content'])}")
            return
        try:
            value = json.loads(body)
        except ValueError:
            self._deviation(request, "the body is not JSON")
            return
        for error in specs().validate(spec_body["content"][media]["schema"], value, bwhere):
            self._deviation(request, error)

    def _check_response(self, request: web.Request, response: web.StreamResponse) -> None:
        found = specs().operation(request.method, request.path)
        if found is None:
            return
        op, _, where = found
        responses = op.get("responses", {})
        spec_response = responses.get(str(response.status))
        if spec_response is None:
            # A management call with a bad token gets 401 from Mender's gateway, listed or not.
            if response.status == 401 and op.get("security"):
                return
            self._deviation(request, f"answered {response.status}; the spec lists {sorted(responses)}")
            return
        spec_response, rwhere = specs().resolve(spec_response, where)
        content = spec_response.get("content") or {}
        if not content or not isinstance(response, web.Response) or response.body is None:
            return
        media = response.content_type
        body = bytes(response.body)  # type: ignore[arg-type]
        if media == "application/jwt" and "application/json" in content:
            # Mender sends tokens as application/jwt text; the spec writes them as a JSON string.
            media, body = "application/json", json.dumps(body.decode()).encode()
        if media not in content:
            self._deviation(request, f"answered {media}; the spec has {list(content)}")
            return
        value = json.loads(body)
        for error in specs().validate(content[media]["schema"], value, rwhere, f"answer {response.status}"):
            self._deviation(request, error)

    # -- useradm --

    def _management_token(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        with self.lock:
            return header.startswith("Bearer ") and (token in self.management_tokens or token in self.personal_tokens)

    async def login(self, request: web.Request) -> web.Response:
        with self.lock:
            self.calls["login"] += 1
        header = request.headers.get("Authorization", "")
        try:
            user, _, password = base64.b64decode(header.removeprefix("Basic "), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        if not header.startswith("Basic ") or self.users.get(user) != password:
            return web.json_response({"error": "unauthorized"}, status=401)
        token = _jwt(user)
        with self.lock:
            self.management_tokens.add(token)
        return web.Response(text=token, content_type="application/jwt")

    async def create_token(self, request: web.Request) -> web.Response:
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response(self.personal_token())

    # -- deviceauth management --

    async def preauthorize(self, request: web.Request) -> web.Response:
        with self.lock:
            self.calls["preauthorize"] += 1
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            payload = await request.json()
            identity, pubkey = payload["identity_data"], payload["pubkey"]
            serialization.load_pem_public_key(pubkey.encode())
            assert isinstance(identity, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            return web.json_response({"error": "invalid preauthorization"}, status=400)
        with self.lock:
            self.preauthorized.append(payload)
            existing = self.by_identity.get(_canonical(identity))
            if existing is not None and not payload.get("force"):
                return web.json_response(self.devices[existing].to_json(auth_sets=False), status=409)
            if existing is not None:
                # force (deviceauth's UpsertAuthSetStatus): the identity and key's auth set, made or set back
                # to preauthorized whatever it was; the device's status is left as it was until its next request.
                device = self.devices[existing]
                auth = next((a for a in device.auth_sets if _same_key(a.pubkey, pubkey)), None)
                if auth is None:
                    device.auth_sets.append(AuthSet(str(uuid.uuid4()), identity, pubkey, "preauthorized"))
                else:
                    auth.status = "preauthorized"
                # Mender names the id it made up for this request, which is no device.
                return web.Response(status=201, headers={"Location": f"devices/{uuid.uuid4()}"})
            device = Device(str(uuid.uuid4()), identity, "preauthorized", [])
            device.auth_sets.append(AuthSet(str(uuid.uuid4()), identity, pubkey, "preauthorized"))
            self.devices[device.id] = device
            self.by_identity[_canonical(identity)] = device.id
        return web.Response(status=201, headers={"Location": f"devices/{device.id}"})

    async def list_devices(self, request: web.Request) -> web.Response:
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        status = request.query.get("status")
        page, per_page = int(request.query.get("page", 1)), int(request.query.get("per_page", 20))
        with self.lock:
            self.calls["list"] += 1
            found = [d.to_json() for d in self.devices.values() if status is None or d.status == status]
        return web.json_response(found[(page - 1) * per_page : page * per_page])

    async def get_device(self, request: web.Request) -> web.Response:
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        with self.lock:
            device = self.devices.get(request.match_info["id"])
            if device is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(device.to_json())

    async def set_status(self, request: web.Request) -> web.Response:
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        status = (await request.json()).get("status")
        with self.lock:
            device = self.devices.get(request.match_info["id"])
            auth = next((a for a in device.auth_sets if a.id == request.match_info["aid"]), None) if device else None
            if device is None or auth is None:
                return web.json_response({"error": "not found"}, status=404)
            # The changes deviceauth allows (AcceptDeviceAuth, RejectDeviceAuth, ResetDeviceAuth).
            allowed = {"accepted": {"pending", "rejected", "accepted"}, "rejected": {"pending", "accepted"},
                       "pending": {"pending", "accepted", "rejected"}}.get(status, set())  # fmt: skip
            if auth.status not in allowed:
                return web.json_response({"error": "dev auth: bad request"}, status=400)
            if status == "accepted":
                self._reject_others(device, auth)
            elif auth.status == "accepted":
                self._revoke_tokens(auth.id)  # a token dies with its accepted auth set
            auth.status = status
            device.derive_status()
            device.updated_ts = _now()
        return web.Response(status=204)

    async def dismiss(self, request: web.Request) -> web.Response:
        """Remove an auth set (deviceauth's DeleteAuthSet): its tokens die; a device whose only set was
        preauthorized goes with it."""
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        with self.lock:
            device = self.devices.get(request.match_info["id"])
            auth = next((a for a in device.auth_sets if a.id == request.match_info["aid"]), None) if device else None
            if device is None or auth is None:
                return web.json_response({"error": "not found"}, status=404)
            device.auth_sets.remove(auth)
            self._revoke_tokens(auth.id)
            if auth.status == "preauthorized" and not device.auth_sets:
                del self.devices[device.id]
                self.by_identity.pop(_canonical(device.identity_data), None)
            else:
                device.derive_status()
        return web.Response(status=204)

    async def decommission(self, request: web.Request) -> web.Response:
        if not self._management_token(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        with self.lock:
            device = self.devices.pop(request.match_info["id"], None)
            if device is None:
                return web.json_response({"error": "not found"}, status=404)
            self.by_identity.pop(_canonical(device.identity_data), None)
            for auth in device.auth_sets:
                self._revoke_tokens(auth.id)
        return web.Response(status=204)

    def _reject_others(self, device: Device, accepted: AuthSet) -> None:
        # One accepted auth set per device: accepting one rejects the others (RejectAuthSetsForDevice).
        for other in device.auth_sets:
            if other is not accepted and other.status == "accepted":
                other.status = "rejected"
                self._revoke_tokens(other.id)

    def _revoke_tokens(self, auth_set_id: str) -> None:
        for token in [t for t, owner in self.device_tokens.items() if owner.id == auth_set_id]:
            del self.device_tokens[token]

    # -- the device API --

    async def auth_request(self, request: web.Request) -> web.Response:
        with self.lock:
            self.calls["auth_requests"] += 1
            self.auth_headers.append({name.lower(): value for name, value in request.headers.items()})
        body = await request.read()
        try:
            payload = json.loads(body)
            identity = json.loads(payload["id_data"])
            pubkey_pem = payload["pubkey"]
            key = serialization.load_pem_public_key(pubkey_pem.encode())
            signature = base64.b64decode(request.headers["X-MEN-Signature"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return web.json_response({"error": "malformed auth request"}, status=400)
        if not _signature_ok(key, body, signature):
            return web.json_response({"error": "signature verification failed"}, status=401)
        with self.lock:
            device_id = self.by_identity.get(_canonical(identity))
            if device_id is None:
                device = Device(str(uuid.uuid4()), identity, "pending", [])
                self.devices[device.id] = device
                self.by_identity[_canonical(identity)] = device.id
            else:
                device = self.devices[device_id]
            auth = next((a for a in device.auth_sets if _same_key(a.pubkey, pubkey_pem)), None)
            if auth is None:
                auth = AuthSet(str(uuid.uuid4()), identity, pubkey_pem, "pending")
                device.auth_sets.append(auth)
            if auth.status == "preauthorized":
                self._reject_others(device, auth)
                auth.status = "accepted"
                device.updated_ts = _now()
            device.derive_status()
            if auth.status != "accepted":
                return web.json_response({"error": "unauthorized"}, status=401)
            device.tokens_issued += 1
            token = _jwt(device.id)
            self.device_tokens[token] = auth
        return web.Response(text=token, content_type="application/jwt")

    def _device_of(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        with self.lock:
            self.calls["device_api"] += 1
            token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
            return self.device_tokens[token].id if self._token_valid(token) else None

    def _token_valid(self, token: str) -> bool:
        # deviceauth's VerifyToken: a token works while the auth set it was issued for is accepted.
        owner = self.device_tokens.get(token)
        return owner is not None and owner.status == "accepted"

    def deploy(self, uri: str, expire: str, name: str = "release-2") -> None:
        """Offer every device a deployment whose artifact is at ``uri`` (a storage link, valid until ``expire``),
        as deployments/next answers it (DeploymentInstructions)."""
        with self.lock:
            self.deployment = {"id": str(uuid.uuid4()), "artifact": {
                "artifact_name": name, "device_types_compatible": ["raspberrypi4"],
                "source": {"uri": uri, "expire": expire}}}  # fmt: skip

    async def next_deployment(self, request: web.Request) -> web.Response:
        if self._device_of(request) is None:
            return web.json_response({"error": "unauthorized"}, status=401)
        with self.lock:
            deployment = self.deployment
        if deployment is None:
            return web.Response(status=204)
        return web.json_response(deployment)

    async def inventory(self, request: web.Request) -> web.Response:
        if self._device_of(request) is None:
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.Response(status=200)

    def token_works(self, token: str) -> bool:
        """Whether a device JWT still opens the device routes."""
        with self.lock:
            return self._token_valid(token)


class StandinStorage:
    """Object storage (S3, MinIO) as a deployment's artifact link reaches it: ``GET /BUCKET/NAME?presigned``,
    ``Range`` honoured (206 with Content-Range); every GET counted per object, in ``fetches``.

    ``pace``: seconds between two chunks of an answer, so that concurrent downloads overlap."""

    def __init__(self, objects: dict[str, bytes], *, pace: float = 0.0) -> None:
        self.objects = dict(objects)
        self.pace = pace
        self.fetches: dict[str, int] = {}
        self.lock = threading.Lock()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> StandinStorage:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name="standin-storage")
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the stand-in storage did not start")
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name:.+}", self.get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(30)

    async def get(self, request: web.Request) -> web.StreamResponse:
        name = "/" + request.match_info["name"]
        with self.lock:
            self.fetches[name] = self.fetches.get(name, 0) + 1
        data = self.objects.get(name)
        if data is None or "X-Amz-Signature" not in request.query:
            return web.Response(status=403 if data is not None else 404, text="AccessDenied")
        start, end, status = 0, len(data) - 1, 200
        given = request.headers.get("Range", "")
        if given.startswith("bytes="):
            first, _, last = given.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last), len(data) - 1) if last else len(data) - 1
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
        response = web.StreamResponse(status=status)
        response.headers.update({"Content-Type": "application/vnd.mender-artifact", "Accept-Ranges": "bytes",
                                 "ETag": f'"{hashlib.md5(data).hexdigest()}"'})  # fmt: skip
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        response.content_length = end - start + 1
        await response.prepare(request)
        for at in range(start, end + 1, 64 * 1024):
            await response.write(data[at : min(at + 64 * 1024, end + 1)])
            if self.pace:
                await asyncio.sleep(self.pace)
        await response.write_eof()
        return response


def _signature_ok(key: Any, body: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            from cryptography.hazmat.primitives.asymmetric import padding

            key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, body, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, body)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def fingerprint(pem: str) -> str:
    key = serialization.load_pem_public_key(pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def main() -> None:
    """Serve until SIGTERM: print the URL, then at the end a JSON summary (calls, deviations, devices)."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faults", type=float, default=0.0, help="share of calls to fail (500 or slow)")
    parser.add_argument("--fault-delay", type=float, default=3.0)
    args = parser.parse_args()
    server = StandinMender(faults=Faults(rate=args.faults, delay=args.fault_delay)).start()
    print(server.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    server.stop()
    with server.lock:
        summary = {
            "calls": server.calls,
            "deviations": server.deviations,
            "faults_injected": server.faults.injected,
            "preauthorized": len(server.preauthorized),
            "devices": [{"identity": d.identity_data, "status": d.status, "auth_sets": len(d.auth_sets),
                         "tokens": d.tokens_issued, "pubkey": d.auth_sets[0].pubkey if d.auth_sets else None}
                        for d in server.devices.values()],
        }  # fmt: skip
    sys.stdout.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
