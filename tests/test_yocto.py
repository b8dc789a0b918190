"""The meta-imageprov layer, parsed and run by BitBake's own parser, data store and task runner.

BitBake comes from PyPI (bitbake-setup ships its ``bb`` library). Its
``hashserv`` package (hash equivalence, a network service) is not shipped and
is not used here: a stand-in module lets ``bb.siggen`` import. OE-core's
classes are not here either: the test recipe inherits the class the way
image.bbclass does (``IMAGE_CLASSES``), and runs ``ROOTFS_POSTPROCESS_COMMAND``
the way OE-core's ``execute_pre_post_process`` does. The resulting tree is
made into a data partition with ``mke2fs -d`` as meta-mender's dataimg does,
and the real Mender client reads the configuration. The identity script the
class installs is run by ``tests/test_device_identity.py`` (dash, and the real
client), through :func:`installed_identity_script`.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from imageprov.mender.verify import DEVICE_ID_FILE
from tests.conftest import IN_CI, need, tool
from tests.mender_client import client_config

LAYER = Path(__file__).resolve().parent.parent / "yocto" / "meta-imageprov"
BLOCK = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}
TRANSIENT = {"ServerURL": "https://mender.example.com", "UpdatePollIntervalSeconds": 1800}
PERSISTENT = {"RootfsPartA": "/dev/mmcblk0p2", "RootfsPartB": "/dev/mmcblk0p3"}
# The client signs its auth requests with the certificate's key: what an accepting edge checks.
SECURITY = {"AuthPrivateKey": BLOCK["Key"]}
# Where the Mender client (3.x and 4.x) runs its identity script, in the rootfs tree.
IDENTITY_SCRIPT = "usr/share/mender/identity/mender-device-identity"
LAYER_IDENTITY_SCRIPT = LAYER / "files" / "mender-device-identity"


def _bb() -> Any:
    try:
        importlib.import_module("bb.data")
    except ImportError:
        message = "BitBake's bb library is missing (pip install bitbake-setup; scripts/setup --test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    for name in ("hashserv", "hashserv.client"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for name in ("bb.parse", "bb.build", "bb.siggen"):
        importlib.import_module(name)
    return sys.modules["bb"]


def _rootfs(tmp_path: Path, main: dict[str, Any] | None = None) -> Path:
    """A root filesystem tree as meta-mender's split configuration installs it (both confs 0600)."""
    root = tmp_path / "rootfs"
    (root / "etc/mender").mkdir(parents=True)
    (root / "data/mender").mkdir(parents=True)
    for path, conf in (
        (root / "etc/mender/mender.conf", main or TRANSIENT),
        (root / "data/mender/mender.conf", PERSISTENT),
    ):
        path.write_text(json.dumps(conf, indent=4, sort_keys=True))
        path.chmod(0o600)
    (root / "data/mender/device_type").write_text("device_type=test\n")
    return root


def _parse(tmp_path: Path, rootfs: Path, extra: str = "") -> Any:
    """Parse the layer's layer.conf and an image recipe enabling the class; return the recipe's data store."""
    bb = _bb()
    d = bb.data.init()
    bb.parse.siggen = bb.siggen.init(d)
    # What bitbake's cooker does for each layer in bblayers.conf.
    d.setVar("LAYERDIR", str(LAYER))
    bb.parse.handle(str(LAYER / "conf/layer.conf"), d, include=True)
    d.expandVarref("LAYERDIR")
    d.delVar("LAYERDIR")
    d.setVar("__bbclasstype", "recipe")
    d.setVar("IMAGE_ROOTFS", str(rootfs))
    d.setVar("T", str(tmp_path / "temp"))
    recipe = tmp_path / "test-image.bb"
    recipe.write_text(f'IMAGE_CLASSES += "imageprov-mender-conf"\ninherit ${{IMAGE_CLASSES}}\n{extra}')
    return bb.parse.handle(str(recipe), d)[""]


def _postprocess(d: Any) -> None:
    """Run ROOTFS_POSTPROCESS_COMMAND as OE-core's execute_pre_post_process does."""
    bb = _bb()
    for command in d.getVar("ROOTFS_POSTPROCESS_COMMAND").replace(";", " ").split():
        bb.build.exec_func(command, d)


def test_layer_conf_and_class_parse_with_current_syntax(tmp_path: Path) -> None:
    d = _parse(tmp_path, _rootfs(tmp_path))
    assert "imageprov" in d.getVar("BBFILE_COLLECTIONS").split()
    assert str(LAYER) in d.getVar("BBPATH").split(":")
    assert "scarthgap" in d.getVar("LAYERSERIES_COMPAT_imageprov").split()
    assert d.getVar("ROOTFS_POSTPROCESS_COMMAND").split() == ["imageprov_mender_conf"]
    assert ";" not in d.getVar("ROOTFS_POSTPROCESS_COMMAND")
    assert d.getVarFlag("imageprov_mender_conf", "python")
    # No host tool: the function is Python, and names no program.
    body = d.getVar("imageprov_mender_conf", False)
    assert "subprocess" not in body and "imageprov " not in body
    assert not (LAYER.parent.parent / "scripts" / "yocto").exists(), "the old class is gone"


def test_block_goes_to_the_data_partition_conf_and_the_client_reads_it(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    main_before = (rootfs / "etc/mender/mender.conf").read_bytes()
    _postprocess(_parse(tmp_path, rootfs))
    conf_path = rootfs / "data/mender/mender.conf"
    conf = json.loads(conf_path.read_text())
    assert conf == {**PERSISTENT, "HttpsClient": BLOCK, "Security": SECURITY}
    assert list(conf) == [*PERSISTENT, "HttpsClient", "Security"]
    assert conf_path.stat().st_mode & 0o7777 == 0o600
    assert (rootfs / "etc/mender/mender.conf").read_bytes() == main_before
    # Idempotent: a second run (a rebuild from sstate) gives the same bytes.
    first = conf_path.read_bytes()
    _postprocess(_parse(tmp_path, rootfs))
    assert conf_path.read_bytes() == first

    # meta-mender's dataimg: mke2fs -d from ${IMAGE_ROOTFS}/data. debugfs reads it back.
    need("mke2fs", "debugfs")
    dataimg = tmp_path / "test.dataimg"
    with open(dataimg, "wb") as handle:
        handle.truncate(8 << 20)
    tool("mke2fs", "-q", "-F", "-t", "ext4", "-L", "data", "-d", rootfs / "data", dataimg)
    assert json.loads(tool("debugfs", "-R", "cat /mender/mender.conf", dataimg).stdout)["HttpsClient"] == BLOCK
    # The real client, with the image's two files as its main and fallback configuration.
    effective = client_config(rootfs / "etc/mender/mender.conf", conf_path, tmp_path)
    assert effective["HttpsClient"] == BLOCK
    assert effective["Security"]["AuthPrivateKey"] == BLOCK["Key"]


def test_a_rootfs_block_is_refused_and_nothing_written(tmp_path: Path) -> None:
    bb = _bb()
    rootfs = _rootfs(tmp_path, {**TRANSIENT, "HttpsClient": {"Certificate": "/etc/c.pem", "Key": "/etc/k.pem"}})
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    with pytest.raises(bb.BBHandledException):
        _postprocess(_parse(tmp_path, rootfs))
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


def test_rootfs_target_and_paths_are_settings(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    extra = 'IMAGEPROV_MENDER_CONF = "/etc/mender/mender.conf"\nIMAGEPROV_CLIENT_KEY = "/data/mender/k.pem"\n'
    _postprocess(_parse(tmp_path, rootfs, extra))
    conf = json.loads((rootfs / "etc/mender/mender.conf").read_text())
    key = "/data/mender/k.pem"
    assert conf == {**TRANSIENT, "HttpsClient": {**BLOCK, "Key": key}, "Security": {"AuthPrivateKey": key}}
    assert (rootfs / "etc/mender/mender.conf").stat().st_mode & 0o7777 == 0o600
    assert json.loads((rootfs / "data/mender/mender.conf").read_text()) == PERSISTENT


def test_a_missing_data_conf_is_created_private(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    (rootfs / "data/mender/mender.conf").unlink()
    (rootfs / "data/mender/device_type").unlink()
    (rootfs / "data/mender").rmdir()
    _postprocess(_parse(tmp_path, rootfs))
    path = rootfs / "data/mender/mender.conf"
    assert json.loads(path.read_text()) == {"HttpsClient": BLOCK, "Security": SECURITY}
    assert path.stat().st_mode & 0o7777 == 0o600


def test_a_device_key_in_the_build_is_refused(tmp_path: Path) -> None:
    bb = _bb()
    rootfs = _rootfs(tmp_path)
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    (rootfs / "data/mender/mender-cert-private.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(bb.BBHandledException):
        _postprocess(_parse(tmp_path, rootfs))
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


def test_auth_key_device_leaves_security_as_the_build_has_it(tmp_path: Path) -> None:
    bb = _bb()
    rootfs = _rootfs(tmp_path)
    conf_path = rootfs / "data/mender/mender.conf"
    conf_path.write_text(json.dumps({**PERSISTENT, "Security": {"AuthPrivateKey": "/data/mender/own.pem"}}))
    _postprocess(_parse(tmp_path, rootfs, 'IMAGEPROV_AUTH_KEY = "device"\n'))
    conf = json.loads(conf_path.read_text())
    assert conf["Security"] == {"AuthPrivateKey": "/data/mender/own.pem"}
    assert conf["HttpsClient"] == BLOCK
    # Anything else is a build error, not a silent default.
    with pytest.raises(bb.BBHandledException):
        _postprocess(_parse(tmp_path, rootfs, 'IMAGEPROV_AUTH_KEY = "yes"\n'))


# -- the identity script (IMAGEPROV_IDENTITY_ATTRIBUTE) -----------------------------------------------------------


def installed_identity_script(tmp_path: Path, attribute: str, id_file: Path | str) -> Path:
    """The identity script the class installs into a rootfs tree in ``tmp_path``, for ``attribute`` and ``id_file``."""
    rootfs = _rootfs(tmp_path)
    extra = f'IMAGEPROV_IDENTITY_ATTRIBUTE = "{attribute}"\nIMAGEPROV_DEVICE_ID_FILE = "{id_file}"\n'
    _postprocess(_parse(tmp_path, rootfs, extra))
    return rootfs / IDENTITY_SCRIPT


def _meta_mender_identity(rootfs: Path) -> Path:
    """The MAC address script meta-mender's client package installs."""
    script = rootfs / IDENTITY_SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\necho mac=$(cat /sys/class/net/eth0/address)\n")
    script.chmod(0o755)
    return script


def test_identity_script_is_opt_in(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    ours = _meta_mender_identity(rootfs)
    before = ours.read_bytes()
    d = _parse(tmp_path, rootfs)
    assert d.getVar("ROOTFS_POSTPROCESS_COMMAND").split() == ["imageprov_mender_conf"]
    _postprocess(d)
    assert ours.read_bytes() == before
    d = _parse(tmp_path, rootfs, 'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\n')
    assert d.getVar("ROOTFS_POSTPROCESS_COMMAND").split() == ["imageprov_mender_conf", "imageprov_identity_script"]
    # The script's bytes are part of do_rootfs's signature: editing it rebuilds the rootfs.
    assert f"{LAYER_IDENTITY_SCRIPT}:True" in d.getVarFlag("do_rootfs", "file-checksums").split()
    body = d.getVar("imageprov_identity_script", False)
    assert "subprocess" not in body and "imageprov " not in body


def test_identity_attribute_installs_the_script_over_the_clients(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    script = _meta_mender_identity(rootfs)
    id_file = tmp_path / "data" / "imageprov-device-id"
    extra = f'IMAGEPROV_IDENTITY_ATTRIBUTE = "serial"\nIMAGEPROV_DEVICE_ID_FILE = "{id_file}"\n'
    _postprocess(_parse(tmp_path, rootfs, extra))
    assert script.stat().st_mode & 0o7777 == 0o755
    # The layer's file, with the build's two settings and nothing else changed.
    layer = LAYER_IDENTITY_SCRIPT.read_text().splitlines()
    installed = script.read_text().splitlines()
    changed = [(a, b) for a, b in zip(layer, installed) if a != b]
    assert len(installed) == len(layer)
    assert changed == [
        ("attribute='device_id'", "attribute='serial'"),
        ("id_file='/data/mender/imageprov-device-id'", f"id_file='{id_file}'"),
    ]
    need("dash")
    id_file.parent.mkdir()
    id_file.write_text("SN-0007\n")
    ran = tool("dash", script)
    assert (ran.stdout, ran.stderr) == (b"serial=SN-0007\n", b"")
    # Idempotent: a second run (a rebuild from sstate) gives the same bytes.
    first = script.read_bytes()
    _postprocess(_parse(tmp_path, rootfs, extra))
    assert script.read_bytes() == first


def test_the_default_identity_reads_the_file_stamp_writes(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    _postprocess(_parse(tmp_path, rootfs, 'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\n'))
    text = (rootfs / IDENTITY_SCRIPT).read_text()
    assert "\nattribute='device_id'\n" in text
    # The path imageprov stamp and flash write, as imageprov itself names it.
    assert f"\nid_file='{DEVICE_ID_FILE}'\n" in text
    assert text == LAYER_IDENTITY_SCRIPT.read_text()


@pytest.mark.parametrize(
    "extra",
    [
        'IMAGEPROV_IDENTITY_ATTRIBUTE = "device id"\n',  # the client would read "device" and " id"...
        'IMAGEPROV_IDENTITY_ATTRIBUTE = "a=b"\n',  # ...or split at the first "="
        "IMAGEPROV_IDENTITY_ATTRIBUTE = \"x';reboot;'\"\n",  # never shell code in the script
        'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\nIMAGEPROV_DEVICE_ID_FILE = "data/id"\n',
        'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\nIMAGEPROV_DEVICE_ID_FILE = "/data/../etc/id"\n',
    ],
    ids=["space", "equals", "quote", "relative-file", "dotdot-file"],
)
def test_bad_identity_settings_are_build_errors(tmp_path: Path, extra: str) -> None:
    bb = _bb()
    rootfs = _rootfs(tmp_path)
    with pytest.raises(bb.BBHandledException):
        _postprocess(_parse(tmp_path, rootfs, extra))
    assert not (rootfs / IDENTITY_SCRIPT).exists()


def test_a_device_id_file_in_the_build_is_refused(tmp_path: Path) -> None:
    bb = _bb()
    rootfs = _rootfs(tmp_path)
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    # Every device would share it: the id is stamped on the line, as the key is.
    (rootfs / DEVICE_ID_FILE.lstrip("/")).write_text("SN-0001\n")
    with pytest.raises(bb.BBHandledException):
        _postprocess(_parse(tmp_path, rootfs))
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before
