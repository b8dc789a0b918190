"""``edge serve`` takes live revocations from the registry the PKI names, SQLite or PostgreSQL.

A PKI whose imageprov.toml points at PostgreSQL has no registry.sqlite: the
edge must still ask the registry, and a revocation must count at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import imageprov_pki
from tests.edge_support import AUTH_PATH, PASSWORD, USER, decisions, edge_service, escaped, post, running_standin
from tests.edge_support import signed_request as make_request
from tests.pg import Db, Postgres, running_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def standin() -> Iterator[Any]:
    with running_standin() as server:
        yield server


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_revocation_in_the_registry_is_refused_at_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, standin: Any
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    db = Db.make(kind, request.getfixturevalue("postgres") if kind == "postgresql" else None)
    db.configure(pki)  # before the CA, which makes its registry where imageprov.toml says
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA", "--org", "ACME")
    if kind == "postgresql":
        assert not (pki / "registry.sqlite").exists()  # nothing of the registry in the PKI directory but its URL
    devices = tmp_path / "devices"
    for name in ("live-1", "gone-1"):
        imageprov_pki("device-cert", "--pki", pki, "--device-id", name, "--out", devices / name)
    password = tmp_path / "password"
    password.write_text(PASSWORD)

    def attempt(running: dict[str, Any], name: str) -> int:
        cert = x509.load_pem_x509_certificate((devices / name / "mender-cert.pem").read_bytes())
        key = serialization.load_pem_private_key((devices / name / "mender-cert-private.pem").read_bytes(), None)
        signed = make_request(key, {"mac": f"{kind}-{name}"})
        headers = {"Content-Type": "application/json", "X-MEN-Signature": signed.signature}
        headers["X-SSL-Client-Cert"] = escaped(cert)
        return post(running["url"] + AUTH_PATH, signed.body, headers)[0]

    with edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER,
                      "--password-file", password) as running:  # fmt: skip
        imageprov_pki("revoke", "--pki", pki, "gone-1")
        assert attempt(running, "gone-1") == 401
        assert attempt(running, "live-1") == 200
        reasons = [(d["cn"], d["reason"]) for d in decisions(running["log"])]
    assert ("gone-1", "revoked") in reasons
    assert not (pki / "registry.sqlite").exists() or kind == "sqlite"
    assert json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)
