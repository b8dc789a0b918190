"""Load and faults: a fleet switching on at once through real nginx (real TLS) and ``imageprov edge serve``.

Devices retry as the Mender client does (tests/edge_fleet.py, ClientRetry),
on its schedule scaled down in time. Speed is measured by scripts/bench_edge.py,
not asserted here, and neither is how many attempts a loaded machine made
fail: these tests print latency and retries, and check outcomes. Under load
every device ends accepted, once, with its own key; a failing Mender server
gives 503s that succeed on retry; and a device with another CA's certificate,
a forged signature or someone else's key never gets in, however often it
tries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import imageprov_pki, need
from tests.edge_fleet import NO_ANSWER, ClientRetry, SimDevice, forge_signatures, make_fleet, standin_process, switch_on
from tests.edge_support import PASSWORD, USER, FleetCA, decisions, edge_service, free_port, nginx

DEVICES = 1000
BAD = 10  # of each kind of device that must not get in
# The Mender client's schedule with a minute made 0.1 s: a device's 12 retries all come within about 4 s.
CLIENT = ClientRetry().scaled(0.1 / 60)
# A wave still going after this fails the test rather than run to its worst case (13 attempts of a minute).
DEADLINE = 300.0


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
    # The test's CA has no registry: revocation from a denylist (nothing revoked), and the identity bound to
    # the certificate by its serial attribute, which is each device's CN.
    denylist = tmp_path / "denylist"
    denylist.write_text("")
    with edge_service(tmp_path, "--ca", pki / "ca-cert.pem", "--upstream", upstream, "--username", USER,
                      "--password-file", password, "--denylist", denylist, "--identity", "attribute:serial",
                      *serve) as service:  # fmt: skip
        conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream", upstream,
                             "--listen", f"127.0.0.1:{port}", "--accept", service["url"]).stdout  # fmt: skip
        with nginx(tmp_path, conf, port):
            yield f"https://localhost:{port}", service


def _by_identity(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["identity"]["serial"]: d for d in summary["devices"]}


def _impostors(ca: FleetCA, tmp_path: Path, server_ca: Path) -> tuple[list[SimDevice], list[SimDevice]]:
    """Devices nginx must refuse (another CA's certificate) and the service must refuse (a forged signature)."""
    aliens = make_fleet(FleetCA("Edge Test CA"), BAD, tmp_path / "aliens", server_ca, "aliens")
    forged = make_fleet(ca, BAD, tmp_path / "forged", server_ca, "forged")
    forge_signatures(forged)
    return aliens, forged


def test_a_thousand_devices_switch_on_at_once(tmp_path: Path, edge_files: tuple[FleetCA, Path, Path, Path]) -> None:
    server_ca = edge_files[1] / "ca-cert.pem"
    fleet = make_fleet(edge_files[0], DEVICES, tmp_path / "fleet", server_ca)
    aliens, forged = _impostors(edge_files[0], tmp_path, server_ca)
    everyone = fleet + aliens + forged
    good, bad = {d.name for d in fleet}, {d.name for d in aliens + forged}
    with standin_process() as standin, _edge(tmp_path, edge_files, standin["url"]) as (url, service):
        first = switch_on(everyone, url, retry=CLIENT, deadline=DEADLINE)
        again = switch_on(everyone, url, retry=CLIENT, deadline=DEADLINE)
        lines = decisions(service["log"])
    for label, wave in (("new", first), ("cached", again)):
        print(f"\n{wave.of(good).figures(f'{label}, good')} (the wave took {wave.seconds:.1f} s)")
        print(wave.of(bad).figures(f"{label}, impostors"))
    # The devices' view: each one accepted in the end, every time; no impostor ever, though each tried
    # as long as the client does.
    for wave in (first, again):
        assert wave.of(good).finals() == {200: DEVICES}
        assert all(200 not in wave.attempts[name] for name in bad)
        assert {len(wave.attempts[name]) for name in bad} == {CLIENT.attempts}
    # The Mender server's view: every device accepted with its own key, one auth set each; a token for
    # each 200 (and perhaps one for an attempt whose answer was lost); no impostor known at all.
    summary = standin["summary"]
    assert summary["deviations"] == []
    devices = _by_identity(summary)
    assert set(devices) == good
    for device in fleet:
        found = devices[device.name]
        assert (found["status"], found["auth_sets"], found["pubkey"]) == ("accepted", 1, device.pubkey)
        assert 2 <= found["tokens"] <= len(first.attempts[device.name]) + len(again.attempts[device.name])
    # Preauthorized once each, and again only by an attempt that failed after it (the cache did the rest).
    assert DEVICES <= summary["calls"]["preauthorize"] == summary["preauthorized"] <= DEVICES + first.of(good).retries()
    # The service's view: no internal error; every impostor that reached it refused for its signature.
    assert not [line for line in lines if line["decision"] == "error"]
    assert {line["cn"] for line in lines if line["decision"] == "accepted"} == good
    assert {line["cn"] for line in lines if line["preauthorized"]} == good
    impostor_lines = [line for line in lines if line["cn"] in bad]
    assert {line["cn"] for line in impostor_lines} == {d.name for d in forged}
    assert {(line["decision"], line["reason"]) for line in impostor_lines} == {("refused", "bad-signature")}


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
        wave = switch_on(good + bad, edge[0], retry=CLIENT, deadline=DEADLINE)
    print("\n" + wave.of({d.name for d in good}).figures("good, Mender server failing 1 call in 10"))
    summary = standin["summary"]
    assert summary["deviations"] == [] and summary["faults_injected"] > 0
    assert all(d.statuses[-1] == 200 for d in good)
    assert any(503 in d.statuses for d in good), "no fault reached a device: the test proves nothing"
    # A failing Mender server is a 503, never a 500 or 502 (NO_ANSWER is the loaded machine's, and retried).
    assert set(wave.statuses()) <= {NO_ANSWER, 200, 503, 400, 401}
    assert all(200 not in d.statuses for d in bad)
    # The Mender server knows the good devices, all accepted, and nothing of the others (or their donors).
    known = _by_identity(summary)
    assert set(known) == {d.name for d in good} and {d["status"] for d in known.values()} == {"accepted"}
