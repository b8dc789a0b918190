"""Hardening, round 3 (issue 23): stations sharing scratch space, stations killed or left without an answer, and
the command line fed what a careless operator types.

- A flash station's scratch directory is its own for as long as it holds its lock: another station, in another
  PID namespace or on another host, never removes it (its pid means nothing there).
- A flash killed after writing its card leaves a pending certificate: ``registry check`` and the next station's
  start-up name it, and ``revoke --stale`` revokes it; a station at work is never taken for gone.
- A registry that stops answering (PostgreSQL stopped with SIGSTOP; SQLite locked by a stopped process) stops a
  station within its deadline, with one line and exit 1, and a rerun finishes the batch.
- ``--days`` past what a certificate carries, an unclosed ``[`` in a URL, an imageprov.toml that is not UTF-8 or
  whose timeout is no number of seconds: one line, never a traceback; no password is ever shown.

Results are read with other tools than imageprov's readers: sqlite3 and psycopg for the registry, debugfs and
openssl for images and cards. Nothing waits for a time to pass: each step polls for what it waits for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import IMAGEPROV_ARGV, SBIN, cli_env, imageprov, imageprov_pki, need, tool
from tests.flashdev import Loops, loop_devices, unavailable
from tests.pg import Db, Postgres, running_postgres
from tests.test_edge_binding import _family
from tests.test_flash import check_card
from tests.test_registry_stations import _consistent

# Generous bounds for a loaded machine; what is measured is printed.
BOUND = 300
SMALL = {"rootfs_mib": 16, "data_mib": 16}


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Db:
    return Db.make(request.param, request.getfixturevalue("postgres") if request.param == "postgresql" else None)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


def _pki(tmp_path: Path, db: Db, *, timeout: float | None = None) -> Path:
    """A PKI whose imageprov.toml names the registry before ``ca init``, which makes it there."""
    pki = tmp_path / "pki"
    pki.mkdir()
    db.configure(pki, timeout=timeout)
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    return pki


def _poll(condition: Callable[[], bool], what: str, seconds: float = BOUND) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.05)


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("imageprov: error: "), (
        proc.returncode,
        proc.stderr,
    )
    return lines[0]


def _the_error(stderr: str) -> str:
    """A station's stderr may hold notes and per-device lines; its error is one line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("imageprov: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@contextlib.contextmanager
def stopped(server: Postgres) -> Iterator[None]:
    """The whole cluster stopped with SIGSTOP: connections stay open, nothing answers.

    A process of it may end meanwhile (a backend whose client left, caught exiting): that one needs nothing."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    family = _family(postmaster)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _stopped_state(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


# -- 2. flash scratch directories belong to the station that holds their lock --------------------------------------


def test_a_flash_station_in_another_pid_namespace_keeps_its_scratch(
    tmp_path: Path, pki: Path, make_golden: Callable[..., Path]
) -> None:
    """Two stations as two containers sharing TMPDIR: each its own PID namespace; A is PID 2 in its own, and there
    is no PID 2 in B's, so a pid check there calls A dead. A's lock says it is not."""
    need("unshare")
    if os.geteuid() != 0:
        unavailable("PID namespaces need root")
    golden = make_golden(Scheme.MBR, **SMALL)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    a_log = tmp_path / "a.log"
    # A waits for a card that never comes: a station mid-shift. Its shell is PID 1 of the namespace, A is PID 2.
    a_argv = [*IMAGEPROV_ARGV, "flash", str(golden), "--pki", str(pki), "--wait", "--device-id", "A-1",
              "--wait-for", "imageprov-test-no-such-disk", "--scratch", str(scratch)]  # fmt: skip
    with open(a_log, "w") as log:
        station_a = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "sh", "-c", '"$@"; exit $?', "sh", *a_argv],
            stdout=subprocess.DEVNULL, stderr=log, env=cli_env(), start_new_session=True,
        )  # fmt: skip
    try:
        _poll(lambda: "waiting for a card" in a_log.read_text() or station_a.poll() is not None, "A at work")
        assert station_a.poll() is None, a_log.read_text()
        [workdir] = scratch.glob("imageprov-flash-*")
        assert workdir.name.startswith("imageprov-flash-2-"), workdir
        held = sorted(p.name for p in workdir.iterdir())
        # B: one card that is no card (it fails at the target), after its start-up cleaned the scratch directory.
        station_b = subprocess.run(
            ["unshare", "--pid", "--fork", "--kill-child", *IMAGEPROV_ARGV, "flash", str(golden), "--pki", str(pki),
             "--target", f"{tmp_path / 'not-a-card'}=B-1", "--scratch", str(scratch)],
            capture_output=True, text=True, env=cli_env(), stdin=subprocess.DEVNULL, timeout=BOUND,
        )  # fmt: skip
        assert station_b.returncode == 1 and "not-a-card" in station_b.stderr, station_b.stderr
        assert "removed" not in station_b.stderr
        assert workdir.is_dir() and sorted(p.name for p in workdir.iterdir()) == held
        assert station_a.poll() is None, a_log.read_text()
        # A killed (kill -9: nothing of its own cleanup runs): the next station removes what it left.
        os.killpg(station_a.pid, signal.SIGKILL)
        station_a.wait(60)
        _poll(lambda: _lock_free(workdir), "A's lock released")
        after = imageprov_pki("flash", golden, "--pki", pki, "--target", f"{tmp_path / 'not-a-card'}=B-2",
                              "--scratch", scratch, check=False)  # fmt: skip
        assert f"note: removed {workdir}, left by a flash process that was killed" in after.stderr, after.stderr
        assert not workdir.exists() and list(scratch.iterdir()) == []
    finally:
        if station_a.poll() is None:
            os.killpg(station_a.pid, signal.SIGKILL)
            station_a.wait(60)


def _lock_free(workdir: Path) -> bool:
    """No process holds the lock of the directory's owner file (made with stage(), as stamp's partial files)."""
    from imageprov.line.flash import WORKDIR_OWNER
    from imageprov.locks import held

    return not any(held(owner) for owner in workdir.glob(f".{WORKDIR_OWNER}.*.partial"))


_HOLDER = """
import os, sys
from pathlib import Path
from imageprov.line.flash import make_workdir

workdir, owner = make_workdir(Path(sys.argv[1]))
(workdir / "SN-1.data").write_bytes(b"a device's key, in a station's scratch")
# Named as another host's station names it: with a pid that means nothing here (pid_max is at most 2**22).
elsewhere = workdir.with_name(workdir.name.replace(f"-{os.getpid()}-", "-4194399-"))
os.rename(workdir, elsewhere)
print(elsewhere, flush=True)
sys.stdin.read()
"""


def test_a_scratch_directory_is_removed_once_its_lock_is_gone_and_never_before(
    tmp_path: Path, pki: Path, make_golden: Callable[..., Path]
) -> None:
    """Another host's station, sharing --scratch: its pid is no process here, its lock is held."""
    golden = make_golden(Scheme.MBR, **SMALL)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    other = subprocess.Popen([sys.executable, "-c", _HOLDER, scratch], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    try:
        assert other.stdout is not None
        workdir = Path(other.stdout.readline().strip())
        assert workdir.name.startswith("imageprov-flash-4194399-") and workdir.is_dir()
        not_a_card = f"{tmp_path / 'not-a-card'}=D-1"
        first = imageprov_pki("flash", golden, "--pki", pki, "--target", not_a_card, "--scratch", scratch, check=False)
        assert first.returncode == 1 and "removed" not in first.stderr, first.stderr
        assert (workdir / "SN-1.data").is_file()
        other.kill()
        other.wait(60)
        second = imageprov_pki("flash", golden, "--pki", pki, "--target", not_a_card, "--scratch", scratch, check=False)
        assert f"note: removed {workdir}" in second.stderr, second.stderr
        assert not workdir.exists()
    finally:
        other.kill()
        other.wait(60)


# -- 3. a flash killed after writing: its pending certificate is stale, reported and revocable ----------------------

_E2FSCK_STOP = """#!/bin/sh
# e2fsck, stopped (SIGSTOP) the first time flash's verify runs it on the card: written and read back by then.
# imageprov names the filesystem LINK?offset=N, LINK a link to the device in a private directory.
for last; do :; done
if [ "$(readlink -f "${{last%%\\?*}}")" = "{card}" ] && [ ! -e "{mark}" ]; then
    echo $$ > "{mark}.new" && mv "{mark}.new" "{mark}"
    kill -STOP $$
fi
exec "{real}" "$@"
"""


def _stop_on_card(bin_dir: Path, card: Path, mark: Path) -> dict[str, str]:
    """An environment whose e2fsck stops on ``card``'s first check: the moment a card is written, not confirmed."""
    real = tool("sh", "-c", "command -v e2fsck").stdout.decode().strip()
    bin_dir.mkdir(exist_ok=True)
    spy = bin_dir / "e2fsck"
    spy.write_text(_E2FSCK_STOP.format(card=card, mark=mark, real=real))
    spy.chmod(0o755)
    return cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}{os.pathsep}{SBIN}")


def _delivered(card: Path, golden: Path, pki: Path, db: Db, device_id: str, tmp: Path) -> str:
    """The card holds the device's credentials (read with debugfs and openssl), under a certificate the registry
    (read with sqlite3 or psycopg) has as delivered; its serial."""
    on_card = check_card(card, golden, pki, device_id, tmp)
    assert db.rows(pki, f"SELECT device_id, status FROM certificates WHERE serial = '{on_card}'") == [
        (device_id, "active")
    ]
    return on_card


def _registry_check(pki: Path) -> dict[str, object]:
    proc = imageprov_pki("registry", "check", "--pki", pki, "--json")
    report: dict[str, object] = json.loads(proc.stdout)
    return report


def _stale_serials(pki: Path) -> list[str]:
    stale = _registry_check(pki)["stale"]
    assert isinstance(stale, list)
    return [str(entry["serial"]) for entry in stale]


def test_a_flash_killed_after_writing_leaves_a_stale_certificate_reported_and_revoked(
    tmp_path: Path, db: Db, loops: Loops, make_golden: Callable[..., Path]
) -> None:
    pki = _pki(tmp_path, db)
    golden = make_golden(Scheme.MBR, **SMALL)
    card = loops.card(golden.stat().st_size)
    mark = tmp_path / "written"
    station = subprocess.Popen(
        [*IMAGEPROV_ARGV, "flash", str(golden), "--pki", str(pki), "--target", f"{card}=K-1"],
        env=_stop_on_card(tmp_path / "bin", card, mark),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _poll(lambda: mark.exists() or station.poll() is not None, "the card written")
        assert station.poll() is None, "the station ended before its card was checked"
        [(serial, status)] = db.rows(pki, "SELECT serial, status FROM certificates WHERE device_id = 'K-1'")
        assert status == "pending"
        # At work: never stale, whatever asks.
        assert _stale_serials(pki) == []
        at_work = imageprov_pki("revoke", "--pki", pki, "--stale")
        assert at_work.stderr.strip() == "no stale pending certificates"
        assert db.rows(pki, "SELECT status FROM certificates WHERE device_id = 'K-1'") == [("pending",)]
        # Killed: no line-log entry, no delivery, no revocation of its own.
        os.killpg(station.pid, signal.SIGKILL)
        station.wait(60)
    finally:
        if station.poll() is None:
            os.killpg(station.pid, signal.SIGKILL)
            station.wait(60)
    assert check_card(card, golden, pki, "K-1", tmp_path) == serial  # the card holds it, and it verifies
    _poll(lambda: _stale_serials(pki) == [serial], "the certificate reported stale")
    report = _registry_check(pki)
    assert report["ok"] is True and any("revoke --pki PKI --stale" in str(n) for n in report["notes"]), report
    # The line's next start-up says so, flash and stamp alike.
    flash = imageprov_pki("flash", golden, "--pki", pki, "--target", f"{tmp_path / 'not-a-card'}=K-2", check=False)
    stamp = imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "K-3")
    for started in (flash, stamp):
        warning = next(line for line in started.stderr.splitlines() if line.startswith("warning: "))
        assert "1 pending certificate(s) of stations that are gone" in warning and f"K-1 (serial {serial}" in warning
        assert "imageprov revoke --pki PKI --stale" in warning
    revoked = imageprov_pki("revoke", "--pki", pki, "--stale")
    assert revoked.stderr.strip() == f"revoked K-1 serial {serial} (cessation-of-operation)"
    assert db.rows(pki, "SELECT status, reason FROM certificates WHERE device_id = 'K-1'") == [
        ("revoked", "cessation-of-operation")
    ]
    assert _stale_serials(pki) == []
    again = imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "K-3")
    assert "warning" not in again.stderr
    # Flashed again, the device gets a new certificate on its card.
    imageprov_pki("flash", golden, "--pki", pki, "--target", f"{card}=K-1")
    assert _delivered(card, golden, pki, db, "K-1", tmp_path) != serial


# -- 4. a registry that stops answering: the station stops within its deadline, and a rerun finishes -----------------


def _stamp_station(golden: Path, pki: Path, out: Path, ids: list[str], log: Path) -> subprocess.Popen[bytes]:
    argv = [*IMAGEPROV_ARGV, "stamp", str(golden), "--pki", str(pki), "--out", str(out)]
    for device_id in ids:
        argv += ["--device-id", device_id]
    with open(log, "w") as err:
        return subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _active(db: Db, pki: Path) -> int:
    [(count,)] = db.rows(pki, "SELECT COUNT(*) FROM certificates WHERE status = 'active' AND kind = 'device'")
    assert isinstance(count, int)
    return count


def _gives_up(station: subprocess.Popen[bytes]) -> float:
    """Seconds until ``station`` ends; a station that waits without bound fails the test."""
    began = time.monotonic()
    try:
        station.wait(timeout=BOUND)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the station still waits after {BOUND} s") from None
    return time.monotonic() - began


def test_stamp_stops_within_its_deadline_when_postgresql_stops_answering(
    tmp_path: Path, postgres: Postgres, make_golden: Callable[..., Path]
) -> None:
    db = Db.make("postgresql", postgres)
    pki = _pki(tmp_path, db, timeout=1)
    golden = make_golden(Scheme.MBR, **SMALL)
    out, log = tmp_path / "out", tmp_path / "stamp.log"
    ids = [f"P-{i:02d}" for i in range(40)]
    station = _stamp_station(golden, pki, out, ids, log)
    try:
        _poll(lambda: _active(db, pki) >= 3 or station.poll() is not None, "three devices delivered")
        assert station.poll() is None, "the batch ended before the database was stopped"
        with stopped(postgres):
            took = _gives_up(station)
    finally:
        if station.poll() is None:
            os.killpg(station.pid, signal.SIGKILL)
            station.wait(60)
    assert station.returncode == 1
    error = _the_error(log.read_text())
    assert "did not answer within 3 s" in error, error  # [registry] timeout 1 s, statement 2 s, this side 3 s
    assert took < 30, took
    print(f"stamp gave up {took:.1f} s after PostgreSQL stopped ([registry] timeout = 1: deadline 3 s)")
    # Nothing lost: once the database answers, the same command delivers every device, each once.
    rerun = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *(a for i in ids for a in ("--device-id", i)))
    assert rerun.returncode == 0, rerun.stderr
    _consistent(db, pki, out, ids)


def test_a_station_opening_a_stopped_postgresql_gives_up_at_its_connect_deadline(
    tmp_path: Path, postgres: Postgres
) -> None:
    db = Db.make("postgresql", postgres)
    pki = _pki(tmp_path, db, timeout=1)
    with stopped(postgres):
        began = time.monotonic()
        proc = imageprov_pki("device-cert", "--pki", pki, "--device-id", "C-1", "--out", tmp_path / "c1", check=False)
        took = time.monotonic() - began
    line = _one_error_line(proc, 1)
    assert "cannot connect to the registry" in line and "no answer within 2 s" in line, line
    assert took < 30 and not (tmp_path / "c1").exists()
    print(f"device-cert gave up {took:.1f} s after starting against a stopped PostgreSQL (connect deadline 2 s)")
    assert db.rows(pki, "SELECT COUNT(*) FROM certificates WHERE kind = 'device'") == [(0,)]


def test_flash_stops_within_its_deadline_when_postgresql_stops_before_its_card_is_confirmed(
    tmp_path: Path, postgres: Postgres, loops: Loops, make_golden: Callable[..., Path]
) -> None:
    db = Db.make("postgresql", postgres)
    pki = _pki(tmp_path, db, timeout=1)
    golden = make_golden(Scheme.MBR, **SMALL)
    card = loops.card(golden.stat().st_size)
    mark, log = tmp_path / "written", tmp_path / "flash.log"
    with open(log, "w") as err:
        station = subprocess.Popen(
            [*IMAGEPROV_ARGV, "flash", str(golden), "--pki", str(pki), "--target", f"{card}=F-1"],
            env=_stop_on_card(tmp_path / "bin", card, mark), stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    try:
        _poll(lambda: mark.exists() or station.poll() is not None, "the card written")
        blocked = int(mark.read_text())
        _poll(lambda: _stopped_state(blocked), "the card's check held")
        with stopped(postgres):
            os.kill(blocked, signal.SIGCONT)  # the card's check goes on; its delivery finds no answer
            took = _gives_up(station)
    finally:
        if station.poll() is None:
            os.killpg(station.pid, signal.SIGKILL)
            station.wait(60)
    assert station.returncode == 1
    error = _the_error(log.read_text())
    assert "did not answer within 3 s" in error and f"1 card(s) written and checked but not marked delivered: " \
        f"F-1 on {card}" in error, error  # fmt: skip
    assert took < 30, took
    print(f"flash gave up {took:.1f} s after PostgreSQL stopped ([registry] timeout = 1: deadline 3 s)")
    # The line log says what became of the card; its certificate stays pending, and is stale once the station ends.
    [entry] = [json.loads(line) for line in (pki / "line-log.jsonl").read_text().splitlines()]
    assert (entry["device_id"], entry["result"]) == ("F-1", "failed") and "not confirmed" in entry["error"]
    [(serial, status)] = db.rows(pki, "SELECT serial, status FROM certificates WHERE device_id = 'F-1'")
    assert status == "pending"
    _poll(lambda: _stale_serials(pki) == [serial], "the certificate reported stale")
    # Nothing lost: flashed again, the card gets a new certificate and the old one is revoked.
    again = imageprov_pki("flash", golden, "--pki", pki, "--target", f"{card}=F-1")
    assert f"revoked certificate {serial}" in again.stderr, again.stderr
    assert _delivered(card, golden, pki, db, "F-1", tmp_path) != serial


_LOCKER = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=600, isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # a process stopped while it holds the write lock
"""


def test_stamp_stops_within_its_deadline_when_a_stopped_process_holds_sqlite(
    tmp_path: Path, make_golden: Callable[..., Path]
) -> None:
    db = Db("sqlite")
    pki = _pki(tmp_path, db, timeout=1)
    golden = make_golden(Scheme.MBR, **SMALL)
    out, log = tmp_path / "out", tmp_path / "stamp.log"
    ids = [f"Q-{i:02d}" for i in range(60)]
    station = _stamp_station(golden, pki, out, ids, log)
    locker = None
    try:
        _poll(lambda: _active(db, pki) >= 3 or station.poll() is not None, "three devices delivered")
        assert station.poll() is None, "the batch ended before the registry was locked"
        locker = subprocess.Popen([sys.executable, "-c", _LOCKER, pki / "registry.sqlite"], stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        took = _gives_up(station)
    finally:
        if station.poll() is None:
            os.killpg(station.pid, signal.SIGKILL)
            station.wait(60)
        if locker is not None:
            locker.kill()
            locker.wait(60)
    assert station.returncode == 1
    error = _the_error(log.read_text())
    assert "is locked by another process" in error, error
    # Stopped at the first device that waited its second, not after one device after another did (a minute).
    assert took < 20, took
    print(f"stamp gave up {took:.1f} s after a stopped process locked the SQLite registry ([registry] timeout = 1)")
    rerun = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *(a for i in ids for a in ("--device-id", i)))
    assert rerun.returncode == 0, rerun.stderr
    _consistent(db, pki, out, ids)


# -- 5. what used to end in a traceback ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["device-cert", "--pki", "{pki}", "--device-id", "D-1", "--out", "{tmp}/d"],
        ["server-cert", "--pki", "{pki}", "--host", "edge.test", "--out", "{tmp}/s"],
        ["crl", "--pki", "{pki}", "--out", "{tmp}/crl.pem"],
        ["ca", "init", "{tmp}/new-pki", "--cn", "Another CA"],
    ],
    ids=["device-cert", "server-cert", "crl", "ca-init"],
)
def test_days_past_what_a_certificate_carries_is_one_line(tmp_path: Path, pki: Path, argv: list[str]) -> None:
    filled = [a.format(pki=pki, tmp=tmp_path) for a in argv]
    for days in ("99999999", "36501", "0"):
        line = _one_error_line(imageprov_pki(*filled, "--days", days, check=False), 2)
        assert "--days" in line, line
    assert not any((tmp_path / name).exists() for name in ("d", "s", "crl.pem", "new-pki"))


def test_the_library_refuses_days_no_date_can_hold(pki: Path) -> None:
    from imageprov.errors import UsageError
    from imageprov.pki.ca import CertificateAuthority, Subject, load_ca
    from imageprov.pki.revocation import build_crl
    from tests.conftest import PASSPHRASE

    ca = load_ca(pki, PASSPHRASE.encode())
    for call in (
        lambda: CertificateAuthority.create(Subject("X"), days=99999999),
        lambda: ca.issue_device("D-1", days=99999999),
        lambda: ca.issue_server(["edge.test"], days=99999999),
        lambda: build_crl(ca, [], number=1, days=99999999),
    ):
        with pytest.raises(UsageError, match="--days 99999999 is more than 36500"):
            call()


def test_an_unclosed_bracket_in_a_url_is_one_line(tmp_path: Path, pki: Path) -> None:
    url = "postgresql://u@[::1/x"
    line = _one_error_line(imageprov_pki("devices", "--pki", pki, "--registry", url, check=False), 2)
    assert "is not a valid URL" in line
    (pki / "imageprov.toml").write_text(f'[registry]\nurl = "{url}"\n')
    assert "is not a valid URL" in _one_error_line(imageprov_pki("devices", "--pki", pki, check=False), 2)
    (pki / "imageprov.toml").unlink()
    imageprov_pki("server-cert", "--pki", pki, "--host", "edge.test", "--out", tmp_path / "edge")
    nginx = ["edge", "nginx", "--pki", pki, "--server-cert", tmp_path / "edge"]
    for argv in (["--upstream", "https://[::1"], ["--upstream", "https://mender.test", "--accept", "http://[x"]):
        assert "is not a valid URL" in _one_error_line(imageprov(*nginx, *argv, check=False), 2)


@pytest.mark.parametrize(
    "content",
    [b'[registry]\nurl = "sqlite:r\xe9gistre.sqlite"\n', b"\xff\xfe[\x00r\x00"]
    + [f"[registry]\ntimeout = {t}\n".encode() for t in ("1e400", "nan", "inf", "-inf", "true", "0", "-1", "3601")],
    ids=["latin-1", "utf-16", "1e400", "nan", "inf", "-inf", "true", "0", "-1", "3601"],
)
def test_an_imageprov_toml_that_is_not_utf8_or_has_no_timeout_in_seconds_is_one_line(pki: Path, content: bytes) -> None:
    (pki / "imageprov.toml").write_bytes(content)
    line = _one_error_line(imageprov_pki("devices", "--pki", pki, check=False), 2)
    assert "is not UTF-8" in line or "[registry] timeout must be a number of seconds" in line, line


# -- 6. messages: no password, and the user's own file --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "host=db.lan password=S3cret-One dbname=imageprov",
        "host=db.lan password='S3cret One' dbname=imageprov",
        "user=x sslpassword=S3cret-One",
        "postgresql://u:S3cret-One@[::1/imageprov",
        "postgresql://db.lan/imageprov?pass%77ord=S3cret-One",
    ],
)
def test_a_password_in_a_registry_url_is_never_shown(tmp_path: Path, pki: Path, url: str) -> None:
    for argv in (["devices", "--pki", pki, "--registry", url], ["registry", "migrate", "--pki", pki, "--to", url]):
        proc = imageprov_pki(*argv, check=False)
        _one_error_line(proc, 2)
        assert "S3cret" not in proc.stderr + proc.stdout, proc.stderr
    (pki / "imageprov.toml").write_text(f"[registry]\nurl = {json.dumps(url)}\n")
    proc = imageprov_pki("devices", "--pki", pki, check=False)
    _one_error_line(proc, 2)
    assert "S3cret" not in proc.stderr + proc.stdout, proc.stderr


def test_cp_into_a_bare_image_names_the_users_file(tmp_path: Path) -> None:
    need("mke2fs")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_text("/dev/root / auto defaults 1 1\n")
    local = tmp_path / "hello.txt"
    local.write_text("hello\n")
    for name, path in (("rootfs.ext4", "/data/hello.txt"), ("rootfs.ext4", "/uboot/hello.txt"),
                       ("core-image.dataimg", "/etc/hello.txt")):  # fmt: skip
        image = tmp_path / name
        image.unlink(missing_ok=True)
        tool("mke2fs", "-q", "-t", "ext4", "-d", tree, image, "8M")
        before = image.read_bytes()
        line = _one_error_line(imageprov("cp", local, f"{image}:{path}", check=False), 2)
        assert line.startswith(f"imageprov: error: {image} is a bare filesystem image"), line
        assert ".partial" not in line and image.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
