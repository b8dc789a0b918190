"""Every check stamp makes before publishing an image refuses an image that fails it.

Each test runs the real CLI with a debugfs that plants one fault in the write
of the device's key and certificate (tests/spy.py), and expects: the device
failed with the check's name in its one line, no image under a final name, no
partial file, and the certificate revoked. A check removed from stamp makes
its test fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import IMAGEPROV_ARGV, cli_env, tool
from tests.spy import KEY_FILE, install_spy, spy_log


def _stamp(golden: Path, pki: Path, out: Path, bin_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = [*IMAGEPROV_ARGV, "stamp", str(golden), "--pki", str(pki), "--out", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def foreign(tmp_path: Path) -> tuple[Path, Path]:
    """A clientAuth certificate for dev-1 and its key, self-signed by openssl: not of our CA."""
    key, cert = tmp_path / "foreign.key", tmp_path / "foreign.pem"
    tool("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=dev-1", "-addext", "extendedKeyUsage=clientAuth", "-days", "30",
         "-keyout", key, "-out", cert)  # fmt: skip
    return cert, key


@pytest.mark.parametrize(
    ("fault", "checks"),
    [
        ("content", ["/mender/mender-cert.pem reads back as written"]),
        ("mode", ["/data/mender/mender-cert-private.pem is 0600 root:root"]),
        ("foreign-cert", ["certificate signed by the CA", "key matches the certificate"]),
        ("foreign-key", ["key matches the certificate"]),
        ("fsck", ["e2fsck -fn on data"]),
    ],
)
def test_stamp_refuses_an_image_that_fails_a_check(
    make_golden: Callable[..., Path],
    pki: Path,
    tmp_path: Path,
    foreign: tuple[Path, Path],
    fault: str,
    checks: list[str],
) -> None:
    golden = make_golden(Scheme.MBR)
    log = tmp_path / "spy.log"
    install_spy(tmp_path / "bin", "debugfs", log, fault=fault, foreign_cert=foreign[0], foreign_key=foreign[1])
    out = tmp_path / "out"
    proc = _stamp(golden, pki, out, tmp_path / "bin", "--device-id", "dev-1", "--json")
    assert [e["fault"] for e in spy_log(log) if e["action"] == "fault"] == [fault]  # the fault was planted once
    assert proc.returncode == 1, proc.stderr
    [outcome] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert outcome["device_id"] == "dev-1" and outcome["status"] == "failed"
    for check in checks:
        assert f"'{check}'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    print(f"\nuser sees: {proc.stderr.strip()}")
    assert list(out.iterdir()) == []
    records = json.loads(subprocess.run(
        [*IMAGEPROV_ARGV, "devices", "--pki", str(pki), "--json"],
        capture_output=True, text=True, env=cli_env(), check=True,
    ).stdout)  # fmt: skip
    assert [(r["device_id"], r["status"]) for r in records] == [("dev-1", "revoked")]


def test_the_spy_alone_changes_nothing(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    """Without a fault the same run stamps: the refusals above are the checks' doing."""
    golden = make_golden(Scheme.MBR)
    log = tmp_path / "spy.log"
    install_spy(tmp_path / "bin", "debugfs", log)
    proc = _stamp(golden, pki, tmp_path / "out", tmp_path / "bin", "--device-id", "dev-1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "stamped"
    assert any(e["action"] == "write" for e in spy_log(log))


@pytest.mark.parametrize("engine", ["debugfs", "mender-artifact"])
def test_temporary_key_files_are_private(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, engine: str
) -> None:
    """Every file handed to a tool with a key in it is 0600, in a directory only its owner can enter."""
    golden = make_golden(Scheme.MBR)
    log = tmp_path / "spy.log"
    install_spy(tmp_path / "bin", engine, log)
    if engine == "mender-artifact":
        install_spy(tmp_path / "bin", "debugfs", log)  # verify reads the image back with debugfs
    proc = _stamp(golden, pki, tmp_path / "out", tmp_path / "bin", "--device-id", "dev-1", "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    entries = spy_log(log)
    keys = [e for e in entries if e.get("target") == KEY_FILE or (e["action"] == "install" and "key" in e["source"])]
    assert keys, entries
    for entry in keys:
        assert (entry["mode"], entry["dir_mode"]) == ("0o600", "0o700"), entry
    dumps = [e for e in entries if e["action"] == "dump"]
    assert any(e["source"] == KEY_FILE for e in dumps), entries  # stamp reads the key back
    for entry in dumps:
        assert entry["dir_mode"] == "0o700", entry  # a dumped key lands where no one else can read it
