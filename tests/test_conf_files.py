"""The data partition's mender.conf as a file (its mode and owner), and the state script that rewrites it.

Read back with debugfs. meta-mender installs both confs 0600 (they may hold a
tenant token): one that prepare or stamp creates is 0600 root:root, one that
was there keeps its mode and owner. meta-mender's mender-migrate-configuration
(an ArtifactCommit state script) rewrites the data conf on the device keeping
only RootfsPartA/B: verify warns where the image holds it, prepare notes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from imageprov.disk.golden import DEFAULT_MENDER_CONF, Scheme
from imageprov.mender.conf import CLIENT_CERT, CLIENT_KEY
from tests.conftest import imageprov, imageprov_pki, offset_of, roles, tool
from tests.test_conf_client_rules import put_file, read_file

BLOCK = {"Certificate": CLIENT_CERT, "Key": CLIENT_KEY}
MIGRATE = "ArtifactCommit_Enter_10_migrate-configuration"
# Not meta-mender's script: what matters of it here, that it writes the
# persistent conf through mender-persistent.conf and keeps two keys.
MIGRATE_TEXT = b"""#!/bin/sh
jq '{RootfsPartA, RootfsPartB}' /etc/mender/mender.conf > /data/mender/mender-persistent.conf
mv /data/mender/mender-persistent.conf /data/mender/mender.conf
"""
CHECK = "mender-migrate-configuration state script"


def _stat(image: Path, role: str, path: str) -> tuple[str, int, int]:
    """Mode (octal, 4 digits), uid and gid of ``path``, as debugfs reads them."""
    out = tool("debugfs", "-R", f"stat {path}", f"{image}?offset={offset_of(image, roles(image)[role])}").stdout
    text = out.decode()
    mode = re.search(r"Mode:\s+(\d+)", text)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    assert mode and owner, text
    return mode.group(1), int(owner.group(1)), int(owner.group(2))


def test_a_data_conf_prepare_creates_is_0600_root(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR)  # one conf in the rootfs, none on the data partition
    assert read_file(image, "data", "/mender/mender.conf") is None
    imageprov("prepare", image)
    assert _stat(image, "data", "/mender/mender.conf") == ("0600", 0, 0)
    conf = json.loads(read_file(image, "data", "/mender/mender.conf") or b"")
    assert conf["HttpsClient"] == BLOCK


def test_a_data_conf_stamp_creates_is_0600_root(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.GPT)
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "m-1")
    assert _stat(out / "m-1.uefiimg", "data", "/mender/mender.conf") == ("0600", 0, 0)


def test_a_data_conf_that_was_there_keeps_its_mode_and_owner(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.MBR)
    put_file(image, "data", "/mender/mender.conf", b'{"ServerURL": "https://d"}', tmp_path, 0o640, (0, 990))
    imageprov("prepare", image)
    assert _stat(image, "data", "/mender/mender.conf") == ("0640", 0, 990)
    assert json.loads(read_file(image, "data", "/mender/mender.conf") or b"")["HttpsClient"] == BLOCK


def _stamped(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> Path:
    golden = make_golden(Scheme.MBR, mender_conf=json.dumps(DEFAULT_MENDER_CONF))
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "w-1")
    return tmp_path / "out" / "w-1.sdimg"


def _checks(image: Path, pki: Path) -> tuple[int, dict[str, dict[str, object]]]:
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--json", check=False)
    return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def test_verify_warns_of_the_migrate_script_where_the_client_keeps_artifact_scripts(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    image = _stamped(make_golden, pki, tmp_path)
    code, checks = _checks(image, pki)
    assert code == 0 and CHECK not in checks
    # /var/lib/mender/scripts: where the client keeps the scripts of the artifact it installed.
    put_file(image, "data", f"/mender/scripts/{MIGRATE}", MIGRATE_TEXT, tmp_path, 0o755)
    code, checks = _checks(image, pki)
    assert code == 0, checks  # a warning, not a failure
    warning = checks[CHECK]
    assert warning["ok"] and warning["warning"]
    detail = str(warning["detail"])
    assert detail.startswith(f"/data/mender/scripts/{MIGRATE}: ") and "keeping only RootfsPartA/B" in detail
    text = imageprov("verify", image, "--ca", pki / "ca-cert.pem").stdout
    assert f"warn  {CHECK}  (/data/mender/scripts/{MIGRATE}: " in text


def test_verify_finds_the_migrate_script_by_what_it_does_under_another_name(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    image = _stamped(make_golden, pki, tmp_path)
    put_file(image, "rootfs-a", "/etc/mender/scripts/ArtifactCommit_Enter_01_site", MIGRATE_TEXT, tmp_path, 0o755)
    put_file(image, "rootfs-b", "/etc/mender/scripts/Idle_Enter_01_other", b"#!/bin/sh\nexit 0\n", tmp_path, 0o755)
    code, checks = _checks(image, pki)
    assert code == 0
    assert str(checks[CHECK]["detail"]).startswith("/etc/mender/scripts on rootfs-a/ArtifactCommit_Enter_01_site: ")


def test_other_state_scripts_give_no_warning(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    image = _stamped(make_golden, pki, tmp_path)
    put_file(image, "data", "/mender/scripts/ArtifactCommit_Enter_50_wait", b"#!/bin/sh\nexit 0\n", tmp_path, 0o755)
    put_file(image, "data", "/mender/scripts/version", b"3", tmp_path, 0o644)
    code, checks = _checks(image, pki)
    assert code == 0 and CHECK not in checks


def test_prepare_notes_the_migrate_script_when_it_writes_the_data_conf(
    make_golden: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_golden(Scheme.MBR)
    put_file(image, "data", f"/mender/scripts/{MIGRATE}", MIGRATE_TEXT, tmp_path, 0o755)
    proc = imageprov("prepare", image)
    assert f"note: /data/mender/scripts/{MIGRATE}: meta-mender's mender-migrate-configuration" in proc.stderr
    # Written to the rootfs confs, the block is out of the script's reach: no note.
    other = make_golden(Scheme.MBR, "other.sdimg")
    put_file(other, "data", f"/mender/scripts/{MIGRATE}", MIGRATE_TEXT, tmp_path, 0o755)
    assert "migrate-configuration" not in imageprov("prepare", other, "--conf-target", "rootfs").stderr
