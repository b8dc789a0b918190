"""--server-ca: the edge's certificate or CA installed where the Mender client trusts it, and checked by verify.

Read back with debugfs (not imageprov's reader) and the real Mender client's
own configuration loader; the certificates are made with openssl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imageprov.disk.golden import Scheme
from tests.conftest import debugfs, imageprov, imageprov_pki, roles, tool
from tests.mender_client import client_config

SERVER_CERT = "/data/mender/server.crt"


def _openssl_cert(tmp_path: Path, name: str, days: str = "30", *extra: str) -> tuple[Path, Path]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    tool("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-subj", f"/CN={name}", "-days", days, *extra)  # fmt: skip
    return cert, key


def _data_file(image: Path, path: str) -> tuple[str, str]:
    """(stat, content) of a file on the data partition, with debugfs."""
    number = roles(image)["data"]
    inner = path.removeprefix("/data")
    return debugfs(image, number, f"stat {inner}"), debugfs(image, number, f"cat {inner}")


def _verify(image: Path, pki: Path, *args: str | Path) -> Any:
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--json", *args, check=False)
    return proc.returncode, json.loads(proc.stdout)


def _server_check(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if c["name"].startswith("server certificate the client trusts")]


def test_stamp_installs_the_edge_ca_and_the_client_reads_it(tmp_path: Path, make_golden: Any, pki: Path) -> None:
    golden = make_golden(Scheme.MBR)
    edge_ca = pki / "ca-cert.pem"
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "dev-1", "--server-ca", edge_ca)
    image = out / "dev-1.sdimg"
    stat, content = _data_file(image, SERVER_CERT)
    assert "Mode:  0644" in stat and "User:     0   Group:     0" in stat, stat
    assert content == edge_ca.read_text()
    _, conf = _data_file(image, "/data/mender/mender.conf")
    assert json.loads(conf)["ServerCertificate"] == SERVER_CERT
    # The rootfs conf is left as it was: the default conf target is the data partition.
    assert "ServerCertificate" not in imageprov("cat", f"{image}:/etc/mender/mender.conf").stdout
    # The real client takes ServerCertificate from the fallback conf.
    main, fallback = tmp_path / "main.conf", tmp_path / "fallback.conf"
    main.write_text(imageprov("cat", f"{image}:/etc/mender/mender.conf").stdout)
    fallback.write_text(conf)
    assert client_config(main, fallback, tmp_path)["ServerCertificate"] == SERVER_CERT

    code, report = _verify(image, pki, "--server-ca", edge_ca)
    assert code == 0, report
    assert [c["ok"] for c in _server_check(report)] == [True, True]
    assert report["client"]["rootfs-a"]["ServerCertificate"] == {
        "value": SERVER_CERT,
        "from": "/data/mender/mender.conf",
    }
    # Another certificate than the one installed: verify fails, naming it.
    other, _ = _openssl_cert(tmp_path, "other-edge")
    code, report = _verify(image, pki, "--server-ca", other)
    assert code != 0
    assert all(not c["ok"] and "lacks CN=other-edge" in c["detail"] for c in _server_check(report)), report


def test_rootfs_target_sets_it_in_the_rootfs_conf(tmp_path: Path, make_golden: Any, pki: Path) -> None:
    golden = make_golden(Scheme.GPT)
    bundle = tmp_path / "bundle.pem"
    edge, _ = _openssl_cert(tmp_path, "edge")
    bundle.write_text((pki / "ca-cert.pem").read_text() + edge.read_text())
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "dev-2", "--server-ca", bundle,
                  "--conf-target", "rootfs")  # fmt: skip
    image = out / f"dev-2{golden.suffix}"
    main = json.loads(imageprov("cat", f"{image}:/etc/mender/mender.conf").stdout)
    assert main["ServerCertificate"] == SERVER_CERT
    assert _data_file(image, SERVER_CERT)[1] == bundle.read_text()
    code, report = _verify(image, pki, "--server-ca", edge)
    assert code == 0, report


def test_prepare_installs_it_once_and_verify_without_the_option_reports_it(
    tmp_path: Path, make_golden: Any, pki: Path
) -> None:
    golden = make_golden(Scheme.MBR)
    edge, _ = _openssl_cert(tmp_path, "edge")
    imageprov("prepare", golden, "--server-ca", edge)
    assert _data_file(golden, SERVER_CERT)[1] == edge.read_text()
    again = imageprov("prepare", golden, "--server-ca", edge)
    assert "already prepared" in again.stderr
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "dev-3")
    code, report = _verify(out / "dev-3.sdimg", pki)
    assert code == 0, report
    assert all(c["ok"] and "CN=edge" in c["detail"] for c in _server_check(report)), report


def test_verify_fails_where_server_certificate_names_a_missing_file(
    tmp_path: Path, make_golden: Any, pki: Path
) -> None:
    golden = make_golden(Scheme.MBR)
    edge, _ = _openssl_cert(tmp_path, "edge")
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "dev-4", "--server-ca", edge)
    image = out / "dev-4.sdimg"
    tool("debugfs", "-w", "-R", "rm /mender/server.crt", f"{image}?offset={_offset(image)}")
    code, report = _verify(image, pki)
    assert code != 0
    assert all(not c["ok"] and "missing" in c["detail"] for c in _server_check(report)), report
    # --server-ca on an image without ServerCertificate: fails, saying so.
    plain = tmp_path / "plain"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", plain, "--device-id", "dev-5")
    code, report = _verify(plain / "dev-5.sdimg", pki, "--server-ca", edge)
    assert code != 0
    assert all("no ServerCertificate" in c["detail"] for c in _server_check(report)), report


def _expired_cert(tmp_path: Path) -> Path:
    """A self-signed certificate valid in January 2020 only (this openssl has no -not_after)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
            .not_valid_after(dt.datetime(2020, 2, 1, tzinfo=dt.UTC)).sign(key, hashes.SHA256()))  # fmt: skip
    path = tmp_path / "old.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _offset(image: Path) -> int:
    from tests.conftest import offset_of

    return offset_of(image, roles(image)["data"])


def test_refuses_a_key_a_non_certificate_and_an_expired_certificate(
    tmp_path: Path, make_golden: Any, pki: Path
) -> None:
    golden = make_golden(Scheme.MBR)
    edge, key = _openssl_cert(tmp_path, "edge")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    der = tmp_path / "edge.der"
    tool("openssl", "x509", "-in", edge, "-outform", "der", "-out", der)
    expired = _expired_cert(tmp_path)
    both = tmp_path / "both.pem"
    both.write_text(edge.read_text() + key.read_text())
    cases = {key: "holds a private key", both: "holds a private key", junk: "is not PEM certificate(s)",
             der: "(DER?)", expired: "expired 2020-02-01"}  # fmt: skip
    for path, said in cases.items():
        for argv in (("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "x"),
                     ("prepare", golden)):  # fmt: skip
            proc = imageprov_pki(*argv, "--server-ca", path, check=False)
            assert proc.returncode != 0 and said in proc.stderr, (argv[0], path.name, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # Nothing was stamped nor issued, and the golden image is as it was.
    assert not list((tmp_path / "out").glob("*.sdimg"))
    assert "server.crt" not in debugfs(golden, roles(golden)["data"], "ls /mender")


def test_the_mender_artifact_engine_installs_it_too(tmp_path: Path, make_golden: Any, pki: Path) -> None:
    from tests.conftest import need

    need("mender-artifact")
    golden = make_golden(Scheme.MBR)
    edge, _ = _openssl_cert(tmp_path, "edge")
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "ma-1", "--server-ca", edge,
                  "--engine", "mender-artifact")  # fmt: skip
    image = out / "ma-1.sdimg"
    stat, content = _data_file(image, SERVER_CERT)
    assert content == edge.read_text() and "Mode:  0644" in stat, stat
    code, report = _verify(image, pki, "--server-ca", edge)
    assert code == 0, report
