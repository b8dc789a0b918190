"""mender.conf keys as the Mender client reads them: without regard to case, the rootfs conf over the data conf.

The real client (Debian's mender-client 3.4) is the oracle: for every case,
what ``imageprov verify`` reports that the client uses (ServerURL, the
certificate, the key and the auth key) must be what the client loads from the
same two files, read back out of the image. An image whose conf holds one key
in two spellings is refused by prepare and stamp (nothing written) and fails
verify, because the Go client (3.x) and the C++ client (4.x, 5.x) read such a
file differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from imageprov.disk.golden import DEFAULT_MENDER_CONF, Scheme
from imageprov.mender.conf import (
    CLIENT_CERT,
    CLIENT_KEY,
    MenderConfError,
    Settings,
    conflicts,
    effective,
    fold,
    lookup,
    merge,
    parse,
)
from imageprov.pki.ca import CertificateAuthority, Subject
from tests.conftest import imageprov, imageprov_pki, need, offset_of, roles, sha256, tool
from tests.mender_client import client_config

BLOCK = {"Certificate": CLIENT_CERT, "Key": CLIENT_KEY}
PARTS = {"RootfsPartA": "/dev/mmcblk0p2", "RootfsPartB": "/dev/mmcblk0p3"}
ROOTFS = "/etc/mender/mender.conf"
DATA = "/data/mender/mender.conf"


# -- the rules, on parsed files ----------------------------------------------


def test_fold_is_ascii_case_only() -> None:
    assert fold("HttpsClient") == fold("HTTPSCLIENT") == fold("httpsclient") == "httpsclient"
    # Only ASCII letters fold (C++: std::tolower on bytes); others stay as they are.
    assert fold("ÆØÅ") == "ÆØÅ" and fold("\u017f") == "\u017f"


def test_lookup_takes_any_spelling() -> None:
    conf = parse(b'{"serverUrl": "u", "HTTPSCLIENT": {"kEy": "k"}}', "m")
    assert lookup(conf, "ServerURL") == "u" and lookup(lookup(conf, "HttpsClient"), "Key") == "k"
    assert lookup(conf, "TenantToken") is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b'{"ServerURL": "a", "ServerUrl": "b"}', 'holds "ServerURL" and "ServerUrl", one key'),
        (b'{"HttpsClient": {"Key": "a"}, "httpsclient": {"Certificate": "b"}}', '"HttpsClient" and "httpsclient"'),
        (b'{"httpsclient": {"Key": "a", "KEY": "b"}}', 'holds "HttpsClient.Key" and "HttpsClient.KEY"'),
        (b'{"SECURITY": {"authprivatekey": "a", "AuthPrivateKey": "b"}}', '"Security.authprivatekey" and'),
        (b'{"TenantToken": "a", "TenantToken": "b"}', 'holds the key "TenantToken" twice'),
        (b'{"Connectivity": {"DisableKeepAlive": true, "DisableKeepAlive": false}}', '"DisableKeepAlive" twice'),
        (b'{"\\u017ferverURL": "https://x"}', 'which the Mender client 3.x reads as "serverURL" and 4.x and later'),
        (b'{"HttpsClient": {"\\u212aey": "/k"}}', 'reads as "HttpsClient.key"'),
        (b'{"ServerURL": 5}', "has a ServerURL that is a JSON int, not a string"),
        (b'{"httpsclient": {"key": ["/k"]}}', "has a HttpsClient.Key that is a JSON list, not a string"),
        (b'{"security": {"AUTHPRIVATEKEY": {}}}', "has a Security.AuthPrivateKey that is a JSON dict"),
        (b'{"security": "/k"}', "has a Security that is not an object"),
    ],
)
def test_what_the_clients_read_apart_is_refused(text: bytes, needle: str) -> None:
    with pytest.raises(MenderConfError) as info:
        merge(text, Settings(), "/etc/mender/mender.conf on rootfs-a")
    assert info.value.message.startswith("/etc/mender/mender.conf on rootfs-a ")
    assert needle in info.value.message and "\n" not in str(info.value), info.value.message


def test_two_spellings_where_we_touch_nothing_are_kept() -> None:
    # Neither client reads these as one of our keys; the merge writes them back as they were.
    text = b'{"Custom": {"a": 1, "A": 2}, "ServerURL": "u"}'
    assert json.loads(merge(text, Settings(), "m").text)["Custom"] == {"a": 1, "A": 2}


def test_merge_writes_menders_spelling_in_place_of_the_files() -> None:
    text = b'{"serverurl": "https://old", "httpsclient": {"certificate": "/old.pem"}, "x": 1, ' \
           b'"SECURITY": {"sslengine": "e", "authprivatekey": "/old-key.pem"}, "tenanttoken": "t"}'  # fmt: skip
    merged = merge(text, Settings(server_url="https://new"), "m")
    value = json.loads(merged.text)
    # Same places, Mender's spelling for what is set; a key not set keeps its spelling.
    assert list(value) == ["ServerURL", "HttpsClient", "x", "Security", "tenanttoken"]
    assert value["ServerURL"] == "https://new" and value["HttpsClient"] == BLOCK
    assert value["Security"] == {"AuthPrivateKey": CLIENT_KEY}  # the engine goes with the key it loaded
    assert merged.replaced == {"certificate": "/old.pem"} and merged.replaced_auth_key == "/old-key.pem"
    again = merge(merged.text, Settings(server_url="https://new"), "m")
    assert not again.changed and again.text == merged.text


def test_our_block_in_another_spelling_is_respelled_not_reported_as_replaced() -> None:
    merged = merge(
        json.dumps({"HTTPSCLIENT": {"certificate": CLIENT_CERT, "KEY": CLIENT_KEY}}).encode(), Settings(), "m"
    )
    assert merged.changed and merged.replaced is None
    assert json.loads(merged.text)["HttpsClient"] == BLOCK and b"HTTPSCLIENT" not in merged.text


def test_effective_matches_keys_without_regard_to_case() -> None:
    fallback = {"serverurl": "https://f", "HTTPSCLIENT": {"certificate": "/f/c", "KEY": "/f/k"}, "Other": 1}
    main = {"ServerUrl": "https://m", "httpsClient": {"Key": "/m/k", "certificate": None}, "OTHER": 2}
    assert effective(main, fallback) == {
        "ServerURL": "https://m",
        "HttpsClient": {"Certificate": "/f/c", "Key": "/m/k"},
        "Other": 2,  # a key we do not know keeps the first file's spelling
    }


def test_conflicts_see_any_spelling_in_the_rootfs_conf() -> None:
    settings = Settings(server_url="https://edge")
    assert conflicts({"serverUrl": "https://old"}, settings) == ['serverUrl: "https://old"']
    assert conflicts({"SERVERURL": "https://edge"}, settings) == []
    assert conflicts({"httpsclient": {"key": "/x"}}, Settings()) == ['httpsclient: {"key": "/x"}']
    assert conflicts({"servers": [{"serverurl": "x"}]}, settings) == [
        "Servers (the client refuses ServerURL beside it)"
    ]


# -- the real client: the rules themselves ----------------------------------


def _client(tmp_path: Path, main: bytes, fallback: bytes | None) -> dict[str, Any]:
    main_path, fallback_path = tmp_path / "main.conf", tmp_path / "fallback.conf"
    main_path.write_bytes(main)
    fallback_path.unlink(missing_ok=True)
    if fallback is not None:
        fallback_path.write_bytes(fallback)
    return client_config(main_path, fallback_path, tmp_path)


def test_the_go_client_merges_a_key_written_twice(tmp_path: Path) -> None:
    """Why two spellings are refused: 3.x merges the two objects, where 4.x and later keep only the last."""
    twice = b'{"HttpsClient": {"Certificate": "/a", "Key": "/b"}, "httpsclient": {"Certificate": "/c"}}'
    seen = _client(tmp_path, twice, None)
    assert seen["HttpsClient"] == {"Certificate": "/c", "Key": "/b"}
    assert _client(tmp_path, b'{"ServerURL": "https://a", "serverurl": "https://b"}', None)["ServerURL"] == "https://b"


def test_the_go_client_takes_a_long_s_for_an_s(tmp_path: Path) -> None:
    """Why a long s or a Kelvin sign is refused: 3.x reads them as s and k, 4.x and later do not."""
    seen = _client(tmp_path, b'{"\\u017ferverURL": "https://long-s", "HttpsClient": {"\\u212aey": "/k"}}', None)
    assert (seen["ServerURL"], seen["HttpsClient"]["Key"]) == ("https://long-s", "/k")


def test_the_go_client_loads_nothing_for_a_key_of_another_type(tmp_path: Path) -> None:
    need("mender")
    (tmp_path / "main.conf").write_text('{"ServerURL": 5}')
    (tmp_path / "fallback.conf").write_text('{"ServerURL": "https://fallback"}')
    (tmp_path / "data").mkdir()
    proc = tool("mender", "--config", tmp_path / "main.conf", "--fallback-config", tmp_path / "fallback.conf",
                "--data", tmp_path / "data", "--log-level", "debug", "--no-syslog", "show-artifact",
                check=False)  # fmt: skip
    out = proc.stdout.decode() + proc.stderr.decode()
    assert "cannot unmarshal number" in out and "Loaded configuration = " not in out


# -- the real client and verify, on images -----------------------------------


def _ca_cert(tmp_path: Path) -> Path:
    path = tmp_path / "ca-cert.pem"
    if not path.exists():
        cert = CertificateAuthority.create(Subject("Conf Rules CA")).cert
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _debugfs_w(image: Path, role: str, commands: str, tmp_path: Path) -> None:
    script = tmp_path / "debugfs-script"
    script.write_text(commands)
    proc = tool("debugfs", "-w", "-f", script, f"{image}?offset={offset_of(image, roles(image)[role])}")
    errors = [line for line in proc.stderr.decode().splitlines()
              if line and not line.startswith("debugfs ") and "File not found by ext2_lookup" not in line
              and "directory already exists" not in line]  # fmt: skip
    assert not errors, errors


def put_file(image: Path, role: str, path: str, content: bytes, tmp_path: Path, mode: int = 0o600,
             owner: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
    """Write ``path`` (inside the partition) with debugfs, replacing what was there, its parents made."""
    source = tmp_path / "debugfs-source"
    source.write_bytes(content)
    parents = [str(p) for p in reversed(Path(path).parents) if str(p) != "/"]
    commands = [*(f"mkdir {p}" for p in parents), f"rm {path}", f"write {source} {path}"]
    commands += [f"sif {path} mode 0100{mode:o}", f"sif {path} uid {owner[0]}", f"sif {path} gid {owner[1]}"]
    _debugfs_w(image, role, "\n".join(commands) + "\n", tmp_path)


def read_file(image: Path, role: str, path: str) -> bytes | None:
    proc = tool("debugfs", "-R", f"cat {path}", f"{image}?offset={offset_of(image, roles(image)[role])}", check=False)
    return proc.stdout if b"File not found" not in proc.stderr else None


def _golden(
    make_golden: Callable[..., Path], tmp_path: Path, rootfs: bytes, data: bytes | None, name: str = "golden.sdimg"
) -> Path:
    image = make_golden(Scheme.MBR, name, mender_conf=rootfs.decode())
    if data is not None:
        put_file(image, "data", "/mender/mender.conf", data, tmp_path)
    return image


def _verify(image: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    proc = imageprov("verify", image, "--ca", _ca_cert(tmp_path), "--json", *extra, check=False)
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0)
    return report


def _client_of_image(image: Path, tmp_path: Path) -> dict[str, Any]:
    """What the real client loads from the image's rootfs A conf over its data conf."""
    main = read_file(image, "rootfs-a", "/etc/mender/mender.conf")
    assert main is not None
    return _client(tmp_path, main, read_file(image, "data", "/mender/mender.conf"))


def _agree(image: Path, tmp_path: Path) -> dict[str, str]:
    """verify's view of what the client uses on each rootfs, checked against the real client's; returned."""
    seen = _client_of_image(image, tmp_path)
    real = {
        "ServerURL": seen["ServerURL"],
        "HttpsClient.Certificate": seen["HttpsClient"]["Certificate"],
        "HttpsClient.Key": seen["HttpsClient"]["Key"],
        "Security.AuthPrivateKey": seen["Security"]["AuthPrivateKey"],
    }
    client = _verify(image, tmp_path)["client"]
    assert set(client) == {"rootfs-a", "rootfs-b"}
    for view in client.values():
        assert {name: used["value"] for name, used in view.items()} == real
    return real


def _conf(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2).encode()


# (rootfs conf, data conf, what the client uses, where each comes from)
AGREEMENT = {
    "rootfs ServerUrl over data ServerURL": (
        {**PARTS, "ServerUrl": "https://rootfs"},
        {"ServerURL": "https://data", "HttpsClient": BLOCK, "Security": {"AuthPrivateKey": CLIENT_KEY}},
        ("https://rootfs", CLIENT_CERT, CLIENT_KEY, CLIENT_KEY),
        (ROOTFS, DATA, DATA, DATA),
    ),
    "lower-case block in the rootfs, field by field": (
        {**DEFAULT_MENDER_CONF, "httpsclient": {"KEY": "/etc/mender/rootfs-key.pem"}},
        {"HttpsClient": {"Certificate": "/data/c.pem", "Key": "/data/k.pem"}, "security": {"authPrivateKey": "/a"}},
        ("https://mender.example.com", "/data/c.pem", "/etc/mender/rootfs-key.pem", "/a"),
        (ROOTFS, DATA, ROOTFS, DATA),
    ),
    "upper case in the rootfs alone": (
        {
            **PARTS,
            "SERVERURL": "https://up",
            "HTTPSCLIENT": {"CERTIFICATE": "/r/c", "KEY": "/r/k"},
            "SECURITY": {"AUTHPRIVATEKEY": "/r/a"},
        },
        None,
        ("https://up", "/r/c", "/r/k", "/r/a"),
        (ROOTFS, ROOTFS, ROOTFS, ROOTFS),
    ),
    "mixed case in the data conf alone": (
        PARTS,
        {
            "serverURL": "https://d",
            "httpsClient": {"certificate": "/d/c", "key": "/d/k"},
            "Security": {"authprivatekey": "/d/a"},
        },
        ("https://d", "/d/c", "/d/k", "/d/a"),
        (DATA, DATA, DATA, DATA),
    ),
    "null in the rootfs leaves the data conf's": (
        {**PARTS, "ServerUrl": None, "HttpsClient": {"key": None, "Certificate": "/r/c"}},
        {"serverurl": "https://d", "HTTPSCLIENT": {"Key": "/d/k", "Certificate": "/d/c"}},
        ("https://d", "/r/c", "/d/k", ""),
        (DATA, ROOTFS, DATA, None),
    ),
    "an empty string in the rootfs wins": (
        {**PARTS, "serverurl": ""},
        {"ServerURL": "https://d"},
        ("", "", "", ""),
        (ROOTFS, None, None, None),
    ),
}


@pytest.mark.parametrize(("rootfs", "data", "values", "sources"), AGREEMENT.values(), ids=AGREEMENT.keys())
def test_verify_reports_what_the_real_client_uses(
    make_golden: Callable[..., Path], tmp_path: Path, rootfs: dict[str, Any], data: dict[str, Any] | None,
    values: tuple[str, ...], sources: tuple[str | None, ...],
) -> None:  # fmt: skip
    image = _golden(make_golden, tmp_path, _conf(rootfs), _conf(data) if data is not None else None)
    real = _agree(image, tmp_path)
    assert tuple(real.values()) == values
    view = _verify(image, tmp_path)["client"]["rootfs-a"]
    assert tuple(used["from"] for used in view.values()) == sources
    # The same in the text report.
    text = imageprov("verify", image, "--ca", _ca_cert(tmp_path), check=False).stdout
    line = next(ln for ln in text.splitlines() if "configuration the client uses (rootfs-a)" in ln)
    assert f'ServerURL "{values[0]}" from {sources[0]}' in line if sources[0] else "ServerURL not set" in line


def test_prepare_respells_the_rootfs_block_and_the_client_uses_it(
    make_golden: Callable[..., Path], tmp_path: Path
) -> None:
    rootfs, _, _, _ = AGREEMENT["upper case in the rootfs alone"]
    image = _golden(make_golden, tmp_path, _conf(rootfs), None)
    imageprov("prepare", image, "--conf-target", "rootfs", "--server-url", "https://edge")
    real = _agree(image, tmp_path)
    assert tuple(real.values()) == ("https://edge", CLIENT_CERT, CLIENT_KEY, CLIENT_KEY)
    for role in ("rootfs-a", "rootfs-b"):
        conf = json.loads(read_file(image, role, "/etc/mender/mender.conf") or b"")
        assert list(conf) == ["RootfsPartA", "RootfsPartB", "ServerURL", "HttpsClient", "Security"]
    assert _verify(image, tmp_path)["client"]["rootfs-a"]["HttpsClient.Key"]["from"] == ROOTFS


def test_prepare_respells_the_data_conf_and_the_client_uses_it(
    make_golden: Callable[..., Path], tmp_path: Path
) -> None:
    rootfs, data, _, _ = AGREEMENT["mixed case in the data conf alone"]
    image = _golden(make_golden, tmp_path, _conf(rootfs), _conf(data))
    imageprov("prepare", image, "--server-url", "https://edge")  # auto: the rootfs sets none of ours
    real = _agree(image, tmp_path)
    assert tuple(real.values()) == ("https://edge", CLIENT_CERT, CLIENT_KEY, CLIENT_KEY)
    conf = json.loads(read_file(image, "data", "/mender/mender.conf") or b"")
    assert conf == {"ServerURL": "https://edge", "HttpsClient": BLOCK, "Security": {"AuthPrivateKey": CLIENT_KEY}}


def _one_line(proc: Any, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("imageprov: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_a_rootfs_key_in_any_spelling_is_seen_over_the_data_conf(
    make_golden: Callable[..., Path], tmp_path: Path
) -> None:
    """What a case-sensitive reading let through: the client would use the rootfs's value, not ours."""
    rootfs, data, _, _ = AGREEMENT["rootfs ServerUrl over data ServerURL"]
    image = _golden(make_golden, tmp_path, _conf(rootfs), _conf(data))
    before = sha256(image)
    proc = imageprov("prepare", image, "--conf-target", "data", "--server-url", "https://edge", check=False)
    _one_line(proc, 2, 'sets ServerUrl: "https://rootfs", which the client reads over /data/mender/mender.conf')
    rootfs, data, _, _ = AGREEMENT["lower-case block in the rootfs, field by field"]
    other = _golden(make_golden, tmp_path, _conf(rootfs), _conf(data), "other.sdimg")
    _one_line(imageprov("prepare", other, check=False), 2, "sets httpsclient, which the client reads over")
    assert sha256(image) == before
    # verify fails the server it is told the device must use, naming the rootfs conf.
    report = _verify(image, tmp_path, "--server-url", "https://data")
    check = next(c for c in report["checks"] if c["name"] == "ServerURL the client uses (rootfs-a)")
    assert not check["ok"] and check["detail"] == f"'https://rootfs' from {ROOTFS}"


# Confs the clients read apart: (role of the conf, its text, what the refusal says).
TWO_SPELLINGS = {
    "ServerURL and ServerUrl in the rootfs": ("rootfs", b'{"ServerURL": "https://a", "ServerUrl": "https://b"}',
                                             '"ServerURL" and "ServerUrl"'),
    "HttpsClient and httpsclient in the data conf": (
        "data", b'{"HttpsClient": {"Certificate": "/a", "Key": "/b"}, "httpsclient": {"Certificate": "/c"}}',
        '"HttpsClient" and "httpsclient"'),
    "Key and key inside the rootfs block": ("rootfs", b'{"HttpsClient": {"Key": "/a", "key": "/b"}}',
                                            '"HttpsClient.Key" and "HttpsClient.key"'),
    "TenantToken twice in the data conf": ("data", b'{"TenantToken": "a", "TenantToken": "b"}',
                                           'the key "TenantToken" twice'),
    "a long s in the rootfs": ("rootfs", b'{"\\u017ferverURL": "https://x"}', "reads as \"serverURL\""),
}  # fmt: skip


def _refused_golden(make_golden: Callable[..., Path], tmp_path: Path, where: str, text: bytes) -> Path:
    if where == "rootfs":
        return make_golden(Scheme.MBR, mender_conf=text.decode())
    return _golden(make_golden, tmp_path, _conf({**DEFAULT_MENDER_CONF}), text)


@pytest.mark.parametrize(("where", "text", "needle"), TWO_SPELLINGS.values(), ids=TWO_SPELLINGS.keys())
def test_two_spellings_are_refused_and_nothing_is_written(
    make_golden: Callable[..., Path], tmp_path: Path, where: str, text: bytes, needle: str
) -> None:
    image = _refused_golden(make_golden, tmp_path, where, text)
    before = sha256(image)
    conf = ROOTFS if where == "rootfs" else DATA
    # Whichever conf would be written: the other one is read by the client as well.
    for target in ("auto", "rootfs", "data"):
        proc = imageprov("prepare", image, "--conf-target", target, check=False)
        _one_line(proc, 1, conf, needle)
        assert sha256(image) == before
    report = _verify(image, tmp_path)
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    for role in ("rootfs-a", "rootfs-b"):
        assert needle in failed[f"mender.conf on {role}"]
    assert report["client"] == {}  # no value is reported that one of the clients would not use


def test_stamp_refuses_two_spellings_before_issuing_anything(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    where, text, needle = TWO_SPELLINGS["HttpsClient and httpsclient in the data conf"]
    golden = _refused_golden(make_golden, tmp_path, where, text)
    before = sha256(golden)
    out = tmp_path / "out"
    for engine in ("debugfs", "mender-artifact"):
        proc = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "s-1", "--conf-target",
                             "rootfs", "--engine", engine, check=False)  # fmt: skip
        _one_line(proc, 1, DATA, needle)
    assert sha256(golden) == before
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".sdimg", ".bmap")]
    # Refused before a certificate was issued.
    assert json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout) == []
