"""Crashes mid-batch and stations stamping at once: nothing lost, nothing delivered twice.

Results are read with sqlite3, debugfs and openssl (tests/oracle.py), not with
imageprov's own readers. A batch is killed at a moment the test has seen: the
station is stopped (SIGSTOP) once it has delivered some images and holds a
pending certificate for one not yet delivered, the state is read, then it is
killed. Nothing here depends on how long anything takes.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import IMAGEPROV_ARGV, cli_env, debugfs, imageprov_pki, roles, sha256, tool
from tests.oracle import KEY, check_device_image, registry, registry_rows, registry_sessions

# Generous: a batch here takes seconds; a loaded CI machine may take minutes.
BOUND = 600


def _stamp_argv(golden: Path, pki: Path, out: Path, ids: list[str]) -> list[str]:
    argv = [*IMAGEPROV_ARGV, "stamp", str(golden), "--pki", str(pki), "--out", str(out), "--json"]
    for device_id in ids:
        argv += ["--device-id", device_id]
    return argv


def _rows(pki: Path) -> list[tuple[str, str, str, str | None]]:
    """(device_id, serial, status, reason) of every device certificate, in the order issued."""
    return [(r["device_id"], r["serial"], r["status"], r["reason"]) for r in registry(pki).values()]


def _no_writer(pki: Path) -> bool:
    """True if no process holds the registry's write lock (a stopped one could not let it go)."""
    db = sqlite3.connect(pki / "registry.sqlite", timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


def _delivered(out: Path) -> list[str]:
    if not out.exists():
        return []
    return sorted(
        p.name.removesuffix(".sdimg") for p in out.iterdir() if p.name.endswith(".sdimg") and not p.name.startswith(".")
    )


def _stop_when(
    proc: subprocess.Popen[Any], pki: Path, out: Path, enough: Callable[[list[str], list[str]], bool]
) -> list[str]:
    """Stop the station's process group once ``enough(delivered, pending ids without an image)`` holds.

    Checked while it is stopped, so that what was seen is what is there; returns
    those pending ids. The poll interval only paces the polling.
    """
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the batch ended before the moment to stop it came"
        if (pki / "registry.sqlite").exists():
            os.killpg(proc.pid, signal.SIGSTOP)
            delivered = _delivered(out)
            pending = [d for d, _, status, _ in _rows(pki) if status == "pending" and d not in delivered]
            if _no_writer(pki) and enough(delivered, pending):
                return pending
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"no moment to stop the batch came within {BOUND} s")


def _check_consistent(pki: Path, out: Path, ids: list[str], tmp_path: Path, *, all_delivered: bool) -> None:
    """Every final image holds its device's one live certificate, checked with openssl; no live one without an image."""
    rows = _rows(pki)
    assert len({serial for _, serial, _, _ in rows}) == len(rows), "duplicate serials"
    for device_id in ids:
        image = out / f"{device_id}.sdimg"
        live = [serial for d, serial, status, _ in rows if d == device_id and status in ("active", "pending")]
        if image.exists():
            serial = check_device_image(image, device_id, pki, tmp_path, fsck_rootfs=False)
            assert live == [serial], (device_id, rows)
        else:
            assert not all_delivered, f"{device_id} was not delivered"
            assert [s for d, s, status, _ in rows if d == device_id and status == "active"] == [], device_id
    leftovers = [p.name for p in out.iterdir() if ".partial" in p.name]
    if all_delivered:
        assert leftovers == []
        assert all(status != "pending" for _, _, status, _ in rows)


@pytest.mark.parametrize("seed", [11, 33])
def test_sigkill_mid_batch_then_rerun(make_golden: Callable[..., Path], pki: Path, tmp_path: Path, seed: int) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    count = 12
    ids = [f"k{seed}-{i:02d}" for i in range(count)]
    argv = _stamp_argv(golden, pki, out, ids)
    at_least = random.Random(seed).randint(1, count // 2)
    proc = subprocess.Popen(
        argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        pending = _stop_when(proc, pki, out, lambda delivered, pending: len(delivered) >= at_least and bool(pending))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the station dies: imageprov and its debugfs
        proc.wait()
    delivered = _delivered(out)
    print(f"seed {seed}: {len(delivered)} of {count} delivered when killed; pending without an image: {pending}")
    assert 0 < len(delivered) < count
    _check_consistent(pki, out, ids, tmp_path, all_delivered=False)
    before = {serial: (d, status) for d, serial, status, _ in _rows(pki)}

    rerun = subprocess.run(argv, env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    status = {json.loads(line)["device_id"]: json.loads(line)["status"] for line in rerun.stdout.splitlines()}
    assert status == {i: "already-delivered" if i in delivered else "stamped" for i in ids}
    _check_consistent(pki, out, ids, tmp_path, all_delivered=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.sdimg" for i in ids)
    # Each certificate issued for an image the kill left unpublished was revoked as superseded, and only those.
    superseded = sorted(d for d, serial, st, reason in _rows(pki) if st == "revoked" and reason == "superseded")
    assert superseded == sorted(pending)
    assert all(before[serial][1] == "pending" for d, serial, st, reason in _rows(pki) if reason == "superseded")


def test_a_device_being_stamped_is_left_to_its_station(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    """A second station asked for a device the first one is building says so, and takes nothing from it."""
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    ids = [f"w-{i}" for i in range(6)]
    first = subprocess.Popen(
        _stamp_argv(golden, pki, out, ids), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        [busy, *_] = _stop_when(first, pki, out, lambda delivered, pending: bool(pending))
        second = subprocess.run(
            _stamp_argv(golden, pki, tmp_path / "out2", [busy]), env=cli_env(), capture_output=True, text=True,
            timeout=BOUND,
        )  # fmt: skip
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 1, second.stderr
    assert f"device {busy} is being stamped by another station" in second.stderr
    assert f"pid {first.pid}," in second.stderr  # the station named is the one at work
    assert not (tmp_path / "out2" / f"{busy}.sdimg").exists()
    _, errors = first.communicate(timeout=BOUND)
    assert first.returncode == 0, errors
    _check_consistent(pki, out, ids, tmp_path, all_delivered=True)


def _held(lease: Path) -> bool:
    """True if a live process holds the flock on a station's lease file (read here with fcntl, not imageprov)."""
    fd = os.open(lease, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _station(golden: Path, pki: Path, out: Path, ids: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _stamp_argv(golden, pki, out, ids), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def test_two_stations_at_once(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    """Two stations stamp overlapping ids into one directory, and are seen at work at the same time.

    The first is stopped while it holds its lease and pending certificates; the
    second must then issue certificates of its own (one that waited for the
    first to finish never would), and the first delivers its pending ones after
    that. Nothing here depends on how long anything takes.
    """
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    shared = [f"s-{i}" for i in range(6)]
    first = [f"a-{i}" for i in range(3)] + shared
    second = [f"b-{i}" for i in range(3)] + shared[::-1]
    station_a = _station(golden, pki, out, first)
    stations = [station_a]
    try:
        _stop_when(station_a, pki, out, lambda delivered, pending: bool(pending))
        held_by_a = {r["serial"]: r for r in registry_rows(pki) if r["status"] == "pending"}
        [session_a] = {r["session"] for r in held_by_a.values()}
        lease_a = pki / "registry.sqlite.leases" / f"{session_a}.lock"
        stations.append(station_b := _station(golden, pki, out, second))
        deadline = time.monotonic() + BOUND
        while not (by_b := [r for r in registry_rows(pki) if r["session"] not in (None, session_a)]):
            assert station_b.poll() is None, f"the second station ended without issuing: {station_b.communicate()}"
            assert time.monotonic() < deadline, f"the second station issued nothing within {BOUND} s"
            time.sleep(0.02)
        # The second station is at work while the first, stopped, still holds its lease and its certificates.
        assert _held(lease_a)
        now = {r["serial"]: r["status"] for r in registry_rows(pki)}
        assert {now[serial] for serial in held_by_a} == {"pending"}
    except BaseException:
        for station in stations:
            os.killpg(station.pid, signal.SIGKILL)  # a stopped one too
            station.wait()
        raise
    os.killpg(station_a.pid, signal.SIGCONT)
    for station in stations:
        _, errors = station.communicate(timeout=BOUND)
        # 1: a device the other station was at is left to it, and said so.
        assert station.returncode in (0, 1) and "Traceback" not in errors, errors
    [session_b] = {r["session"] for r in by_b}
    sessions = registry_sessions(pki)
    assert (sessions[session_a]["pid"], sessions[session_b]["pid"]) == (station_a.pid, station_b.pid)
    assert sessions[session_a]["ended_at"] and sessions[session_b]["ended_at"]
    # What the first station held when the second began, it delivered itself, after.
    after = {r["serial"]: r for r in registry_rows(pki)}
    assert {(after[s]["status"], after[s]["session"]) for s in held_by_a} == {("active", session_a)}
    everyone = sorted(set(first + second))
    _check_consistent(pki, out, everyone, tmp_path, all_delivered=False)
    # What one station could not do because the other was at it, a rerun finishes; nothing is done twice.
    for ids in (first, second):
        rerun = subprocess.run(_stamp_argv(golden, pki, out, ids), env=cli_env(), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
    _check_consistent(pki, out, everyone, tmp_path, all_delivered=True)
    assert sorted(d for d, _, status, _ in _rows(pki) if status == "active") == everyone


def test_keys_never_leak(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    env = cli_env(TMPDIR=str(private_tmp))
    argv = _stamp_argv(golden, pki, out, ["h-1", "h-2"])
    argv.insert(3, "--debug")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # A failing device's message, too.
    failing = subprocess.run(
        _stamp_argv(golden, pki, tmp_path / "out2", ["h-1"]), env=env, capture_output=True, text=True
    )
    assert failing.returncode == 1
    image = out / "h-1.sdimg"
    key = debugfs(image, roles(image)["data"], f"cat {KEY}")
    assert "PRIVATE KEY" in key
    body = [line for line in key.splitlines() if "PRIVATE KEY" not in line]
    for text in (proc.stdout, proc.stderr, failing.stdout, failing.stderr):
        assert "PRIVATE KEY" not in text
        assert not any(line in text for line in body)
    assert "debugfs" in proc.stderr  # --debug did log the commands
    assert list(private_tmp.iterdir()) == []  # temporary key files are gone
    ca_key = pki / "ca-private.key"
    assert ca_key.stat().st_mode & 0o077 == 0
    for image in out.iterdir():
        assert image.stat().st_mode & 0o077 == 0


def test_golden_image_is_opened_read_only(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    golden.chmod(0o444)
    before = sha256(golden)
    if os.geteuid() == 0:
        # Root ignores the mode; an immutable file refuses even root's writes.
        chattr = tool("chattr", "+i", golden, check=False)
        assert chattr.returncode == 0, f"chattr +i failed, so root could write the golden image: {chattr.stderr!r}"
    try:
        imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "ro-1")
    finally:
        if os.geteuid() == 0:
            tool("chattr", "-i", golden)
    assert sha256(golden) == before


def test_ctrl_c_as_a_scratch_file_is_made_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal lands after mkstemp made the file, before anyone knows its name: the batch's end still removes it."""
    import tempfile

    from imageprov.disk import copy

    real = tempfile.mkstemp

    def mkstemp_then_ctrl_c(*args: Any, **kwargs: Any) -> tuple[int, str]:
        made = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_ctrl_c)
    final = tmp_path / "imageprov-batch.sdimg"
    # The CLI runs with Python's handler; a test worker may have SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            copy.stage(final)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")] == []
    copy.discard_staged(final)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "not-recorded"])
def test_a_delivery_with_no_answer_keeps_the_image_for_the_rerun(
    tmp_path: Path, pki: Path, make_golden: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    """The registry stops answering as a device is recorded delivered: it may have committed (then the
    image is the only holder of a live certificate) or not. The image is kept either way, and the rerun
    settles it: the device is delivered once, with that image's certificate, and nothing else is live."""
    from imageprov.cli.pki import open_ca
    from imageprov.line.stamp import Batch, Failed, StampOptions
    from imageprov.pki.registry import Registry, RegistryTimeout

    golden, out = make_golden(Scheme.MBR), tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("IMAGEPROV_CA_PASSPHRASE", "test passphrase 1")
    real = Registry.deliver

    def no_answer(self: Registry, serial: str, where: str) -> Any:
        if recorded:
            real(self, serial, where)
        raise RegistryTimeout("the registry did not answer within 3 s")

    monkeypatch.setattr(Registry, "deliver", no_answer)
    with Registry(pki) as reg, Batch(golden, out, open_ca(pki, None), reg, StampOptions()) as batch:
        batch.prepare()
        [outcome] = list(batch.run(["lost-1"]))
    monkeypatch.undo()
    assert isinstance(outcome, Failed) and "kept for the rerun" in outcome.error, outcome
    [(_, serial, status, _)] = _rows(pki)
    assert status == ("active" if recorded else "pending")
    assert (out / "lost-1.sdimg").exists()

    rerun = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "lost-1", "--json")
    [line] = [json.loads(x) for x in rerun.stdout.splitlines()]
    assert (line["status"], line["serial"]) == ("already-delivered", serial), line
    assert _rows(pki) == [("lost-1", serial, "active", None)]
    assert check_device_image(out / "lost-1.sdimg", "lost-1", pki, tmp_path) == serial
