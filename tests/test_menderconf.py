"""The mender.conf merge and device-id parsing: pure functions, checked without images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageprov.errors import UsageError
from imageprov.mender.conf import (
    CLIENT_CERT,
    CLIENT_KEY,
    AuthKey,
    MenderConfError,
    Settings,
    auth_private_key,
    conflicts,
    effective,
    merge,
)
from imageprov.pki.devices import check_device_ids, read_device_ids

BLOCK = {"Certificate": CLIENT_CERT, "Key": CLIENT_KEY}
SECURITY = {"AuthPrivateKey": CLIENT_KEY}


def test_merge_keeps_every_key_in_order() -> None:
    text = b'{"b": 1, "a": {"nested": [1, 2]}, "ServerURL": "https://old", "z": null}'
    merged = merge(text, Settings(server_url="https://new"), "mender.conf")
    value = json.loads(merged.text)
    assert list(value) == ["b", "a", "ServerURL", "z", "HttpsClient", "Security"]
    assert value["a"] == {"nested": [1, 2]} and value["z"] is None
    assert value["ServerURL"] == "https://new" and value["HttpsClient"] == BLOCK
    assert merged.changed and merged.replaced is None
    assert merged.text.endswith(b"}\n") and b'\n  "b": 1,' in merged.text


def test_merge_is_idempotent() -> None:
    once = merge(b'{"ServerURL": "x"}', Settings(tenant_token="t"), "m")
    twice = merge(once.text, Settings(tenant_token="t"), "m")
    assert twice.text == once.text and not twice.changed


@pytest.mark.datafiles(Path(__file__).parent.parent / "fixtures" / "mender.conf.recipe")
def test_recipe_snippet_with_key_pointing_at_the_cert_is_replaced_and_reported(datafiles: Path) -> None:
    text = (datafiles / "mender.conf.recipe").read_bytes()
    recipe = json.loads(text)
    merged = merge(text, Settings(), "m")
    assert merged.replaced == recipe["HttpsClient"]
    assert json.loads(merged.text)["HttpsClient"] == BLOCK
    # The block stays where it was.
    assert list(json.loads(merged.text)) == ["ServerURL", "TenantToken", "HttpsClient", "Security"]


def test_merge_from_nothing() -> None:
    assert json.loads(merge(None, Settings(), "m").text) == {"HttpsClient": BLOCK, "Security": SECURITY}


def test_null_https_client_is_as_good_as_none() -> None:
    # Go's encoding/json leaves the client's struct empty for null: nothing to keep.
    merged = merge(b'{"HttpsClient": null}', Settings(), "m")
    assert json.loads(merged.text) == {"HttpsClient": BLOCK, "Security": SECURITY} and merged.replaced is None


def test_non_ascii_is_kept() -> None:
    assert "Ærø" in merge('{"Name": "Ærø"}'.encode(), Settings(), "m").text.decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'"text"', "not an object"),
        (b'{"HttpsClient": "/data/cert.pem"}', "HttpsClient that is not an object"),
        (b'{"HttpsClient": []}', "HttpsClient that is not an object"),
    ],
)
def test_bad_mender_conf(text: bytes, message: str) -> None:
    with pytest.raises(MenderConfError, match=message):
        merge(text, Settings(), "mender.conf")


def test_bad_mender_conf_messages_name_the_file_and_the_fix() -> None:
    with pytest.raises(MenderConfError) as info:
        merge(b"{", Settings(), "/etc/mender/mender.conf on rootfs-a")
    assert info.value.message.startswith("/etc/mender/mender.conf on rootfs-a is not valid JSON: ")
    assert info.value.hint == "fix the golden image's mender.conf"
    with pytest.raises(MenderConfError) as info:
        merge(b"[1]", Settings(), "m")
    assert (info.value.message, info.value.hint) == ("m is a JSON list, not an object", "")


def test_tenant_token_and_server_url_are_set_only_when_given() -> None:
    merged = json.loads(merge(b'{"TenantToken": "old", "ServerURL": "u"}', Settings(tenant_token="new"), "m").text)
    assert (merged["TenantToken"], merged["ServerURL"], merged["HttpsClient"]) == ("new", "u", BLOCK)
    assert json.loads(merge(b'{"TenantToken": "old"}', Settings(), "m").text)["TenantToken"] == "old"


def test_our_own_block_is_not_reported_as_replaced() -> None:
    merged = merge(json.dumps({"HttpsClient": BLOCK}).encode(), Settings(), "m")
    assert merged.replaced is None


def test_same_content_in_another_format_is_rewritten() -> None:
    # Nothing to merge, but the file is not as we render it: it changes (and a rerun then leaves it alone).
    ours = {"HttpsClient": BLOCK, "Security": {"AuthPrivateKey": CLIENT_KEY}}
    compact = json.dumps(ours, separators=(",", ":")).encode()
    merged = merge(compact, Settings(), "m")
    assert merged.changed and merged.replaced is None and merged.text != compact
    assert not merge(merged.text, Settings(), "m").changed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b'{"a": NaN}', "NaN is not a JSON number (RFC 8259)"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number (RFC 8259)"),
        (b'{"a": 1e400}', "1e400 is out of range for a number (it would be written back as Infinity)"),
        (b'{"a": -1e400}', "-1e400 is out of range for a number (it would be written back as Infinity)"),
    ],
)
def test_non_standard_numbers_are_refused(text: bytes, why: str) -> None:
    with pytest.raises(MenderConfError) as info:
        merge(text, Settings(), "m")
    assert info.value.message == f"m is not valid JSON: {why}"


def test_numbers_that_are_standard_are_kept() -> None:
    assert json.loads(merge(b'{"a": 1.5e3, "b": -2, "c": 1e308}', Settings(), "m").text)["a"] == 1500.0


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(MenderConfError) as info:
        merge(b'{"a": "\\ud83d"}', Settings(), "m")
    assert info.value.message == "m holds a lone UTF-16 surrogate escape, which is no character"
    assert info.value.hint == "fix the golden image's mender.conf: escape the whole pair, e.g. \\ud83d\\ude00"
    assert "\U0001f600" in merge(b'{"a": "\\ud83d\\ude00"}', Settings(), "m").text.decode()


def test_effective_configuration() -> None:
    fallback = {"ServerURL": "f", "HttpsClient": {"Certificate": "fc", "Key": "fk"}, "Only": 1}
    main = {"ServerURL": "m", "HttpsClient": {"Certificate": "mc"}, "TenantToken": None, "New": [1]}
    assert effective(main, fallback) == {
        "ServerURL": "m",
        "HttpsClient": {"Certificate": "mc", "Key": "fk"},  # field by field
        "Only": 1,
        "New": [1],
    }  # a null changes nothing
    assert effective({"HttpsClient": {"Key": "k"}}, {"HttpsClient": "not an object"}) == {"HttpsClient": {"Key": "k"}}
    assert fallback == {"ServerURL": "f", "HttpsClient": {"Certificate": "fc", "Key": "fk"}, "Only": 1}


def test_conflicts_with_the_rootfs_conf() -> None:
    settings = Settings(server_url="https://edge", tenant_token="t")
    assert conflicts({}, settings) == []
    assert conflicts({"ServerURL": "https://edge", "TenantToken": None}, settings) == []
    assert conflicts({"ServerURL": "https://old", "HttpsClient": {"Key": "/k"}}, settings) == [
        'ServerURL: "https://old"',
        'HttpsClient: {"Key": "/k"}',
    ]
    assert conflicts({"Servers": [{"ServerURL": "x"}]}, settings) == [
        "Servers (the client refuses ServerURL beside it)"
    ]
    assert conflicts({"Servers": [{"ServerURL": "x"}]}, Settings()) == []
    assert conflicts({"Servers": None}, settings) == []


def test_auth_private_key_is_the_certificate_key_by_default() -> None:
    text = b'{"Security": {"AuthPrivateKey": "/old.pem", "SSLEngine": "pkcs11", "Other": 1}}'
    merged = merge(text, Settings(), "m")
    # A key in a file: an engine left from a token's conf would be asked to load the file's path; others are kept.
    assert json.loads(merged.text)["Security"] == {"AuthPrivateKey": CLIENT_KEY, "Other": 1}
    token = merge(text, Settings(key="pkcs11:token=t;object=k", ssl_engine="pkcs11"), "m")
    assert json.loads(token.text)["Security"] == {"AuthPrivateKey": "pkcs11:token=t;object=k", "SSLEngine": "pkcs11",
                                                  "Other": 1}  # fmt: skip
    assert merge(b'{"Security": {"sslengine": "x"}}', Settings(), "m").text.count(b"sslengine") == 0
    assert merged.replaced_auth_key == "/old.pem"
    same = merge(merged.text, Settings(), "m")
    assert same.replaced_auth_key is None and not same.changed
    assert merge(b"{}", Settings(), "m").replaced_auth_key is None
    assert json.loads(merge(b'{"Security": null}', Settings(), "m").text)["Security"] == {"AuthPrivateKey": CLIENT_KEY}
    # The device's own key: Security is left as it is.
    device = merge(text, Settings(auth_key=AuthKey.DEVICE), "m")
    assert json.loads(device.text)["Security"] == json.loads(text)["Security"] and device.replaced_auth_key is None
    assert "Security" not in json.loads(merge(b"{}", Settings(auth_key=AuthKey.DEVICE), "m").text)


@pytest.mark.parametrize(
    ("config", "key"),
    [({}, None), ({"Security": None}, None), ({"Security": {}}, None), ({"Security": {"AuthPrivateKey": ""}}, None),
     ({"Security": {"AuthPrivateKey": 7}}, None), ({"Security": {"AuthPrivateKey": "/k"}}, "/k"),
     # The client matches keys without regard to case.
     ({"SECURITY": {"authPrivateKey": "/k"}}, "/k")],
)  # fmt: skip
def test_auth_private_key_of_a_conf(config: dict[str, object], key: str | None) -> None:
    assert auth_private_key(config) == key


def test_security_must_be_an_object() -> None:
    with pytest.raises(MenderConfError) as info:
        merge(b'{"Security": "x"}', Settings(), "m")
    assert (info.value.message, info.value.hint) == ("m has a Security that is not an object", "")
    with pytest.raises(MenderConfError) as info:
        merge(b'{"HttpsClient": 1}', Settings(), "m")
    assert info.value.message == "m has a HttpsClient that is not an object"


def test_device_ids() -> None:
    assert check_device_ids(["SN-1", "a.b_c:d"]) == ["SN-1", "a.b_c:d"]
    for bad in ["", "a/b", "..", ".", "a b", "x" * 65, "é", "a\nb", "a\x00b", "a'b"]:
        with pytest.raises(UsageError):
            check_device_ids([bad])
    with pytest.raises(UsageError, match="twice"):
        check_device_ids(["a", "a"])


def test_read_device_ids(tmp_path: Path) -> None:
    plain = tmp_path / "ids"
    plain.write_text("# serials\nA1\n  A2  \n\nA3\n")
    assert read_device_ids(plain) == ["A1", "A2", "A3"]
    table = tmp_path / "ids.csv"
    table.write_text("\ufeffDevice_ID,batch\nB1,1\nB2,1\n")
    assert read_device_ids(table) == ["B1", "B2"]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("serial,batch\nB1,1\n")
    with pytest.raises(UsageError, match="device_id column"):
        read_device_ids(wrong)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(UsageError, match="no device id"):
        read_device_ids(empty)
