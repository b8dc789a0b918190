"""stamp: one verified image per device, checked with debugfs, e2fsck, openssl and mender-artifact."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import DEFAULT_MENDER_CONF, Scheme
from tests.conftest import (
    debugfs,
    imageprov,
    imageprov_pki,
    need,
    offset_of,
    partition_bytes,
    roles,
    sha256,
    tool,
)
from tests.oracle import check_device_image

KEY = "/mender/mender-cert-private.pem"
CERT = "/mender/mender-cert.pem"
FIXTURES = Path(__file__).parent.parent / "fixtures"
HTTPS_CLIENT = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}


def _stamp(
    golden: Path, pki: Path, out: Path, ids: list[str], *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    id_args = [arg for device_id in ids for arg in ("--device-id", device_id)]
    return imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *id_args, *extra, check=check)


def _rootfs_confs(image: Path) -> list[dict[str, object]]:
    layout = roles(image)
    return [json.loads(debugfs(image, layout[r], "cat /etc/mender/mender.conf")) for r in ("rootfs-a", "rootfs-b")]


def test_stamp_on_every_layout(golden: Path, pki: Path, tmp_path: Path) -> None:
    before = sha256(golden)
    out = tmp_path / "out"
    proc = _stamp(golden, pki, out, ["dev-0001", "dev-0002"], "--server-url", "https://edge.example.com", "--json",
                  "--conf-target", "rootfs")  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["device_id"] for line in lines] == ["dev-0001", "dev-0002"]
    assert {line["status"] for line in lines} == {"stamped"}
    assert sha256(golden) == before, "the golden image was modified"
    for line in lines:
        image = Path(line["image"])
        assert image == out / f"{line['device_id']}{golden.suffix}"
        assert image.stat().st_mode & 0o777 == 0o600
        check_device_image(image, line["device_id"], pki, tmp_path)
        for conf in _rootfs_confs(image):
            # Every other key kept, in order; ServerURL set; HttpsClient added last.
            assert list(conf) == [*DEFAULT_MENDER_CONF, "HttpsClient", "Security"]
            assert conf["ServerURL"] == "https://edge.example.com"
            assert conf["RootfsPartA"] == DEFAULT_MENDER_CONF["RootfsPartA"]
            assert conf["HttpsClient"] == HTTPS_CLIENT
        # Sparse: the output allocates about what the golden image does.
        assert image.stat().st_blocks <= golden.stat().st_blocks + 2048
    assert sorted(p.name for p in out.iterdir()) == [f"dev-0001{golden.suffix}", f"dev-0002{golden.suffix}"]
    records = json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)
    assert {(r["device_id"], r["status"]) for r in records} == {("dev-0001", "active"), ("dev-0002", "active")}
    assert {r["serial"] for r in records} == {line["serial"] for line in lines}
    assert all(r["delivered_to"] for r in records)
    # Our own verify agrees.
    for line in lines:
        imageprov("verify", line["image"], "--ca", pki / "ca-cert.pem", "--device-id", line["device_id"])


@pytest.mark.datafiles(FIXTURES / "mender.conf.production")
def test_production_conf_keeps_its_keys(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, datafiles: Path
) -> None:
    original = (datafiles / "mender.conf.production").read_text()
    golden = make_golden(Scheme.GPT, mender_conf=original)
    # Its ServerCertificate, as meta-mender's recipes installed it with this conf: the stamp and verify
    # check that the file it names is there.
    for role in ("rootfs-a", "rootfs-b"):
        number = roles(golden)[role]
        tool("debugfs", "-w", "-R", f"write {pki / 'ca-cert.pem'} /etc/mender/server.crt",
             f"{golden}?offset={offset_of(golden, number)}")  # fmt: skip
    proc = imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "p1",
                         "--conf-target", "rootfs")  # fmt: skip
    assert "replaced HttpsClient" in proc.stderr and "SSLEngine" in proc.stderr
    for conf in _rootfs_confs(tmp_path / "out/p1.uefiimg"):
        expected = json.loads(original)
        expected["HttpsClient"] = HTTPS_CLIENT
        expected["Security"] = {"AuthPrivateKey": HTTPS_CLIENT["Key"]}
        assert conf == expected and list(conf) == list(expected)
    report = imageprov("verify", tmp_path / "out/p1.uefiimg", "--ca", pki / "ca-cert.pem", "--json").stdout
    trusted = [c for c in json.loads(report)["checks"] if c["name"].startswith("server certificate the client")]
    assert [(c["ok"], "/etc/mender/server.crt" in c["detail"]) for c in trusted] == [(True, True)] * 2, trusted


def test_two_spaces_and_the_mender_conf_rendering(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    conf = '{"ServerURL":"https://a","TenantToken":"t","HttpsClient":{"Certificate":"/x","Key":"/x"},"Z":1}'
    golden = make_golden(Scheme.MBR, mender_conf=conf)
    proc = imageprov_pki(
        "stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "d1", "--tenant-token", "TOKEN",
        "--conf-target", "rootfs",
    )  # fmt: skip
    assert "replaced HttpsClient" in proc.stderr
    image = tmp_path / "out/d1.sdimg"
    text = debugfs(image, roles(image)["rootfs-b"], "cat /etc/mender/mender.conf")
    assert text == (
        '{\n  "ServerURL": "https://a",\n  "TenantToken": "TOKEN",\n  "HttpsClient": {\n'
        '    "Certificate": "/data/mender/mender-cert.pem",\n    "Key": "/data/mender/mender-cert-private.pem"\n'
        '  },\n  "Z": 1,\n  "Security": {\n    "AuthPrivateKey": "/data/mender/mender-cert-private.pem"\n  }\n}\n'
    )


def test_conf_target_data_leaves_rootfs_byte_identical(golden: Path, pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    imageprov_pki(
        "stamp",
        golden,
        "--pki",
        pki,
        "--out",
        out,
        "--device-id",
        "d1",
        "--conf-target",
        "data",
    )
    image = out / f"d1{golden.suffix}"
    layout = roles(image)
    for rootfs in ("rootfs-a", "rootfs-b"):
        assert partition_bytes(image, layout[rootfs]) == partition_bytes(golden, layout[rootfs])
    fallback = json.loads(debugfs(image, layout["data"], "cat /mender/mender.conf"))
    # --server-url is refused here: the rootfs conf sets ServerURL, and wins (tests/test_real_builds.py).
    assert fallback == {"HttpsClient": HTTPS_CLIENT, "Security": {"AuthPrivateKey": HTTPS_CLIENT["Key"]}}
    check_device_image(image, "d1", pki, tmp_path)
    imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", "d1")


@pytest.mark.parametrize("scheme", [Scheme.MBR, Scheme.GPT], ids=["mbr", "gpt"])
def test_mender_artifact_engine_gives_the_same_result(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, scheme: Scheme
) -> None:
    need("mender-artifact")
    golden = make_golden(scheme)
    before = sha256(golden)
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "ma-1", "--engine", "mender-artifact",
                  "--conf-target", "rootfs")  # fmt: skip
    assert sha256(golden) == before
    image = out / f"ma-1{golden.suffix}"
    check_device_image(image, "ma-1", pki, tmp_path)
    for conf in _rootfs_confs(image):
        assert conf["HttpsClient"] == HTTPS_CLIENT
    # The upstream tool reads back what it wrote.
    cat = tool("mender-artifact", "cat", f"{image}:/data/mender/mender-cert.pem")
    assert cat.stdout.decode() == debugfs(image, roles(image)["data"], f"cat {CERT}")


def test_mender_artifact_engine_refuses_extended_partitions_cleanly(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    need("mender-artifact")
    golden = make_golden(Scheme.MBR_EXTENDED)
    out = tmp_path / "out"
    proc = imageprov_pki(
        "stamp", golden, "--pki", pki, "--out", out, "--device-id", "x1", "--engine", "mender-artifact", check=False
    )
    assert proc.returncode == 1 and "x1" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []
    records = json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)
    assert [(r["status"], r["reason"]) for r in records] == [("revoked", "cessation-of-operation")]


def test_device_ids_file_and_csv(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    plain = tmp_path / "ids.txt"
    plain.write_text("# line 3\nSN-1\n\nSN-2\n")
    table = tmp_path / "ids.csv"
    table.write_text("batch,device_id,note\n7,SN-3,a\n7,SN-4,b\n")
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-ids", plain)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-ids", table)
    assert sorted(p.name for p in out.iterdir()) == [f"SN-{i}.sdimg" for i in range(1, 5)]


@pytest.mark.parametrize("bad", ["a/b", "..", "with space", 'quo"te', "ünï", "x" * 300, "a\\b", ""])
def test_bad_ids_are_refused_before_any_work(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, bad: str
) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    proc = imageprov_pki(
        "stamp", golden, "--pki", pki, "--out", out, "--device-id", "ok-1", "--device-id", bad, check=False
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "device id" in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []
    assert json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout) == []


def test_duplicate_ids_are_refused(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    proc = imageprov_pki(
        "stamp", golden, "--pki", pki, "--out", tmp_path / "o", "--device-id", "a", "--device-id", "a", check=False
    )
    assert proc.returncode == 2 and "twice" in proc.stderr


def test_a_failing_device_does_not_stop_the_others(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    imageprov_pki("device-cert", "--pki", pki, "--device-id", "taken", "--out", tmp_path / "elsewhere")
    out = tmp_path / "out"
    proc = _stamp(golden, pki, out, ["first", "taken", "last"], "--json", check=False)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(line["device_id"], line["status"]) for line in lines] == [
        ("first", "stamped"),
        ("taken", "failed"),
        ("last", "stamped"),
    ]
    assert "taken" in proc.stderr and "--reissue" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["first.sdimg", "last.sdimg"]


def test_rerun_finishes_what_an_interruption_left(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "d1", "--device-id", "d2")
    delivered = sha256(out / "d1.sdimg")
    db = sqlite3.connect(pki / "registry.sqlite")
    # d2: killed after the rename, before the registry said "active".
    db.execute("UPDATE certificates SET status = 'pending' WHERE device_id = 'd2'")
    db.commit()
    # d3: killed after issuing, before the image got its final name.
    imageprov_pki("device-cert", "--pki", pki, "--device-id", "d3", "--out", tmp_path / "scratch")
    db.execute("UPDATE certificates SET status = 'pending' WHERE device_id = 'd3'")
    db.commit()
    proc = imageprov_pki(
        "stamp",
        golden,
        "--pki",
        pki,
        "--out",
        out,
        "--device-id",
        "d1",
        "--device-id",
        "d2",
        "--device-id",
        "d3",
        "--json",
    )
    status = {json.loads(line)["device_id"]: json.loads(line)["status"] for line in proc.stdout.splitlines()}
    assert status == {"d1": "already-delivered", "d2": "already-delivered", "d3": "stamped"}
    assert sha256(out / "d1.sdimg") == delivered
    rows = db.execute("SELECT device_id, status, reason FROM certificates ORDER BY rowid").fetchall()
    assert rows == [
        ("d1", "active", None),
        ("d2", "active", None),
        ("d3", "revoked", "superseded"),
        ("d3", "active", None),
    ]
    check_device_image(out / "d3.sdimg", "d3", pki, tmp_path)


def test_output_over_the_golden_image_is_refused(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR, name="dev-1.sdimg")
    before = sha256(golden)
    proc = imageprov_pki("stamp", golden, "--pki", pki, "--out", golden.parent, "--device-id", "dev-1", check=False)
    assert proc.returncode == 2 and "golden" in proc.stderr
    assert sha256(golden) == before


def test_stamp_leaves_no_partial_files(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.GPT)
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "g1", "--device-id", "g2")
    assert sorted(p.name for p in out.iterdir()) == ["g1.uefiimg", "g2.uefiimg"]
