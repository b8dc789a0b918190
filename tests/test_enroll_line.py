"""The line's side of enrollment at first boot: ``stamp --enroll URL`` writes a bootstrap credential, no device key.

Judged with other tools: debugfs reads the files and their modes, openssl
verifies the bootstrap certificate and prints its policies, sqlite3 reads the
registry. ``verify`` passes such an image and fails each way one can go wrong
(a key left at the client's path, a device certificate for a bootstrap one,
another device's id, another CA, a conf that names a file key): each case
built so that only that check can fail it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import debugfs, imageprov, imageprov_pki, offset_of, roles, tool
from tests.flashdev import STALE, Loops, loop_devices, read_span
from tests.flashdev import debugfs as flash_debugfs
from tests.oracle import registry_rows, stat

URL = "https://edge.example.com/.well-known/est"
ENROLL = "/imageprov/enroll"
KEY_URI = "pkcs11:token=imageprov;object=mender;type=private?pin-source=file:/data/imageprov/token/pin"
BOOTSTRAP_POLICY = "2.25.61864386891722231090998972135304672076"


def _stamp(golden: Path, pki: Path, out: Path, *ids: str, extra: tuple[str, ...] = (),
           check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    id_args = [arg for device_id in ids for arg in ("--device-id", device_id)]
    return imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *id_args, "--json", *extra, check=check)


def _enrolled(golden: Path, pki: Path, out: Path, *ids: str, extra: tuple[str, ...] = ()) -> list[dict[str, str]]:
    proc = _stamp(golden, pki, out, *ids, extra=("--enroll", URL, *extra))
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _verify(image: Path, pki: Path, device_id: str) -> dict[str, object]:
    proc = imageprov_pki("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", device_id, "--json", check=False)
    report: dict[str, object] = json.loads(proc.stdout)
    assert (proc.returncode == 0) == report["ok"], proc.stderr
    return report


def _failed(report: dict[str, object]) -> list[str]:
    return [str(c["name"]) for c in report["checks"] if not c["ok"]]  # type: ignore[attr-defined, index]


def _debugfs_w(image: Path, commands: str, tmp_path: Path) -> None:
    script = tmp_path / "debugfs-commands"
    script.write_text(commands)
    tool("debugfs", "-w", "-f", script, f"{image}?offset={offset_of(image, roles(image)['data'])}")


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


PROGRAM = Path(__file__).resolve().parent.parent / "yocto" / "meta-imageprov" / "files" / "imageprov-enroll"


def with_program(image: Path) -> Path:
    """``image`` with the layer's imageprov-enroll in its root filesystems, as IMAGEPROV_ENROLL builds it."""
    imageprov("cp", PROGRAM, f"{image}:/usr/sbin/imageprov-enroll", "--mode", "0755")
    return image


@pytest.fixture
def golden(make_golden: Callable[..., Path]) -> Path:
    return with_program(make_golden(Scheme.MBR))


def test_stamp_enroll_writes_a_bootstrap_credential_and_no_device_key(golden: Path, pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lines = _enrolled(golden, pki, out, "E-1", "E-2")
    assert [(line["device_id"], line["status"]) for line in lines] == [("E-1", "stamped"), ("E-2", "stamped")]
    for line in lines:
        image, device_id = Path(line["image"]), line["device_id"]
        data = roles(image)["data"]
        # No key, no certificate at the client's paths: the device makes its key and writes what the edge gives.
        listing = debugfs(image, data, "ls -l /mender")
        assert "mender-cert-private.pem" not in listing and "mender-cert.pem" not in listing
        assert stat(image, data, f"{ENROLL}/bootstrap-key.pem") == ("0600", "0", "0")
        for name in ("bootstrap-cert.pem", "fleet-ca.pem", "enroll.conf"):
            assert stat(image, data, f"{ENROLL}/{name}") == ("0644", "0", "0")
        cert, key = tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key"
        cert.write_text(debugfs(image, data, f"cat {ENROLL}/bootstrap-cert.pem"))
        key.write_text(debugfs(image, data, f"cat {ENROLL}/bootstrap-key.pem"))
        verified = tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", "-purpose", "sslclient", cert)
        assert b": OK" in verified.stdout
        text = tool("openssl", "x509", "-in", cert, "-noout", "-text").stdout.decode()
        assert "X509v3 Certificate Policies: critical" in text and f"Policy: {BOOTSTRAP_POLICY}" in text
        assert f"CN = {device_id}" in text or f"CN={device_id}" in text
        pub = tool("openssl", "x509", "-in", cert, "-noout", "-pubkey").stdout
        assert tool("openssl", "pkey", "-in", key, "-pubout").stdout == pub
        assert debugfs(image, data, f"cat {ENROLL}/fleet-ca.pem") == (pki / "ca-cert.pem").read_text()
        conf = dict(
            line.split("=", 1) for line in debugfs(image, data, f"cat {ENROLL}/enroll.conf").splitlines() if "=" in line
        )
        assert (conf["EST_URL"], conf["DEVICE_ID"], conf["KEY_URI"]) == (URL, device_id, KEY_URI)
        assert debugfs(image, data, "cat /mender/imageprov-device-id") == f"{device_id}\n"
        # The client loads the token's key through the pkcs11 engine, for TLS and for signing its auth requests.
        fallback = json.loads(debugfs(image, data, "cat /mender/mender.conf"))
        assert fallback["HttpsClient"] == {"Certificate": "/data/mender/mender-cert.pem", "Key": KEY_URI,
                                           "SSLEngine": "pkcs11"}  # fmt: skip
        assert fallback["Security"] == {"AuthPrivateKey": KEY_URI, "SSLEngine": "pkcs11"}
        for number in (data, roles(image)["rootfs-a"]):
            assert tool("e2fsck", "-fn", f"{image}?offset={offset_of(image, number)}", check=False).returncode == 0
        report = _verify(image, pki, device_id)
        assert report["ok"] and report["kind"] == "bootstrap", _failed(report)
    rows = {row["device_id"]: row for row in registry_rows(pki)}
    for line in lines:
        row = rows[line["device_id"]]
        assert (row["kind"], row["status"], row["serial"]) == ("bootstrap", "active", line["serial"])
        assert row["delivered_to"] == line["image"]


def test_a_rerun_finds_the_enrolling_images_delivered(golden: Path, pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    [first] = _enrolled(golden, pki, out, "R-1")
    [again] = _enrolled(golden, pki, out, "R-1")
    assert (again["status"], again["serial"]) == ("already-delivered", first["serial"])
    assert len(registry_rows(pki)) == 1


def test_one_kind_of_credential_per_device(golden: Path, pki: Path, tmp_path: Path) -> None:
    """A device stamped with its key is refused --enroll (and the other way round) unless --reissue, which
    revokes the other credential: never two live for one device, one of them in an image no one will use."""
    _stamp(golden, pki, tmp_path / "keyed", "K-1")
    refused = _stamp(golden, pki, tmp_path / "enrolled", "K-1", extra=("--enroll", URL), check=False)
    assert refused.returncode == 1
    assert "K-1 already has a device certificate" in refused.stderr and "--reissue" in refused.stderr
    assert [(r["kind"], r["status"]) for r in registry_rows(pki)] == [("device", "active")]
    [line] = _enrolled(golden, pki, tmp_path / "enrolled", "K-1", extra=("--reissue",))
    rows = registry_rows(pki)
    assert [(r["kind"], r["status"], r["reason"]) for r in rows] == [
        ("device", "revoked", "superseded"), ("bootstrap", "active", None)]  # fmt: skip
    assert rows[1]["serial"] == line["serial"]
    # The listing's columns hold the longer kind too.
    listed = [
        (line[25:34].strip(), line[35:43].strip())
        for line in imageprov_pki("devices", "--pki", pki).stdout.splitlines()
    ]
    assert listed == [("device", "revoked"), ("bootstrap", "active")]
    back = _stamp(golden, pki, tmp_path / "keyed-again", "K-1", check=False)
    assert back.returncode == 1 and "K-1 already has a bootstrap certificate" in back.stderr


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--enroll", "http://edge.example.com/.well-known/est"), "is not an https URL"),
        (("--enroll", "https://edge.example.com/est?x=1"), "without spaces, query or fragment"),
        (("--enroll", "https://u:SECRET@edge.example.com/est"), "holds a user or password"),
        (("--enroll", "https://[::1/est"), "is not a URL"),
        (("--enroll", URL, "--auth-key", "device"), "--enroll signs auth requests with the token's key"),
        (("--enroll", URL, "--engine", "mender-artifact"), "--enroll writes with debugfs only"),
    ],
)
def test_bad_enroll_options_are_one_line_and_nothing_made(
    golden: Path, pki: Path, tmp_path: Path, extra: tuple[str, ...], said: str
) -> None:
    proc = _stamp(golden, pki, tmp_path / "out", "B-1", extra=extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert said in proc.stderr and "Traceback" not in proc.stderr and "SECRET" not in proc.stderr
    assert registry_rows(pki) == [] and list((tmp_path / "out").iterdir()) == []


def test_a_golden_image_without_the_program_is_refused_before_anything_is_issued(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    proc = _stamp(make_golden(Scheme.MBR), pki, tmp_path / "out", "N-1", extra=("--enroll", URL), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "/usr/sbin/imageprov-enroll on rootfs-a" in proc.stderr and "IMAGEPROV_ENROLL" in proc.stderr
    assert registry_rows(pki) == []


def test_enroll_conf_trusts_the_edge_as_the_prepared_image_does(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    """A golden image prepared with --server-ca (or the layer's IMAGEPROV_SERVER_CA), stamped without it: the
    device enrolls trusting the edge by the same file as its client."""
    golden = with_program(make_golden(Scheme.MBR))
    imageprov_pki("prepare", golden, "--server-ca", pki / "ca-cert.pem")
    [line] = _enrolled(golden, pki, tmp_path / "out", "S-1")
    conf = debugfs(Path(line["image"]), roles(golden)["data"], f"cat {ENROLL}/enroll.conf")
    assert "\nSERVER_CA=/data/mender/server.crt\n" in conf
    assert _verify(Path(line["image"]), pki, "S-1")["ok"]


def test_bootstrap_validity_defaults_to_its_own(golden: Path, pki: Path, tmp_path: Path) -> None:
    _enrolled(golden, pki, tmp_path / "out", "D-1")
    [row] = registry_rows(pki)
    days = (_date(row["not_after"]) - _date(row["not_before"])).days
    assert days == 730, days
    [longer] = _enrolled(golden, pki, tmp_path / "out2", "D-2", extra=("--days", "30"))
    row = next(r for r in registry_rows(pki) if r["serial"] == longer["serial"])
    assert (_date(row["not_after"]) - _date(row["not_before"])).days == 30


def _date(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# -- verify: each way an enrolling image can be wrong ------------------------------------------------------------


@pytest.fixture
def enrolling(golden: Path, pki: Path, tmp_path: Path) -> Path:
    [line] = _enrolled(golden, pki, tmp_path / "out", "V-1")
    return Path(line["image"])


def _conf_without_engine(image: Path, tmp_path: Path) -> str:
    conf = json.loads(debugfs(image, roles(image)["data"], "cat /mender/mender.conf"))
    conf["HttpsClient"] = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}
    conf["Security"] = {"AuthPrivateKey": "/data/mender/mender-cert-private.pem"}
    local = tmp_path / "mender.conf"
    local.write_text(json.dumps(conf))
    return f"rm /mender/mender.conf\nwrite {local} /mender/mender.conf\n"


def _no_security_engine(conf: dict[str, Any]) -> None:
    del conf["Security"]["SSLEngine"]


def _conf_edit(image: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    conf = json.loads(debugfs(image, roles(image)["data"], "cat /mender/mender.conf"))
    edit(conf)
    local = tmp_path / "edited-mender.conf"
    local.write_text(json.dumps(conf))
    return f"rm /mender/mender.conf\nwrite {local} /mender/mender.conf\n"


def _replace(path: str, content: bytes, tmp_path: Path, mode: str = "0100644") -> str:
    local = tmp_path / path.replace("/", "_")
    local.write_bytes(content)
    return f"rm {path}\nwrite {local} {path}\nsif {path} mode {mode}\n"


def _edit_conf(image: Path, tmp_path: Path, old: str, new: str) -> str:
    text = debugfs(image, roles(image)["data"], f"cat {ENROLL}/enroll.conf")
    assert old in text
    return _replace(f"{ENROLL}/enroll.conf", text.replace(old, new).encode(), tmp_path)


def _other_ca_cert(tmp_path: Path) -> bytes:
    other = tmp_path / "other-pki"
    imageprov_pki("ca", "init", other, "--cn", "Other CA")
    return (other / "ca-cert.pem").read_bytes()


def _device_cert_instead(pki: Path, tmp_path: Path) -> str:
    """A device certificate and key for V-1 in place of the bootstrap ones: chain, CN, key all good; no policy."""
    imageprov_pki("device-cert", "--pki", pki, "--device-id", "V-1", "--out", tmp_path / "dev")
    cert = (tmp_path / "dev" / "mender-cert.pem").read_bytes()
    key = (tmp_path / "dev" / "mender-cert-private.pem").read_bytes()
    return _replace(f"{ENROLL}/bootstrap-cert.pem", cert, tmp_path) + _replace(
        f"{ENROLL}/bootstrap-key.pem", key, tmp_path, "0100600"
    )


TAMPERED: dict[str, tuple[Callable[[Path, Path, Path], str], str]] = {
    "a key left at the client's path": (
        lambda image, pki, t: _replace("/mender/mender-cert-private.pem", b"not used\n", t, "0100600"),
        "/data/mender/mender-cert-private.pem absent"),
    "a certificate left at the client's path": (
        lambda image, pki, t: _replace("/mender/mender-cert.pem", b"x\n", t), "/data/mender/mender-cert.pem absent"),
    "the conf names a file key": (lambda image, pki, t: _conf_without_engine(image, t), "the conf names a file key"),
    "another CA to check the edge's answer by": (
        lambda image, pki, t: _replace(f"{ENROLL}/fleet-ca.pem", _other_ca_cert(t), t),
        "/data/imageprov/enroll/fleet-ca.pem is the CA"),
    "another device's id to enroll as": (
        lambda image, pki, t: _edit_conf(image, t, "DEVICE_ID=V-1", "DEVICE_ID=V-2"),
        "/data/imageprov/enroll/enroll.conf names the certificate's CN"),
    "an enrollment over plain http": (
        lambda image, pki, t: _edit_conf(image, t, "https://", "http://"), "enrollment URL is https"),
    "a token store from an enrolled device": (
        lambda image, pki, t: "mkdir /imageprov/token\n", "/data/imageprov/token absent"),
    "an enroll.conf without the token's directory": (
        lambda image, pki, t: _edit_conf(image, t, "TOKEN_DIR=/data/imageprov/token\n", ""),
        "/data/imageprov/enroll/enroll.conf as imageprov writes it"),
    "enrolling trusts another edge certificate than the client": (
        lambda image, pki, t: _edit_conf(image, t, "SERVER_CA=\n", "SERVER_CA=/data/other.crt\n"),
        "enrollment trusts the edge as the client does"),
    "no program to enroll": (lambda image, pki, t: "", "/usr/sbin/imageprov-enroll"),
    "the auth key without its engine": (lambda image, pki, t: _conf_edit(image, t, _no_security_engine),
                                        "auth key loaded through pkcs11"),
    "a bootstrap key readable by all": (
        lambda image, pki, t: f"sif {ENROLL}/bootstrap-key.pem mode 0100644\n",
        "/data/imageprov/enroll/bootstrap-key.pem is 0600 root:root"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TAMPERED))
def test_verify_fails_an_enrolling_image_gone_wrong(enrolling: Path, pki: Path, tmp_path: Path, case: str) -> None:
    tamper, check = TAMPERED[case]
    if case == "no program to enroll":
        for role in ("rootfs-a", "rootfs-b"):
            fs = f"{enrolling}?offset={offset_of(enrolling, roles(enrolling)[role])}"
            tool("debugfs", "-w", "-R", "rm /usr/sbin/imageprov-enroll", fs)
    else:
        _debugfs_w(enrolling, tamper(enrolling, pki, tmp_path), tmp_path)
    report = _verify(enrolling, pki, "V-1")
    if check == "the conf names a file key":  # on both rootfs: the block and the auth key
        expected = [f"{name} on {role}" for role in ("rootfs-a", "rootfs-b")
                    for name in ("auth requests signed with the certificate's key", "mender.conf")]  # fmt: skip
    elif check in (
        "enrollment trusts the edge as the client does",
        "/usr/sbin/imageprov-enroll",
        "auth key loaded through pkcs11",
    ):  # each rootfs
        expected = [f"{check} ({role})" if "trusts" in check else f"{check} on {role}"
                    for role in ("rootfs-a", "rootfs-b")]  # fmt: skip
    else:
        expected = [check]
    assert _failed(report) == expected, _failed(report)


def test_verify_fails_a_device_certificate_as_the_bootstrap_one(enrolling: Path, pki: Path, tmp_path: Path) -> None:
    _debugfs_w(enrolling, _device_cert_instead(pki, tmp_path), tmp_path)
    assert _failed(_verify(enrolling, pki, "V-1")) == ["certificate is a bootstrap certificate (enrollment only)"]


def test_verify_fails_a_bootstrap_certificate_as_the_device_one(golden: Path, pki: Path, tmp_path: Path) -> None:
    """A device image whose certificate is a bootstrap one: the edge refuses it on every device route."""
    [line] = json.loads("[" + _stamp(golden, pki, tmp_path / "out", "W-1").stdout.strip() + "]")
    image = Path(line["image"])
    [boot] = _enrolled(golden, pki, tmp_path / "boot", "W-2")
    data = roles(Path(boot["image"]))["data"]
    cert = debugfs(Path(boot["image"]), data, f"cat {ENROLL}/bootstrap-cert.pem").encode()
    key = debugfs(Path(boot["image"]), data, f"cat {ENROLL}/bootstrap-key.pem").encode()
    commands = _replace("/mender/mender-cert.pem", cert, tmp_path) + _replace(
        "/mender/mender-cert-private.pem", key, tmp_path, "0100600"
    )
    commands += _replace("/mender/imageprov-device-id", b"W-2\n", tmp_path)
    _debugfs_w(image, commands, tmp_path)
    assert _failed(_verify(image, pki, "W-2")) == ["certificate is no bootstrap certificate"]


# -- flash --------------------------------------------------------------------------------------------------------


def test_flash_enroll_writes_a_card_that_enrolls(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, loops: Loops
) -> None:
    """The same credential on a card (a loop device), the bootstrap certificate delivered to it; a second card
    for the id is refused as a clone would be."""
    golden = with_program(make_golden(Scheme.GPT, rootfs_mib=16, data_mib=16))
    first, second = loops.card(golden.stat().st_size), loops.card(golden.stat().st_size)
    proc = imageprov_pki("flash", golden, "--pki", pki, "--json", "--enroll", URL, "--target", f"{first}=F-1")
    [result] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert result["result"] == "delivered"
    data = roles(golden)["data"]
    listing = flash_debugfs(first, data, "ls -l /mender")
    assert "mender-cert-private.pem" not in listing and "mender-cert.pem" not in listing
    assert "Mode:  0600" in flash_debugfs(first, data, f"stat {ENROLL}/bootstrap-key.pem")
    report = _verify(first, pki, "F-1")
    assert report["ok"] and report["kind"] == "bootstrap" and report["serial"] == result["serial"], _failed(report)
    [row] = registry_rows(pki)
    assert (row["kind"], row["status"], row["serial"]) == ("bootstrap", "active", result["serial"])
    assert str(row["delivered_to"]).startswith(f"card {first}: ")
    again = imageprov_pki("flash", golden, "--pki", pki, "--enroll", URL, "--target", f"{second}=F-1", check=False)
    assert again.returncode == 1 and "already delivered" in again.stderr
    assert read_span(second, 0, 1 << 20) == bytes([STALE]) * (1 << 20)
