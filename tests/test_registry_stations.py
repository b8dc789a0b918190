"""Stations on several hosts against one PostgreSQL registry: overlapping batches, kill -9, a database restart.

Each station is a separate process in a UTS namespace of its own, with its own
host name (``unshare --uts``, then ``hostname``), as stations on several hosts
would be. Results are read with other tools: debugfs and openssl for the
images, psycopg for the registry.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from imageprov.pki.registry import Registry, Status
from tests.conftest import IMAGEPROV_ARGV, cli_env, debugfs, imageprov_pki, need, roles, tool
from tests.pg import Db, Postgres, running_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def line(tmp_path: Path, make_golden: Callable[..., Path]) -> tuple[Path, Path]:
    """A PKI whose imageprov.toml points every station at PostgreSQL, and a golden image."""
    need("unshare", "hostname", "debugfs", "openssl")
    pki = tmp_path / "pki"
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    return pki, make_golden(Scheme.MBR, rootfs_mib=16, data_mib=16)


def _registry(server: Postgres, pki: Path) -> Db:
    """A new database for the PKI: the registry moved there by the CLI, then named in its imageprov.toml."""
    db = Db.make("postgresql", server)
    imageprov_pki("registry", "migrate", "--pki", pki, "--to", db.url(pki))
    db.configure(pki)
    return db


def _station(host: str, golden: Path, pki: Path, out: Path, ids: list[str]) -> subprocess.Popen[str]:
    """``imageprov stamp`` on "another host": its own UTS namespace and host name (exec keeps the pid)."""
    argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host]
    argv += [*IMAGEPROV_ARGV, "stamp", str(golden), "--pki", str(pki), "--out", str(out)]
    for device_id in ids:
        argv += ["--device-id", device_id]
    return subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _image_serial(image: Path) -> str:
    """The serial of the certificate inside an image, read with debugfs and openssl."""
    pem = debugfs(image, roles(image)["data"], "cat /mender/mender-cert.pem").encode()
    text = tool("openssl", "x509", "-noout", "-serial", input=pem).stdout.decode()
    return text.strip().removeprefix("serial=").lower().lstrip("0")


def _poll(condition: Callable[[], bool], seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _active(db: Db, pki: Path) -> int:
    [(count,)] = db.rows(pki, "SELECT COUNT(*) FROM certificates WHERE status = 'active'")
    assert isinstance(count, int)
    return count


def _consistent(db: Db, pki: Path, out: Path, ids: list[str]) -> None:
    """Every id delivered once: one image holding the device's one active certificate, nothing left over."""
    rows = db.rows(pki, "SELECT device_id, serial, status FROM certificates WHERE kind = 'device'")
    assert len({serial for _, serial, _ in rows}) == len(rows), "duplicate serials"
    for device_id in ids:
        live = [(serial, status) for d, serial, status in rows if d == device_id and status != "revoked"]
        assert [status for _, status in live] == ["active"], (device_id, live)
        assert _image_serial(out / f"{device_id}.sdimg") == live[0][0]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{d}.sdimg" for d in ids)


def test_three_stations_on_three_hosts_stamp_overlapping_batches(
    line: tuple[Path, Path], postgres: Postgres, tmp_path: Path
) -> None:
    pki, golden = line
    db = _registry(postgres, pki)
    out = tmp_path / "out"
    ids = [f"d{i:02d}" for i in range(9)]
    # Every id is in two stations' lists.
    batches = {"station-a": ids[0:6], "station-b": ids[3:9], "station-c": ids[6:9] + ids[0:3]}
    stations = {host: _station(host, golden, pki, out, batch) for host, batch in batches.items()}
    for station in stations.values():
        _, stderr = station.communicate(timeout=600)
        assert station.returncode in (0, 1), stderr
        for failed in re.findall(r"^failed .*$", stderr, re.MULTILINE):
            # The only refusal: another station has (or just took) the device.
            assert "being stamped by another station: station-" in failed or "at the same time" in failed, failed
        assert "Traceback" not in stderr
    _consistent(db, pki, out, ids)
    # Each device was issued exactly one certificate, by a station on its own host.
    assert len(db.rows(pki, "SELECT serial FROM certificates")) == len(ids)
    hosts = {h for (h,) in db.rows(pki, "SELECT s.host FROM certificates c JOIN sessions s ON s.id = c.session")}
    assert hosts <= set(batches) and len(hosts) >= 2
    assert imageprov_pki("registry", "check", "--pki", pki).returncode == 0


def test_a_station_killed_mid_batch_is_finished_by_another(
    line: tuple[Path, Path], postgres: Postgres, tmp_path: Path
) -> None:
    pki, golden = line
    db = _registry(postgres, pki)
    out = tmp_path / "out"
    ids = [f"k{i:02d}" for i in range(16)]
    station = _station("station-a", golden, pki, out, ids)
    _poll(lambda: _active(db, pki) >= 2 or station.poll() is not None)
    os.kill(station.pid, signal.SIGKILL)  # exec kept the pid: this is imageprov itself
    station.communicate(timeout=60)
    delivered = _active(db, pki)
    print(f"killed with {delivered} of {len(ids)} delivered")
    assert 0 < delivered < len(ids), "the kill did not land mid-batch"
    pending = db.rows(pki, "SELECT device_id, serial FROM certificates WHERE status = 'pending'")
    undelivered = {serial for device, serial in pending if not (out / f"{device}.sdimg").exists()}
    rerun = _station("station-b", golden, pki, out, ids)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    _consistent(db, pki, out, ids)
    revoked = db.rows(pki, "SELECT serial, reason FROM certificates WHERE status = 'revoked'")
    # Only the dead station's certificates for images it never delivered, and no one else's.
    assert {serial for serial, _ in revoked} == undelivered and {r for _, r in revoked} <= {"superseded"}
    assert stderr.count("issued by a run that is gone (station-a (pid ") == len(undelivered)


def test_postgresql_restarted_mid_batch(line: tuple[Path, Path], tmp_path: Path) -> None:
    pki, golden = line
    with running_postgres() as server:  # its own server: this test stops it
        db = _registry(server, pki)
        out = tmp_path / "out"
        ids = [f"r{i:02d}" for i in range(16)]
        edge = Registry(pki)  # a long-running reader, as the edge is: connected before the restart
        station = _station("station-a", golden, pki, out, ids)
        _poll(lambda: _active(db, pki) >= 1 or station.poll() is not None)
        server.stop("fast")
        _, stderr = station.communicate(timeout=600)
        server.start()
        [(serial,)] = db.rows(pki, "SELECT serial FROM certificates WHERE status = 'active' LIMIT 1")
        assert edge.status_of_serial(str(serial)) is Status.ACTIVE  # connected again by itself
        edge.close()
        delivered = _active(db, pki)
        print(f"restarted with {delivered} of {len(ids)} delivered")
        assert station.returncode == 1 and 0 < delivered < len(ids), stderr
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert lines[-1].startswith("imageprov: error: lost the registry postgresql:///"), stderr
        for failed in [line for line in lines if line.startswith("failed ")]:
            assert "lost the registry" in failed, failed  # the devices in flight: one line each
        # No live certificate without its image: whatever stayed pending has no lease and no final image.
        for device, status in db.rows(pki, "SELECT device_id, status FROM certificates"):
            if status == "active":
                assert (out / f"{device}.sdimg").exists(), device
        rerun = _station("station-a", golden, pki, out, ids)
        _, stderr = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, stderr
        _consistent(db, pki, out, ids)
        assert not db.rows(pki, "SELECT serial FROM certificates WHERE status = 'pending'")


_PARTIAL = """
import sys
from pathlib import Path
from imageprov.disk.copy import stage
print(stage(Path(sys.argv[1]) / "d01.sdimg").name, flush=True)
sys.stdin.read()
"""


def test_partial_files_of_a_station_in_another_pid_namespace(tmp_path: Path) -> None:
    """A partial output is removed once its maker is gone, and never before, whatever its pid means here."""
    from imageprov.disk.copy import remove_stale

    need("unshare")
    maker = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", _PARTIAL, tmp_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    try:
        assert maker.stdout is not None
        name = maker.stdout.readline().strip()
        assert name.startswith(".d01.1.")  # PID 1 of its namespace: "alive" forever to a pid check here
        # And as another host's station would name it: a pid that means nothing here.
        elsewhere = tmp_path / name.replace(".d01.1.", ".d01.4194399.")
        (tmp_path / name).rename(elsewhere)
        assert remove_stale(tmp_path) == [] and elsewhere.exists()
        maker.kill()
        maker.wait(60)
        _poll(lambda: remove_stale(tmp_path) == [elsewhere])
        assert not elsewhere.exists()
    finally:
        maker.kill()
        maker.wait(60)
