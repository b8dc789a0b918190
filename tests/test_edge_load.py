"""Load and faults: a fleet switching on at once through real nginx (real TLS) and ``imageprov edge serve``.

Speed is measured by scripts/bench_edge.py, not asserted here: these tests
check that under load every device is accepted exactly once and none is
refused, and that a failing Mender server gives 503s that succeed on retry
and never lets a device in without a valid certificate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import imageprov_pki, need
from tests.edge_fleet import SimDevice, make_fleet, standin_process, switch_on
from tests.edge_support import PASSWORD, USER, FleetCA, decisions, edge_service, free_port, nginx

DEVICES = 1000


@pytest.fixture
def edge_files(tmp_path: Path) -> tuple[FleetCA, Path, Path, Path]:
    need("nginx")
    ca = FleetCA()
    pki, server = ca.write_edge(tmp_path / "edge")
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    return ca, pki, server, password


@contextmanager
def _edge(tmp_path: Path, files: tuple[FleetCA, Path, Path, Path], upstream: str, *serve: str) -> Iterator[Any]:
    _, pki, server, password = files
    port = free_port()
    with edge_service(tmp_path, "--ca", pki / "ca-cert.pem", "--upstream", upstream, "--username", USER,
                      "--password-file", password, *serve) as service:  # fmt: skip
        conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream", upstream,
                             "--listen", f"127.0.0.1:{port}", "--accept", service["url"]).stdout  # fmt: skip
        with nginx(tmp_path, conf, port):
            yield f"https://localhost:{port}", service


def _by_identity(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["identity"]["serial"]: d for d in summary["devices"]}


def test_a_thousand_devices_switch_on_at_once(tmp_path: Path, edge_files: tuple[FleetCA, Path, Path, Path]) -> None:
    fleet = make_fleet(edge_files[0], DEVICES, tmp_path / "fleet", edge_files[1] / "ca-cert.pem")
    with standin_process() as standin, _edge(tmp_path, edge_files, standin["url"]) as (url, service):
        first = switch_on(fleet, url)
        assert first.statuses() == {200: DEVICES}
        again = switch_on(fleet, url)
        assert again.statuses() == {200: DEVICES}
        lines = decisions(service["log"])
    summary = standin["summary"]
    assert summary["deviations"] == []
    # Every device preauthorized exactly once, accepted with its own key, and given a token each time.
    assert summary["calls"]["preauthorize"] == DEVICES and summary["preauthorized"] == DEVICES
    devices = _by_identity(summary)
    assert len(devices) == DEVICES
    for device in fleet:
        found = devices[device.name]
        assert (found["status"], found["auth_sets"], found["tokens"]) == ("accepted", 1, 2)
        assert found["pubkey"] == device.pubkey
    assert sorted((line["decision"], line["preauthorized"]) for line in lines) == sorted(
        [("accepted", True)] * DEVICES + [("accepted", False)] * DEVICES
    )


def test_failing_mender_server_gives_503s_that_succeed_on_retry(
    tmp_path: Path, edge_files: tuple[FleetCA, Path, Path, Path]
) -> None:
    ca = edge_files[0]
    good = make_fleet(ca, 150, tmp_path / "good", edge_files[1] / "ca-cert.pem", "good")
    # Devices that must never get in: another CA's certificate (nginx refuses at TLS), and a request whose
    # key is not the certificate's (the service refuses).
    aliens = make_fleet(FleetCA("Edge Test CA"), 10, tmp_path / "aliens", edge_files[1] / "ca-cert.pem", "aliens")
    mismatched = make_fleet(ca, 10, tmp_path / "mismatched", edge_files[1] / "ca-cert.pem", "mismatched")
    donors = make_fleet(ca, 10, tmp_path / "donors", edge_files[1] / "ca-cert.pem", "donors")
    for device, donor in zip(mismatched, donors):  # the certificate of one, the signed request of another
        device.body, device.signature, device.pubkey = donor.body, donor.signature, donor.pubkey
        device.identity = {**donor.identity, "serial": device.name}
    bad: list[SimDevice] = aliens + mismatched
    serve = ("--upstream-timeout", "1", "--retry-after", "1")
    with (
        standin_process(faults=0.1, fault_delay=3.0) as standin,
        _edge(tmp_path, edge_files, standin["url"], *serve) as edge,
    ):
        wave = switch_on(good + bad, edge[0], attempts=40)
    summary = standin["summary"]
    assert summary["deviations"] == [] and summary["faults_injected"] > 0
    assert all(d.statuses[-1] == 200 for d in good)
    assert any(503 in d.statuses for d in good), "no fault reached a device: the test proves nothing"
    assert set(wave.statuses()) <= {200, 503, 400, 401}
    assert all(200 not in d.statuses for d in bad)
    # The Mender server knows the good devices, all accepted, and nothing of the others (or their donors).
    known = _by_identity(summary)
    assert set(known) == {d.name for d in good} and {d["status"] for d in known.values()} == {"accepted"}
