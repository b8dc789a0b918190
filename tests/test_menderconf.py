"""The mender.conf merge and device-id parsing: pure functions, checked without images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageprov.errors import UsageError
from imageprov.mender.conf import CLIENT_CERT, CLIENT_KEY, MenderConfError, Settings, merge
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
