"""The device side of zero-touch acceptance: the client signs auth requests with its certificate's key.

mender.conf gets Security.AuthPrivateKey (merged like HttpsClient, other Security keys kept), unless
--auth-key device; verify checks that the signing key is the certificate's. Images are read back with debugfs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from imageprov.errors import ImageprovError
from imageprov.mender.conf import CLIENT_KEY, AuthKey, Settings, merge
from tests.conftest import debugfs, imageprov, imageprov_pki, roles

AGENT_KEY = "/data/mender/mender-agent.pem"


def test_merge_adds_the_auth_key_and_keeps_other_security_keys() -> None:
    text = json.dumps({"Security": {"SSLEngine": "pkcs11", "AuthPrivateKey": AGENT_KEY, "Other": 1}, "Z": 1}).encode()
    merged = merge(text, Settings(), "m")
    value = json.loads(merged.text)
    # The engine goes with the key it loaded: the C++ client (4.x) would ask it to load the file's path.
    assert value["Security"] == {"AuthPrivateKey": CLIENT_KEY, "Other": 1}
    assert list(value) == ["Security", "Z", "HttpsClient"] and merged.replaced_auth_key == AGENT_KEY
    assert merge(merged.text, Settings(), "m").text == merged.text  # idempotent


def test_auth_key_device_leaves_security_alone() -> None:
    assert "Security" not in json.loads(merge(b"{}", Settings(auth_key=AuthKey.DEVICE), "m").text)
    kept = json.loads(merge(b'{"Security": {"AuthPrivateKey": "/x"}}', Settings(auth_key=AuthKey.DEVICE), "m").text)
    assert kept["Security"] == {"AuthPrivateKey": "/x"}


@pytest.mark.parametrize("security", ["[]", '"x"', "1"])
def test_security_that_is_not_an_object_is_refused(security: str) -> None:
    with pytest.raises(ImageprovError, match="Security"):
        merge(f'{{"Security": {security}}}'.encode(), Settings(), "m")


def _conf(image: Path, role: str, path: str = "/etc/mender/mender.conf") -> dict[str, object]:
    inner = path.removeprefix("/data") if role == "data" else path
    value: dict[str, object] = json.loads(debugfs(image, roles(image)[role], f"cat {inner}"))
    return value


def _verify_failures(image: Path, pki: Path, *extra: str) -> set[str]:
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--json", *extra, check=False)
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0)
    return {c["name"] for c in report["checks"] if not c["ok"]}


@pytest.fixture
def golden_with_security(make_golden: Callable[..., Path], tmp_path: Path) -> Path:
    golden = make_golden(Scheme.MBR)
    conf = tmp_path / "mender.conf"
    conf.write_text(json.dumps({"ServerURL": "https://x", "Security": {"SSLEngine": "pkcs11",
                                                                       "AuthPrivateKey": AGENT_KEY}}))  # fmt: skip
    imageprov("cp", conf, f"{golden}:/etc/mender/mender.conf")
    return golden


def test_stamp_sets_the_auth_key_on_both_rootfs(golden_with_security: Path, pki: Path, tmp_path: Path) -> None:
    proc = imageprov_pki("stamp", golden_with_security, "--pki", pki, "--out", tmp_path / "out", "--device-id", "s-1",
                         "--conf-target", "rootfs")  # fmt: skip
    assert f"replaced Security.AuthPrivateKey {AGENT_KEY}" in proc.stderr
    image = tmp_path / "out" / "s-1.sdimg"
    for role in ("rootfs-a", "rootfs-b"):
        assert _conf(image, role)["Security"] == {"AuthPrivateKey": CLIENT_KEY}
    assert _verify_failures(image, pki) == set()


def test_stamp_into_the_data_fallback(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.GPT)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "s-2",
                  "--conf-target", "data")  # fmt: skip
    image = next((tmp_path / "out").iterdir())
    assert _conf(image, "data", "/data/mender/mender.conf")["Security"] == {"AuthPrivateKey": CLIENT_KEY}
    assert "Security" not in _conf(image, "rootfs-a")
    assert _verify_failures(image, pki) == set()


def test_data_fallback_refused_when_rootfs_overrides_the_auth_key(
    golden_with_security: Path, pki: Path, tmp_path: Path
) -> None:
    proc = imageprov_pki("prepare", golden_with_security, "--conf-target", "data", check=False)
    assert proc.returncode == 2 and "Security" in proc.stderr and AGENT_KEY in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_auth_key_device(golden_with_security: Path, pki: Path, tmp_path: Path) -> None:
    imageprov_pki("stamp", golden_with_security, "--pki", pki, "--out", tmp_path / "out", "--device-id", "s-3",
                  "--auth-key", "device", "--conf-target", "rootfs")  # fmt: skip
    image = tmp_path / "out" / "s-3.sdimg"
    assert _conf(image, "rootfs-a")["Security"] == {"SSLEngine": "pkcs11", "AuthPrivateKey": AGENT_KEY}
    assert _verify_failures(image, pki, "--auth-key", "device") == set()
    # Checked for an accepting edge, the same image fails: the client signs with another key.
    failed = _verify_failures(image, pki)
    assert failed == {f"auth requests signed with the certificate's key on {r}" for r in ("rootfs-a", "rootfs-b")}


def test_verify_says_when_no_auth_key_is_set(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "s-4",
                  "--auth-key", "device")  # fmt: skip
    image = tmp_path / "out" / "s-4.sdimg"
    assert "Security" not in _conf(image, "rootfs-a")
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", check=False)
    assert proc.returncode == 1 and "no Security.AuthPrivateKey" in proc.stdout
