"""The meta-imageprov layer, parsed and run by BitBake's own parser, data store and task runner.

BitBake comes from PyPI (bitbake-setup ships its ``bb`` library). Its
``hashserv`` package (hash equivalence, a network service) is not shipped and
is not used here: a stand-in module lets ``bb.siggen`` import. OE-core's
classes are not here either: the test recipe inherits the class the way
image.bbclass does (``IMAGE_CLASSES``), and runs ``ROOTFS_POSTPROCESS_COMMAND``
the way OE-core's ``execute_pre_post_process`` does. The resulting tree is
made into a data partition with ``mke2fs -d`` as meta-mender's dataimg does,
and the real Mender client reads the configuration.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, need, tool
from tests.mender_client import client_config

LAYER = Path(__file__).resolve().parent.parent / "yocto" / "meta-imageprov"
BLOCK = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}
TRANSIENT = {"ServerURL": "https://mender.example.com", "UpdatePollIntervalSeconds": 1800}
PERSISTENT = {"RootfsPartA": "/dev/mmcblk0p2", "RootfsPartB": "/dev/mmcblk0p3"}
# The client signs its auth requests with the certificate's key: what an accepting edge checks.
SECURITY = {"AuthPrivateKey": BLOCK["Key"]}


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
