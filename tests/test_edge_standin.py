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
