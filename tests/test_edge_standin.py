"""The stand-in Mender server itself: it behaves as the edge's tests need, and it notices requests off the spec
(so that a test through it can fail)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.edge_support import AUTH_PATH, PASSWORD, USER, post, public_pem, signed_request
from tests.standin_mender import StandinMender

PREAUTH = "/api/management/v2/devauth/devices"
LOGIN = "/api/management/v1/useradm/auth/login"


@pytest.fixture
def standin() -> Iterator[StandinMender]:
    server = StandinMender().start()
    yield server
    server.stop()


def _token(standin: StandinMender) -> str:
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    status, headers, body = post(standin.url + LOGIN, b"", {"Authorization": f"Basic {basic}"})
    assert status == 200 and headers["Content-Type"].startswith("application/jwt")
    return body.decode()


def _json(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_device_lifecycle(standin: StandinMender) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    unknown = signed_request(key, {"mac": "01"})
    assert post(standin.url + AUTH_PATH, unknown.body, unknown.headers)[0] == 401
    assert standin.statuses() == {'{"mac":"01"}': "pending"}
    token = _token(standin)
    other = ec.generate_private_key(ec.SECP256R1())
    payload = json.dumps({"identity_data": {"mac": "02"}, "pubkey": public_pem(other)}).encode()
    status, headers, _ = post(standin.url + PREAUTH, payload, _json(token))
    assert status == 201 and headers["Location"].startswith("devices/")
    assert post(standin.url + PREAUTH, payload, _json(token))[0] == 409
    known = signed_request(other, {"mac": "02"})
    status, _, jwt = post(standin.url + AUTH_PATH, known.body, known.headers)
    assert status == 200 and jwt.count(b".") == 2
    assert standin.statuses()['{"mac":"02"}'] == "accepted"
    bad = signed_request(key, {"mac": "02"}, pubkey_of=other)  # signed with another key
    assert post(standin.url + AUTH_PATH, bad.body, bad.headers)[0] == 401
    assert standin.deviations == []


CASES: dict[str, Any] = {
    "identity_data not an object": (PREAUTH, {"identity_data": "x", "pubkey": "p"}, True, "where the spec has object"),
    "pubkey missing": (PREAUTH, {"identity_data": {"a": "b"}}, True, "required member 'pubkey'"),
    "no bearer": (PREAUTH, {"identity_data": {"a": "b"}, "pubkey": "p"}, False, "no Bearer Authorization"),
    "no signature header": (AUTH_PATH, {"id_data": "{}", "pubkey": "p"}, False, "required header X-MEN-Signature"),
    "id_data not a string": (AUTH_PATH, {"id_data": {}, "pubkey": "p"}, False, "where the spec has string"),
    "unknown operation": ("/api/management/v2/devauth/nothing", {}, True, "no such operation"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_requests_off_the_spec_are_deviations(standin: StandinMender, case: str) -> None:
    path, body, bearer, message = CASES[case]
    headers = _json(_token(standin)) if bearer else {"Content-Type": "application/json"}
    post(standin.url + path, json.dumps(body).encode(), headers)
    assert any(message in deviation for deviation in standin.deviations), standin.deviations


def _device_auth(standin: StandinMender, key: Any, identity: dict[str, Any]) -> tuple[int, str]:
    signed = signed_request(key, identity)
    status, _, body = post(standin.url + AUTH_PATH, signed.body, signed.headers)
    return status, body.decode() if status == 200 else ""


def test_deviceauth_semantics_force_reject_decommission(standin: StandinMender) -> None:
    """What the edge's readmission relies on, as Mender's deviceauth does it: a 409 without auth sets; force
    setting a rejected key back to preauthorized (which is why the edge never forces a rejected key);
    Location after force naming no device; rejection and decommissioning killing tokens; a decommissioned
    device that asks again becoming a new pending device, which a preauthorization without force cannot
    bring back."""
    key, identity = ec.generate_private_key(ec.SECP256R1()), {"mac": "03"}
    token = _token(standin)
    payload = {"identity_data": identity, "pubkey": public_pem(key)}
    status, headers, _ = post(standin.url + PREAUTH, json.dumps(payload).encode(), _json(token))
    device = standin.device(identity)
    assert status == 201 and device is not None and headers["Location"] == f"devices/{device.id}"
    status, _, body = post(standin.url + PREAUTH, json.dumps(payload).encode(), _json(token))
    assert status == 409 and json.loads(body)["id"] == device.id and "auth_sets" not in json.loads(body)
    status, jwt = _device_auth(standin, key, identity)
    assert status == 200 and standin.token_works(jwt)
    # Rejected: the token dies, the device is refused, a second rejection is refused (400), 409 stays 409.
    assert standin.set_auth_status(identity, "rejected") == 204 and not standin.token_works(jwt)
    assert standin.set_auth_status(identity, "rejected") == 400
    assert _device_auth(standin, key, identity)[0] == 401
    assert post(standin.url + PREAUTH, json.dumps(payload).encode(), _json(token))[0] == 409
    forced = json.dumps({**payload, "force": True}).encode()
    status, headers, _ = post(standin.url + PREAUTH, forced, _json(token))
    assert status == 201 and headers["Location"] != f"devices/{device.id}" and len(standin.devices) == 1
    assert standin.set_auth_status(identity, "accepted") == 400  # preauthorized: only a device request accepts it
    status, jwt = _device_auth(standin, key, identity)
    assert status == 200 and standin.device(identity).status == "accepted"  # type: ignore[union-attr]
    # Decommissioned: gone with its tokens; asking again makes a new pending device, which 409 protects.
    standin.decommission_device(identity)
    assert standin.device(identity) is None and not standin.token_works(jwt)
    assert _device_auth(standin, key, identity)[0] == 401
    again = standin.device(identity)
    assert again is not None and again.id != device.id and again.status == "pending"
    assert post(standin.url + PREAUTH, json.dumps(payload).encode(), _json(token))[0] == 409
    assert _device_auth(standin, key, identity)[0] == 401
    assert standin.deviations == []


def test_accepting_a_key_rejects_the_devices_other_accepted_key(standin: StandinMender) -> None:
    old, new, identity = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()), {"mac": "04"}
    token = _token(standin)
    for key, force in ((old, False), (new, True)):
        payload = json.dumps({"identity_data": identity, "pubkey": public_pem(key), "force": force}).encode()
        assert post(standin.url + PREAUTH, payload, _json(token))[0] == 201
        assert _device_auth(standin, key, identity)[0] == 200
    device = standin.device(identity)
    assert device is not None and [a.status for a in device.auth_sets] == ["rejected", "accepted"]
    # A preauthorized set dismissed (DELETE): the device goes with it when it was its only set.
    other = {"mac": "05"}
    payload = json.dumps({"identity_data": other, "pubkey": public_pem(old)}).encode()
    assert post(standin.url + PREAUTH, payload, _json(token))[0] == 201
    gone = standin.device(other)
    assert gone is not None
    path = f"{PREAUTH}/{gone.id}/auth/{gone.auth_sets[0].id}"
    assert standin.operate("DELETE", path) == 204 and standin.device(other) is None
    assert standin.deviations == []
