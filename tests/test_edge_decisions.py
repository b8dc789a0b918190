"""The service's decision path in this process (aiohttp's test server, the stand-in Mender server in a thread, a
real PKI and registry made by the CLI), so that mutation testing (``scripts/mutants edge-http``) sees every
decision of edge/http.py: what is accepted, refused, cut off or answered 503, and what reaches Mender.

The same decisions through a real ``edge serve`` process and nginx: test_edge_binding.py, test_edge_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from imageprov.edge import http as edge_http
from imageprov.edge.config import Flags, ServeSettings
from imageprov.edge.http import cut_off_revoked, make_app
from tests.conftest import imageprov_pki
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    Device,
    escaped,
    make_device,
    post,
    public_pem,
    running_standin,
    signed_request,
)

CHECK = "/_imageprov/check"
Steps = Callable[[TestClient[Any, Any]], Awaitable[Any]]


@pytest.fixture(scope="module")
def standin() -> Iterator[Any]:
    with running_standin() as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PKI for the module: each test has devices of its own in it."""
    path = tmp_path_factory.mktemp("decisions") / "pki"
    imageprov_pki("ca", "init", path, "--cn", "Decisions CA", "--org", "imageprov tests")
    return path


def settings(tmp_path: Path, pki: Path | None, standin: Any, **flags: Any) -> ServeSettings:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    ca = {"pki": pki} if pki is not None else {}
    given = Flags(**ca, upstream=standin.url, username=USER, password_file=password, timeout=15, **flags)
    return ServeSettings.from_sources(given, {})


def serve(config: ServeSettings, steps: Steps) -> Any:
    """Run ``steps`` against the service's application, started and stopped as ``edge serve`` does."""

    async def run() -> Any:
        async with TestClient(TestServer(make_app(config))) as client:
            return await steps(client)

    return asyncio.run(run())


async def auth(client: TestClient[Any, Any], device: Device, identity: dict[str, Any], **change: Any) -> int:
    signed = signed_request(change.get("signer", device.key), identity)
    headers = {**signed.headers, "X-SSL-Client-Cert": escaped(device.cert)}
    async with client.post(AUTH_PATH, data=change.get("body", signed.body), headers=headers) as answer:
        await answer.read()
        return answer.status


async def route(client: TestClient[Any, Any], device: Device | None) -> int:
    headers = {"X-SSL-Client-Cert": escaped(device.cert)} if device is not None else {}
    async with client.get(CHECK, headers=headers) as answer:
        return answer.status


def preauthorizations(standin: Any, identity: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in standin.preauthorized if p["identity_data"] == identity]


def test_a_good_device_is_preauthorized_once_then_remembered(tmp_path: Path, pki: Path, standin: Any) -> None:
    device = make_device(pki, "OK-1")
    identity = {"device_id": "OK-1"}

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        return [await auth(client, device, identity), await auth(client, device, identity), await route(client, device)]

    assert serve(settings(tmp_path, pki, standin), steps) == [200, 200, 204]
    assert len(preauthorizations(standin, identity)) == 1 and standin.device(identity).status == "accepted"


def test_pin_binds_both_ways_and_a_refusal_is_never_preauthorized(tmp_path: Path, pki: Path, standin: Any) -> None:
    a, b = make_device(pki, "PIN-A"), make_device(pki, "PIN-B")
    ids = {name: {"device_id": name} for name in ("PIN-A", "PIN-B", "PIN-X")}

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        return [
            await auth(client, b, ids["PIN-B"]),
            await auth(client, a, ids["PIN-B"]),  # B's identity from A's certificate
            await auth(client, a, ids["PIN-A"]),  # A's own: pins it
            await auth(client, a, ids["PIN-X"]),  # a second identity for A's certificate
            await auth(client, b, ids["PIN-B"]),
        ]

    assert serve(settings(tmp_path, pki, standin), steps) == [200, 401, 200, 401, 200]
    assert len(preauthorizations(standin, ids["PIN-B"])) == 1 and not preauthorizations(standin, ids["PIN-X"])


def test_a_reissued_device_takes_its_identity_over_with_force(tmp_path: Path, pki: Path, standin: Any) -> None:
    old = make_device(pki, "RE-1")
    identity = {"device_id": "RE-1"}
    config = settings(tmp_path, pki, standin)
    assert serve(config, lambda client: auth(client, old, identity)) == 200
    new = make_device(pki, "RE-1", "--reissue")

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        return [await auth(client, new, identity), await auth(client, old, identity)]

    assert serve(config, steps) == [200, 401]  # the old certificate was superseded: revoked
    assert [bool(p.get("force")) for p in preauthorizations(standin, identity)] == [False, True]


@pytest.mark.parametrize("policy", ["attribute:device_id", "none"])
def test_attribute_and_none(tmp_path: Path, pki: Path, standin: Any, policy: str) -> None:
    device = make_device(pki, f"AT-{policy[:4]}")

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        return [
            await auth(client, device, {"device_id": "someone-else"}),
            await auth(client, device, {"device_id": device.name}),
        ]

    expected = [401, 200] if policy.startswith("attribute") else [200, 200]
    assert serve(settings(tmp_path, pki, standin, identity=policy), steps) == expected


@pytest.mark.parametrize("status", ["pending", "revoked", "unknown"])
def test_only_a_delivered_certificate_passes(tmp_path: Path, pki: Path, standin: Any, status: str) -> None:
    device = make_device(pki, f"ST-{status}")
    identity = {"device_id": device.name}
    with closing(sqlite3.connect(pki / "registry.sqlite")) as db, db:
        if status == "unknown":
            db.execute("DELETE FROM certificates WHERE serial = ?", (device.serial,))
        else:
            db.execute("UPDATE certificates SET status = ? WHERE serial = ?", (status, device.serial))

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        return [await auth(client, device, identity), await route(client, device)]

    assert serve(settings(tmp_path, pki, standin), steps) == [401, 403]
    assert not preauthorizations(standin, identity)


def test_a_forged_signature_or_a_missing_certificate_is_refused(tmp_path: Path, pki: Path, standin: Any) -> None:
    device, other = make_device(pki, "SIG-1"), make_device(pki, "SIG-2")
    identity = {"device_id": "SIG-1"}

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        async with client.post(AUTH_PATH, data=b"{}") as answer:
            bare = answer.status
        return [await auth(client, device, identity, signer=other.key), bare, await route(client, None),
                await auth(client, device, identity, body=b'{"id_data": 1}')]  # fmt: skip

    assert serve(settings(tmp_path, pki, standin), steps) == [401, 400, 401, 400]
    assert not preauthorizations(standin, identity)


def test_a_revocation_cuts_routes_off_and_rejects_in_mender(
    tmp_path: Path, pki: Path, standin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rounds are the test's: the service's own loop, once a second, would race them for each cut.
    monkeypatch.setattr(edge_http, "CUT_INTERVAL", 3600.0)
    device, other = make_device(pki, "CUT-A"), make_device(pki, "CUT-B")
    denylist = tmp_path / "denylist"
    denylist.write_text("")

    async def steps(client: TestClient[Any, Any]) -> list[Any]:
        seen = [await auth(client, device, {"device_id": "CUT-A"}), await auth(client, other, {"device_id": "CUT-B"})]
        seen.append(await cut_off_revoked(client.server.app))  # nothing revoked: nothing cut
        imageprov_pki("revoke", "--pki", pki, "CUT-A")
        denylist.write_text(f"{other.serial}\n")
        seen += [await route(client, device), await route(client, other), await cut_off_revoked(client.server.app)]
        seen.append(await cut_off_revoked(client.server.app))  # done once: never again
        return seen

    config = settings(tmp_path, pki, standin, denylist=denylist, recheck=0)
    assert serve(config, steps) == [200, 200, 0, 403, 403, 2, 0]
    assert standin.device({"device_id": "CUT-A"}).status == "rejected"
    assert standin.device({"device_id": "CUT-B"}).status == "rejected"


def test_the_cut_off_removes_a_preauthorized_key_and_tolerates_another_edge_cutting_too(
    tmp_path: Path, pki: Path, standin: Any
) -> None:
    """Mender rejects only pending and accepted auth sets (400 otherwise): a revoked device's set that is still
    preauthorized is dismissed, or Mender would accept it at the device's next request that bypasses the edge.
    Two edges cutting the same device at once: the one Mender answers 400 reads again and counts it done."""
    waiting, both = make_device(pki, "CUT-PRE"), make_device(pki, "CUT-TWICE")
    token = standin.personal_token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"identity_data": {"device_id": "CUT-PRE"}, "pubkey": public_pem(waiting.key)}).encode()
    assert post(standin.url + "/api/management/v2/devauth/devices", body, headers)[0] == 201
    pre = standin.device({"device_id": "CUT-PRE"})

    async def steps(client: TestClient[Any, Any]) -> list[Any]:
        mender = client.server.app[edge_http.CLIENT]
        seen: list[Any] = [await mender.reject(pre.id, waiting.key.public_key())]
        seen.append(await auth(client, both, {"device_id": "CUT-TWICE"}))
        accepted = standin.device({"device_id": "CUT-TWICE"})
        # This edge read the device (accepted) just before another edge rejected it.
        stale = [await mender.device(accepted.id)]
        seen.append(await asyncio.to_thread(standin.set_auth_status, {"device_id": "CUT-TWICE"}, "rejected"))
        fresh = mender.device

        async def device(device_id: str) -> Any:
            return stale.pop() if stale else await fresh(device_id)

        mender.device = device
        return [*seen, await mender.reject(accepted.id, both.key.public_key())]

    assert serve(settings(tmp_path, pki, standin), steps) == [1, 200, 204, 0]
    assert standin.device({"device_id": "CUT-PRE"}) is None
    assert standin.device({"device_id": "CUT-TWICE"}).status == "rejected"


@pytest.mark.parametrize(("recheck", "after"), [(60, 204), (0, 403)])
def test_the_recheck_window_is_how_long_a_revocation_takes_on_routes(
    tmp_path: Path, pki: Path, standin: Any, recheck: int, after: int
) -> None:
    device = make_device(pki, f"WIN-{recheck}")

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        seen = [await route(client, device)]
        imageprov_pki("revoke", "--pki", pki, device.name)
        return [*seen, await route(client, device)]

    assert serve(settings(tmp_path, pki, standin, recheck=recheck), steps) == [204, after]


def test_no_answer_from_a_source_is_503_never_a_pass(tmp_path: Path, pki: Path, standin: Any) -> None:
    device = make_device(pki, "GONE-1")
    identity = {"device_id": "GONE-1"}
    registry = pki / "registry.sqlite"

    async def steps(client: TestClient[Any, Any]) -> list[Any]:
        os.rename(registry, registry.with_suffix(".away"))
        try:
            seen: list[Any] = [await auth(client, device, identity), await route(client, device)]
            async with client.get("/healthz") as answer:
                seen.append((answer.status, sorted(json.loads(await answer.read())["problems"])))
        finally:
            os.rename(registry.with_suffix(".away"), registry)
        return seen

    assert serve(settings(tmp_path, pki, standin, recheck=0), steps) == [503, 503, (503, ["registry"])]
    assert not preauthorizations(standin, identity)


def test_a_mender_server_that_is_down_is_503_with_retry_after(tmp_path: Path, pki: Path, standin: Any) -> None:
    device = make_device(pki, "DOWN-1")
    identity = {"device_id": "DOWN-1"}
    down = settings(tmp_path, pki, standin)
    down = ServeSettings(**{**down.__dict__, "upstream": "http://127.0.0.1:9"})

    async def steps(client: TestClient[Any, Any]) -> tuple[int, str | None, int]:
        signed = signed_request(device.key, identity)
        headers = {**signed.headers, "X-SSL-Client-Cert": escaped(device.cert)}
        async with client.post(AUTH_PATH, data=signed.body, headers=headers) as answer:
            status, retry = answer.status, answer.headers.get("Retry-After")
        async with client.get("/healthz") as answer:
            return status, retry, answer.status

    assert serve(down, steps) == (503, "5", 503)


def test_a_service_user_whose_password_is_not_latin_1_logs_in(tmp_path: Path, pki: Path, standin: Any) -> None:
    """Mender's UI takes any password; the edge's Basic login sends it as UTF-8 (RFC 7617), as curl does."""
    device = make_device(pki, "UTF-1")
    identity = {"device_id": "UTF-1"}
    password = "pässwörd-密码-🔑"
    standin.users["utf8@example.com"] = password
    (tmp_path / "utf8-password").write_text(password)
    given = Flags(pki=pki, upstream=standin.url, username="utf8@example.com",
                  password_file=tmp_path / "utf8-password", timeout=15)  # fmt: skip

    async def steps(client: TestClient[Any, Any]) -> int:
        return await auth(client, device, identity)

    assert serve(ServeSettings.from_sources(given, {}), steps) == 200
    assert standin.device(identity).status == "accepted"
