"""The meta-imageprov layer, parsed and run by BitBake's own code, under the BitBake of each release it supports.

BitBake: the current one (master's) is the ``bb`` library that bitbake-setup ships on PyPI. Kirkstone's
(2.0) and scarthgap's (2.8) are on no package registry: ``scripts/setup --test`` installs their ``lib``
trees from BitBake's git repository, pinned to a commit, into ``.venv/bitbake/<series>``. A process imports
one ``bb``, so :func:`test_the_layer_under_release` runs this module again in a child pytest per older
release, with that tree first on ``PYTHONPATH`` and ``IMAGEPROV_TEST_YOCTO_RELEASE`` naming the release.
BitBake's ``hashserv`` (hash equivalence, a network service) is not in the PyPI package and is not used
here: there, a stand-in module lets ``bb.siggen`` import.

BitBake's cooker code parses a ``bblayers.conf`` naming the layer and two stand-ins, written by
:func:`_build_dir` in the shape of the release: OE-core (its series name, a minimal ``bitbake.conf``, and an
``image`` class doing what OE-core's image classes do around this class in that release) and meta-mender
(its ``ROOTFS_POSTPROCESS_COMMAND`` entry, in that release's style). OE-core itself is not run. An image
recipe inherits the stand-in ``image``, which inherits the class through ``IMAGE_CLASSES`` as OE-core does;
its ``do_rootfs`` runs the post-process list with that release's ``execute_pre_post_process``, copied
from OE-core. The resulting tree is made into a data partition with ``mke2fs -d`` as meta-mender's dataimg
does, and the real Mender client reads the configuration. The identity script the class installs is run
by ``tests/test_device_identity.py`` (dash, and the real client), through :func:`installed_identity_script`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imageprov.mender.conf import Settings, merge
from imageprov.mender.enroll import ENROLL_CONF, KEY_URI, Enrollment
from imageprov.mender.verify import DEVICE_ID_FILE
from tests.conftest import IN_CI, need, tool
from tests.mender_client import client_config

REPO = Path(__file__).resolve().parent.parent
LAYER = REPO / "yocto" / "meta-imageprov"
# Where scripts/setup --test installs the BitBake releases that no registry carries.
BITBAKE_TREES = REPO / ".venv" / "bitbake"
RELEASE_ENV = "IMAGEPROV_TEST_YOCTO_RELEASE"
BLOCK = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}
TRANSIENT = {"ServerURL": "https://mender.example.com", "UpdatePollIntervalSeconds": 1800}
PERSISTENT = {"RootfsPartA": "/dev/mmcblk0p2", "RootfsPartB": "/dev/mmcblk0p3"}
# The client signs its auth requests with the certificate's key: what an accepting edge checks.
SECURITY = {"AuthPrivateKey": BLOCK["Key"]}
# Where the Mender client (3.x and 4.x) runs its identity script, in the rootfs tree.
IDENTITY_SCRIPT = "usr/share/mender/identity/mender-device-identity"
LAYER_IDENTITY_SCRIPT = LAYER / "files" / "mender-device-identity"
OURS = ("imageprov_mender_conf", "imageprov_identity_script")

# OE-core's image class as it treats ROOTFS_POSTPROCESS_COMMAND around this class, kirkstone's way
# (meta/classes/image.bbclass and meta/lib/oe/utils.py on OE-core's kirkstone branch): IMAGE_CLASSES, then
# rootfs-postcommands, inherited at once; the list parsed as shell code for do_rootfs's signature (the
# "func" flag); the list split at ";" alone.
KIRKSTONE_IMAGE_CLASS = """
IMAGE_CLASSES ??= ""
IMGCLASSES = "${IMAGE_CLASSES} rootfs-postcommands"
inherit ${IMGCLASSES}
python () {
    if d.getVar("ROOTFS_POSTPROCESS_COMMAND", False):
        d.setVarFlag("ROOTFS_POSTPROCESS_COMMAND", "func", "1")
}
python do_rootfs () {
    def execute_pre_post_process(d, cmds):
        if cmds is None:
            return

        for cmd in cmds.strip().split(';'):
            cmd = cmd.strip()
            if cmd != '':
                bb.note("Executing %s ..." % cmd)
                bb.build.exec_func(cmd, d)

    execute_pre_post_process(d, d.getVar("ROOTFS_POSTPROCESS_COMMAND"))
}
"""
# The same in scarthgap and master (meta/classes-recipe/image.bbclass and meta/lib/oe/utils.py since
# OE-core's commit c3365dfd9d): the same classes inherited at the end of the recipe (inherit_defer); the
# list's words taken as do_rootfs's vardeps; the list split at ";" and whitespace alike.
IMAGE_CLASS = """
IMAGE_CLASSES ??= ""
IMGCLASSES = "${IMAGE_CLASSES} rootfs-postcommands"
inherit_defer ${IMGCLASSES}
python () {
    d.setVarFlag("ROOTFS_POSTPROCESS_COMMAND", "vardeps", d.getVar("ROOTFS_POSTPROCESS_COMMAND"))
}
python do_rootfs () {
    def execute_pre_post_process(d, cmds):
        if cmds is None:
            return

        cmds = cmds.replace(";", " ")

        for cmd in cmds.split():
            bb.note("Executing %s ..." % cmd)
            bb.build.exec_func(cmd, d)

    execute_pre_post_process(d, d.getVar("ROOTFS_POSTPROCESS_COMMAND"))
}
"""
# Common to both: the task.
IMAGE_TASK = """
do_rootfs[vardeps] += "ROOTFS_POSTPROCESS_COMMAND"
addtask rootfs
"""
# One of OE-core's own entries (rootfs-postcommands.bbclass), in the release's style: ";" after each on
# kirkstone, none on scarthgap and later.
KIRKSTONE_POSTCOMMANDS_ENTRY = 'ROOTFS_POSTPROCESS_COMMAND += "rootfs_update_timestamp; "'
POSTCOMMANDS_ENTRY = 'ROOTFS_POSTPROCESS_COMMAND += "rootfs_update_timestamp "'
POSTCOMMANDS_FUNCTION = """
python rootfs_update_timestamp () {
    bb.note("ran rootfs_update_timestamp")
}
"""
# meta-mender's mender_update_fstab_file entry (meta-mender-core/classes/mender-setup-image.inc), in the
# release's style: an :append with ";" on kirkstone, a "+=" without in a global class on scarthgap and later.
KIRKSTONE_MENDER_ENTRY = 'ROOTFS_POSTPROCESS_COMMAND:append = " mender_update_fstab_file;"'
MENDER_ENTRY = 'ROOTFS_POSTPROCESS_COMMAND += "mender_update_fstab_file"'
MENDER_FUNCTION = """
python mender_update_fstab_file () {
    bb.note("ran mender_update_fstab_file")
}
"""


@dataclass(frozen=True)
class Release:
    """A Yocto release as this module runs the layer under it."""

    # BitBake's series, installed under BITBAKE_TREES; None: the bitbake-setup package from PyPI.
    bitbake: str | None
    # OE-core's LAYERSERIES_CORENAMES on that release's branch.
    corenames: str
    image_class: str
    postcommands_entry: str
    mender_entry: str
    # The post-process functions in the order that release's do_rootfs runs them.
    order: tuple[str, ...]


RELEASES = {
    "kirkstone": Release(
        bitbake="2.0",
        corenames="kirkstone",
        image_class=KIRKSTONE_IMAGE_CLASS,
        postcommands_entry=KIRKSTONE_POSTCOMMANDS_ENTRY,
        mender_entry=KIRKSTONE_MENDER_ENTRY,
        order=(*OURS, "rootfs_update_timestamp", "mender_update_fstab_file"),
    ),
    "scarthgap": Release(
        bitbake="2.8",
        corenames="scarthgap",
        image_class=IMAGE_CLASS,
        postcommands_entry=POSTCOMMANDS_ENTRY,
        mender_entry=MENDER_ENTRY,
        order=("mender_update_fstab_file", *OURS, "rootfs_update_timestamp"),
    ),
    # Master's BitBake is the PyPI package's; OE-core's master still names the last release too.
    "master": Release(
        bitbake=None,
        corenames="wrynose blacksail",
        image_class=IMAGE_CLASS,
        postcommands_entry=POSTCOMMANDS_ENTRY,
        mender_entry=MENDER_ENTRY,
        order=("mender_update_fstab_file", *OURS, "rootfs_update_timestamp"),
    ),
}
RELEASE = RELEASES[os.environ.get(RELEASE_ENV, "master")]


def _bb() -> Any:
    try:
        importlib.import_module("bb.data")
    except ImportError:
        message = "BitBake's bb library is missing (pip install bitbake-setup; scripts/setup --test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        importlib.import_module("hashserv")  # in the release trees, not in the PyPI package
    except ImportError:
        for name in ("hashserv", "hashserv.client"):
            sys.modules.setdefault(name, types.ModuleType(name))
    for name in ("bb.parse", "bb.build", "bb.siggen", "bb.cookerdata"):
        importlib.import_module(name)
    return sys.modules["bb"]


def _rootfs(tmp_path: Path, main: dict[str, Any] | None = None, var_lib_mender: str | None = "/data/mender") -> Path:
    """A root filesystem tree as meta-mender's split configuration installs it (both confs 0600).

    ``var_lib_mender``: where /var/lib/mender links (meta-mender's mender-image feature), or None
    for the directory meta-mender makes without it.
    """
    root = tmp_path / "rootfs"
    (root / "etc/mender").mkdir(parents=True)
    (root / "data/mender").mkdir(parents=True)
    (root / "var/lib").mkdir(parents=True)
    if var_lib_mender is None:
        (root / "var/lib/mender").mkdir()
    else:
        (root / "var/lib/mender").symlink_to(var_lib_mender)
    for path, conf in (
        (root / "etc/mender/mender.conf", main or TRANSIENT),
        (root / "data/mender/mender.conf", PERSISTENT),
    ):
        path.write_text(json.dumps(conf, indent=4, sort_keys=True))
        path.chmod(0o600)
    (root / "data/mender/device_type").write_text("device_type=test\n")
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _build_dir(tmp_path: Path, rootfs: Path, corenames: str) -> Path:
    """A build directory whose bblayers.conf names stand-ins for OE-core and meta-mender, and the layer."""
    top = tmp_path / "build"
    core, mender = tmp_path / "stand-in-core", tmp_path / "stand-in-mender"
    _write(top / "conf/bblayers.conf", f'BBPATH = "${{TOPDIR}}"\nBBFILES ?= ""\nBBLAYERS = "{core} {mender} {LAYER}"\n')
    _write(
        top / "conf/local.conf",
        f'T = "{tmp_path / "temp"}"\nIMAGE_ROOTFS = "{rootfs}"\n'
        'INHERIT += "mender-setup"\nIMAGE_CLASSES += "imageprov-mender-conf"\n',
    )
    layer_conf = 'BBPATH .= ":${{LAYERDIR}}"\nBBFILE_COLLECTIONS += "{0}"\nBBFILE_PATTERN_{0} = "^${{LAYERDIR}}/"\n'
    _write(
        core / "conf/layer.conf",
        layer_conf.format("core") + f'LAYERSERIES_CORENAMES = "{corenames}"\nLAYERSERIES_COMPAT_core = "{corenames}"\n',
    )
    # Of OE-core's bitbake.conf: PN (the class's notes name the image) and one export (kirkstone's signature
    # code reads the export list, which is unset without one).
    _write(
        core / "conf/bitbake.conf",
        "PN = \"${@bb.parse.vars_from_file(d.getVar('FILE', False), d)[0]}\"\nexport PATH\ninclude conf/local.conf\n",
    )
    _write(core / "classes/base.bbclass", "")
    _write(core / "classes/image.bbclass", RELEASE.image_class + IMAGE_TASK)
    _write(core / "classes/rootfs-postcommands.bbclass", RELEASE.postcommands_entry + "\n" + POSTCOMMANDS_FUNCTION)
    _write(mender / "conf/layer.conf", layer_conf.format("mender") + f'LAYERSERIES_COMPAT_mender = "{corenames}"\n')
    _write(mender / "classes/mender-setup.bbclass", RELEASE.mender_entry + "\n" + MENDER_FUNCTION)
    return top


def _config(tmp_path: Path, rootfs: Path, corenames: str | None = None) -> Any:
    """The configuration data store, as BitBake's cooker parses it from the build directory's bblayers.conf."""
    bb = _bb()
    top = _build_dir(tmp_path, rootfs, corenames or RELEASE.corenames)
    settings = types.SimpleNamespace(prefile=[], postfile=[], tracking=False, env={}, skip_fragments=False)
    builder = bb.cookerdata.CookerDataBuilder(settings)
    builder.basedata.setVar("BBPATH", str(top))
    config = builder.parseConfigurationFiles([], [])
    bb.parse.init_parser(config)
    return config


def _parse(tmp_path: Path, rootfs: Path, extra: str = "") -> Any:
    """Parse the layer (in a build directory) and an image recipe; return the recipe's data store."""
    bb = _bb()
    d = bb.data.createCopy(_config(tmp_path, rootfs))
    d.setVar("__bbclasstype", "recipe")  # as the cooker does before it parses recipes (BitBake 2.2 and later)
    recipe = tmp_path / "test-image.bb"
    recipe.write_text(f"inherit image\n{extra}")
    return bb.parse.handle(str(recipe), d)[""]


def _postprocess(d: Any) -> None:
    """Run the image's do_rootfs: the release's execute_pre_post_process over ROOTFS_POSTPROCESS_COMMAND."""
    _bb().build.exec_func("do_rootfs", d)


def _ran(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The functions execute_pre_post_process ran, in order, from its notes."""
    notes = [r.getMessage() for r in caplog.records]
    return [n.removeprefix("Executing ").removesuffix(" ...") for n in notes if n.startswith("Executing ")]


def _fatal(caplog: pytest.LogCaptureFixture) -> str:
    """What bb.fatal said."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL)


def _build_error(tmp_path: Path, rootfs: Path, caplog: pytest.LogCaptureFixture, extra: str = "") -> str:
    """What bb.fatal says when do_rootfs fails; the layer and the recipe must parse."""
    d = _parse(tmp_path, rootfs, extra)
    with pytest.raises(_bb().BBHandledException):
        _postprocess(d)
    return _fatal(caplog)


# -- the release's BitBake and the layer's configuration ----------------------------------------------------------


def test_bitbake_is_the_releases() -> None:
    bb = _bb()
    if RELEASE.bitbake is None:
        assert Path(bb.__file__).is_relative_to(sysconfig.get_paths()["purelib"]), bb.__file__
    else:
        assert bb.__version__.startswith(RELEASE.bitbake + "."), bb.__version__
        assert Path(bb.__file__).is_relative_to(BITBAKE_TREES / RELEASE.bitbake), bb.__file__


def test_layer_conf_and_class_parse(tmp_path: Path) -> None:
    d = _parse(tmp_path, _rootfs(tmp_path))
    assert "imageprov" in d.getVar("BBFILE_COLLECTIONS").split()
    assert str(LAYER) in d.getVar("BBPATH").split(":")
    assert {"kirkstone", "scarthgap"} <= set(d.getVar("LAYERSERIES_COMPAT_imageprov").split())
    assert d.getVarFlag("imageprov_mender_conf", "python")
    # No host tool: the function is Python, and names no program.
    body = d.getVar("imageprov_mender_conf", False)
    assert "subprocess" not in body and "imageprov " not in body
    assert not (LAYER.parent.parent / "scripts" / "yocto").exists(), "the old class is gone"


def test_the_layer_does_not_load_with_a_release_it_does_not_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # BitBake's cooker checks LAYERSERIES_COMPAT against the core layer's series: the check is live.
    bb = _bb()
    with pytest.raises(bb.BBHandledException):
        _config(tmp_path, _rootfs(tmp_path), corenames="dunfell")
    assert "Layer imageprov is not compatible with the core layer" in _fatal(caplog)


def test_postprocess_entries_run_in_order_among_the_releases_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rootfs = _rootfs(tmp_path)
    _postprocess(_parse(tmp_path, rootfs, 'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\n'))
    # An entry merged with its neighbour (kirkstone splits at ";" alone) would be one unknown name here.
    assert _ran(caplog) == list(RELEASE.order)
    assert "ran rootfs_update_timestamp" in caplog.messages and "ran mender_update_fstab_file" in caplog.messages
    assert json.loads((rootfs / "data/mender/mender.conf").read_text())["HttpsClient"] == BLOCK


def test_do_rootfs_signature_follows_the_class_functions(tmp_path: Path) -> None:
    # Kirkstone parses the list as shell code for do_rootfs's signature, later releases take its words as
    # vardeps: either way an edit of the class's functions must rebuild the rootfs.
    bb = _bb()
    d = _parse(tmp_path, _rootfs(tmp_path), 'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\n')
    _, deps, _ = bb.data.generate_dependencies(d, set())
    reached, todo = set(), ["do_rootfs"]
    while todo:
        name = todo.pop()
        reached.add(name)
        todo.extend(deps.get(name, set()) - reached)
    assert {*OURS, "imageprov_has_mender", "imageprov_check_data_link"} <= reached


# -- the conf ------------------------------------------------------------------------------------------------------


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


def test_a_rootfs_block_is_refused_and_nothing_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rootfs = _rootfs(tmp_path, {**TRANSIENT, "HttpsClient": {"Certificate": "/etc/c.pem", "Key": "/etc/k.pem"}})
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    error = _build_error(tmp_path, rootfs, caplog)
    assert error.startswith("imageprov: /etc/mender/mender.conf in the image sets HttpsClient, which the client")
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


def test_rootfs_target_and_paths_are_settings(tmp_path: Path) -> None:
    # /var/lib/mender a directory (meta-mender without mender-image): the rootfs conf is read all the same.
    rootfs = _rootfs(tmp_path, var_lib_mender=None)
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


def test_a_device_key_in_the_build_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rootfs = _rootfs(tmp_path)
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    (rootfs / "data/mender/mender-cert-private.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    error = _build_error(tmp_path, rootfs, caplog)
    assert error.startswith("imageprov: the image holds /data/mender/mender-cert-private.pem: per-device files")
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


def test_auth_key_device_leaves_security_as_the_build_has_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rootfs = _rootfs(tmp_path)
    conf_path = rootfs / "data/mender/mender.conf"
    conf_path.write_text(json.dumps({**PERSISTENT, "Security": {"AuthPrivateKey": "/data/mender/own.pem"}}))
    _postprocess(_parse(tmp_path, rootfs, 'IMAGEPROV_AUTH_KEY = "device"\n'))
    conf = json.loads(conf_path.read_text())
    assert conf["Security"] == {"AuthPrivateKey": "/data/mender/own.pem"}
    assert conf["HttpsClient"] == BLOCK
    # Anything else is a build error, not a silent default.
    error = _build_error(tmp_path, rootfs, caplog, 'IMAGEPROV_AUTH_KEY = "yes"\n')
    assert error == 'imageprov: IMAGEPROV_AUTH_KEY must be "cert" or "device", not \'yes\''


# -- images the class must leave alone or refuse (IMAGE_CLASSES reaches every image) ------------------------------


def test_an_image_without_mender_is_left_alone_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hostname").write_text("plain\n")
    _postprocess(_parse(tmp_path, rootfs, 'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\n'))
    assert sorted(p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*")) == ["etc", "etc/hostname"]
    note = "imageprov: test-image has no /etc/mender/mender.conf (an image without the Mender client): left as it is"
    assert caplog.messages.count(note) == 2  # once for each of the class's functions


@pytest.mark.parametrize(
    ("var_lib_mender", "found"),
    [
        ("directory", "a directory"),  # meta-mender without mender-image
        ("missing", "missing"),  # the client would make a directory there
        ("/var/lib/mender-state", "a link to /var/lib/mender-state"),
    ],
)
def test_a_data_conf_the_client_would_not_read_fails_the_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, var_lib_mender: str, found: str
) -> None:
    rootfs = _rootfs(tmp_path, var_lib_mender=None if var_lib_mender == "directory" else var_lib_mender)
    if var_lib_mender == "missing":
        (rootfs / "var/lib/mender").unlink()
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    assert _build_error(tmp_path, rootfs, caplog) == (
        f"imageprov: /var/lib/mender in the image is {found}, not the link to /data/mender that meta-mender makes "
        "with MENDER_FEATURES mender-image: the Mender client would never read /data/mender/mender.conf. Build the "
        'image with mender-image, or set IMAGEPROV_MENDER_CONF = "/etc/mender/mender.conf" to write the root '
        "filesystem's conf"
    )
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


def test_a_relative_data_link_is_the_same_link(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path, var_lib_mender="../../data/mender")
    _postprocess(_parse(tmp_path, rootfs))
    assert json.loads((rootfs / "data/mender/mender.conf").read_text())["HttpsClient"] == BLOCK


def test_a_target_through_a_link_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The absolute link would be followed on the build host, out of the image tree.
    rootfs = _rootfs(tmp_path)
    error = _build_error(tmp_path, rootfs, caplog, 'IMAGEPROV_MENDER_CONF = "/var/lib/mender/mender.conf"\n')
    assert error.startswith("imageprov: /var/lib/mender in the image is a link to /data/mender: ")


# -- keys matched as the clients match them -----------------------------------------------------------------------


def test_keys_in_another_case_are_replaced_in_place_in_menders_spelling(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    data = {**PERSISTENT, "httpsclient": {"certificate": "/old.pem", "KEY": "/old.key"},
            "SECURITY": {"sslengine": "pkcs11", "otherField": 2}, "Extra": 1}  # fmt: skip
    (rootfs / "data/mender/mender.conf").write_text(json.dumps(data))
    _postprocess(_parse(tmp_path, rootfs))
    conf_path = rootfs / "data/mender/mender.conf"
    conf = json.loads(conf_path.read_text())
    # One key each, where it was, in Mender's spelling; the other Security field kept as spelled, the engine
    # gone with the key it loaded (a file key now).
    assert list(conf) == [*PERSISTENT, "HttpsClient", "Security", "Extra"]
    assert conf["HttpsClient"] == BLOCK
    assert conf["Security"] == {"otherField": 2, "AuthPrivateKey": BLOCK["Key"]}
    effective = client_config(rootfs / "etc/mender/mender.conf", conf_path, tmp_path)
    assert effective["HttpsClient"] == BLOCK and effective["Security"]["AuthPrivateKey"] == BLOCK["Key"]


def test_a_rootfs_block_in_another_case_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The client reads "httpsclient" in /etc/mender/mender.conf as HttpsClient, over the data conf.
    rootfs = _rootfs(tmp_path, {**TRANSIENT, "httpsclient": {"Certificate": "/etc/c.pem"}})
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    error = _build_error(tmp_path, rootfs, caplog)
    assert error.startswith("imageprov: /etc/mender/mender.conf in the image sets httpsclient, which the client")
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


@pytest.mark.parametrize(
    ("where", "text", "said"),
    [
        ("data", '{"HttpsClient": {}, "httpsClient": {}}', 'holds "HttpsClient" and "httpsClient", one key'),
        ("data", '{"Security": {"AuthPrivateKey": "/a", "authprivatekey": "/b"}}',
         'holds "Security.AuthPrivateKey" and "Security.authprivatekey", one key'),
        ("data", '{"RootfsPartA": "/dev/a", "RootfsPartA": "/dev/b"}', 'holds the key "RootfsPartA" twice'),
        ("main", '{"ServerURL": "https://a", "serverurl": "https://b"}', 'holds "ServerURL" and "serverurl"'),
        ("data", '{"Httpsclient": {}, "\u017fecurity": {}}', r'has the key "\u017fecurity"'),
        ("main", '{"ServerURL": 1}', "has a ServerURL that is not a string"),
        ("data", '{"HttpsClient": "x"}', "has a HttpsClient that is not a JSON object"),
    ],
    ids=["two-spellings", "in-a-block", "twice", "in-main", "long-s", "not-a-string", "not-an-object"],
)  # fmt: skip
def test_a_conf_the_clients_read_apart_fails_the_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str, text: str, said: str
) -> None:
    rootfs = _rootfs(tmp_path)
    path = rootfs / ("data/mender/mender.conf" if where == "data" else "etc/mender/mender.conf")
    path.write_text(text)
    data_before = (rootfs / "data/mender/mender.conf").read_bytes()
    error = _build_error(tmp_path, rootfs, caplog)
    assert error.startswith(f"imageprov: {'/data' if where == 'data' else '/etc'}/mender/mender.conf in the image ")
    assert said in error, error
    assert (rootfs / "data/mender/mender.conf").read_bytes() == data_before


# -- trust in the edge (IMAGEPROV_SERVER_CA) ----------------------------------------------------------------------


def _openssl_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    tool("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-subj", f"/CN={name}", "-days", "30")  # fmt: skip
    return cert, key


def test_server_ca_is_installed_and_named_in_the_conf(tmp_path: Path) -> None:
    cert, _ = _openssl_cert(tmp_path, "edge-ca")
    # As `openssl x509 -text` writes it: the text before the block is not installed.
    source = tmp_path / "edge-ca.pem"
    source.write_text("Certificate:\n    Data: ...\n" + cert.read_text())
    rootfs = _rootfs(tmp_path)
    _postprocess(_parse(tmp_path, rootfs, f'IMAGEPROV_SERVER_CA = "{source}"\n'))
    installed = rootfs / "data/mender/server.crt"
    assert installed.read_text() == cert.read_text()
    assert installed.stat().st_mode & 0o7777 == 0o644
    conf_path = rootfs / "data/mender/mender.conf"
    assert json.loads(conf_path.read_text())["ServerCertificate"] == "/data/mender/server.crt"
    assert "ServerCertificate" not in json.loads((rootfs / "etc/mender/mender.conf").read_text())
    assert client_config(rootfs / "etc/mender/mender.conf", conf_path, tmp_path)["ServerCertificate"] == (
        "/data/mender/server.crt"
    )
    # openssl reads the installed file as the certificate given.
    fingerprint = ("openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in")
    assert tool(*fingerprint, installed).stdout == tool(*fingerprint, cert).stdout
    # In the rootfs conf, when that is the target; the file stays on the data partition.
    rootfs2 = _rootfs(tmp_path / "second")
    extra = f'IMAGEPROV_SERVER_CA = "{cert}"\nIMAGEPROV_MENDER_CONF = "/etc/mender/mender.conf"\n'
    _postprocess(_parse(tmp_path / "second", rootfs2, extra))
    assert (
        json.loads((rootfs2 / "etc/mender/mender.conf").read_text())["ServerCertificate"] == "/data/mender/server.crt"
    )
    assert (rootfs2 / "data/mender/server.crt").read_text() == cert.read_text()


def test_without_server_ca_nothing_is_installed(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    _postprocess(_parse(tmp_path, rootfs))
    assert not (rootfs / "data/mender/server.crt").exists()
    assert "ServerCertificate" not in json.loads((rootfs / "data/mender/mender.conf").read_text())


@pytest.mark.parametrize("case", ["key", "cert-and-key", "not-pem", "relative", "missing", "rootfs-overrides"])
def test_a_bad_server_ca_fails_the_build(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    cert, key = _openssl_cert(tmp_path, "edge")
    both = tmp_path / "both.pem"
    both.write_text(cert.read_text() + key.read_text())
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    source, said, main = {
        "key": (key, "holds a private key", None),
        "cert-and-key": (both, "holds a private key", None),
        "not-pem": (junk, "holds no PEM certificate", None),
        "relative": (Path("edge.crt"), "must be an absolute path", None),
        "missing": (tmp_path / "absent.pem", "cannot read IMAGEPROV_SERVER_CA", None),
        "rootfs-overrides": (cert, "sets serverCertificate, which the client reads over",
                             {**TRANSIENT, "serverCertificate": "/etc/other.crt"}),
    }[case]  # fmt: skip
    rootfs = _rootfs(tmp_path, main)
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    error = _build_error(tmp_path, rootfs, caplog, f'IMAGEPROV_SERVER_CA = "{source}"\n')
    assert error.startswith("imageprov: ") and said in error, error
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before
    assert not (rootfs / "data/mender/server.crt").exists()


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


def test_identity_script_is_opt_in(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rootfs = _rootfs(tmp_path)
    ours = _meta_mender_identity(rootfs)
    before = ours.read_bytes()
    _postprocess(_parse(tmp_path, rootfs))
    assert [name for name in _ran(caplog) if name in OURS] == ["imageprov_mender_conf"]
    assert ours.read_bytes() == before
    d = _parse(tmp_path, rootfs, 'IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"\n')
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
def test_bad_identity_settings_are_build_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: str) -> None:
    rootfs = _rootfs(tmp_path)
    error = _build_error(tmp_path, rootfs, caplog, extra)
    assert error.startswith(
        ("imageprov: IMAGEPROV_IDENTITY_ATTRIBUTE must", "imageprov: IMAGEPROV_DEVICE_ID_FILE must")
    )
    assert not (rootfs / IDENTITY_SCRIPT).exists()


def test_a_device_id_file_in_the_build_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rootfs = _rootfs(tmp_path)
    before = (rootfs / "data/mender/mender.conf").read_bytes()
    # Every device would share it: the id is stamped on the line, as the key is.
    (rootfs / DEVICE_ID_FILE.lstrip("/")).write_text("SN-0001\n")
    assert _build_error(tmp_path, rootfs, caplog).startswith(f"imageprov: the image holds {DEVICE_ID_FILE}: ")
    assert (rootfs / "data/mender/mender.conf").read_bytes() == before


# -- keys made on the device (IMAGEPROV_ENROLL) -------------------------------------------------------------------

ENROLL = 'IMAGEPROV_ENROLL = "1"\nlibdir = "/usr/lib"\nsystemd_system_unitdir = "/lib/systemd/system"\n'
ENROLL_UNITS = ("imageprov-enroll.service", "imageprov-enroll-renew.service", "imageprov-enroll-renew.timer")


def test_enroll_names_the_token_key_and_installs_the_program(tmp_path: Path) -> None:
    """The block ``stamp --enroll`` writes (so that stamping changes no conf), the program the end-to-end test
    runs (tests/test_enroll_device.py), its units enabled, and the client waiting for it."""
    rootfs = _rootfs(tmp_path)
    d = _parse(tmp_path, rootfs, ENROLL)
    assert d.getVar("IMAGE_INSTALL").split() == ["curl", "openssl-bin", "gnutls-bin", "opensc", "libp11", "tpm2-pkcs11"]
    _postprocess(d)
    conf = json.loads((rootfs / "data/mender/mender.conf").read_text())
    expected = json.loads(merge(None, Enrollment("https://edge.example.com/.well-known/est").settings(Settings()),
                                "a new conf").text)  # fmt: skip
    assert (conf["HttpsClient"], conf["Security"]) == (expected["HttpsClient"], expected["Security"])
    assert conf["HttpsClient"] == {"Certificate": BLOCK["Certificate"], "Key": KEY_URI, "SSLEngine": "pkcs11"}
    program = rootfs / "usr/sbin/imageprov-enroll"
    assert program.read_bytes() == (LAYER / "files/imageprov-enroll").read_bytes()
    assert program.stat().st_mode & 0o7777 == 0o755
    for unit in ENROLL_UNITS:
        assert (rootfs / "lib/systemd/system" / unit).read_bytes() == (LAYER / "files" / unit).read_bytes()
    assert os.readlink(rootfs / "etc/systemd/system/multi-user.target.wants/imageprov-enroll.service") == (
        "/lib/systemd/system/imageprov-enroll.service")  # fmt: skip
    assert os.readlink(rootfs / "etc/systemd/system/timers.target.wants/imageprov-enroll-renew.timer") == (
        "/lib/systemd/system/imageprov-enroll-renew.timer")  # fmt: skip
    for client in ("mender-client.service", "mender-authd.service", "mender-updated.service"):
        drop_in = (rootfs / f"etc/systemd/system/{client}.d/imageprov-enroll.conf").read_text()
        assert "Requires=imageprov-enroll.service\nAfter=imageprov-enroll.service\n" in drop_in
        assert "Environment=PKCS11_MODULE_PATH=/usr/lib/pkcs11/libtpm2_pkcs11.so\n" in drop_in
    default = (rootfs / "etc/default/imageprov-enroll").read_text()
    assert "PKCS11_MODULE_PATH=/usr/lib/pkcs11/libtpm2_pkcs11.so\nTPM2_PKCS11_STORE=/data/imageprov/token\n" in default
    # The service reads the enroll.conf stamp writes, where stamp writes it.
    service = (rootfs / "lib/systemd/system/imageprov-enroll.service").read_text()
    assert f"ConditionPathExists={ENROLL_CONF.device_path}\n" in service
    # Idempotent, and nothing of the program without the setting.
    first = {p: p.read_bytes() for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink()}
    _postprocess(_parse(tmp_path, rootfs, ENROLL))
    assert {p: p.read_bytes() for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink()} == first
    plain = _rootfs(tmp_path / "plain")
    d = _parse(tmp_path / "plain", plain)
    assert not (d.getVar("IMAGE_INSTALL") or "").split()
    _postprocess(d)
    assert not (plain / "usr/sbin/imageprov-enroll").exists() and not (plain / "etc/systemd").exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ('IMAGEPROV_ENROLL = "yes"\n', "imageprov: IMAGEPROV_ENROLL must be \"1\" (or unset), not 'yes'"),
        (ENROLL + 'IMAGEPROV_AUTH_KEY = "device"\n', "imageprov: IMAGEPROV_ENROLL signs auth requests with the token"),
        (
            ENROLL + 'IMAGEPROV_ENROLL_PKCS11_MODULE = "lib/x.so"\n',
            "imageprov: IMAGEPROV_ENROLL_PKCS11_MODULE must be an abs",
        ),
    ],
    ids=["not-a-switch", "device-auth-key", "relative-module"],
)
def test_bad_enroll_settings_are_build_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: str, said: str
) -> None:
    rootfs = _rootfs(tmp_path)
    assert _build_error(tmp_path, rootfs, caplog, extra).startswith(said)
    assert not (rootfs / "usr/sbin/imageprov-enroll").exists()


def test_a_file_key_leaves_no_engine_from_a_token_conf(tmp_path: Path) -> None:
    """An image built without IMAGEPROV_ENROLL over a conf that had the token's key: the engine would be asked to
    load a file's path, so it goes with the key it loaded."""
    rootfs = _rootfs(tmp_path)
    conf_path = rootfs / "data/mender/mender.conf"
    conf_path.write_text(json.dumps({**PERSISTENT, "Security": {"AuthPrivateKey": KEY_URI, "SSLEngine": "pkcs11"}}))
    _postprocess(_parse(tmp_path, rootfs))
    assert json.loads(conf_path.read_text())["Security"] == SECURITY


def test_a_bootstrap_credential_in_the_build_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rootfs = _rootfs(tmp_path)
    key = rootfs / "data/imageprov/enroll/bootstrap-key.pem"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    error = _build_error(tmp_path, rootfs, caplog, ENROLL)
    assert error.startswith("imageprov: the image holds /data/imageprov/enroll/bootstrap-key.pem: per-device files")


# -- every test above, under each older release's BitBake ---------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, release in RELEASES.items() if release.bitbake])
def test_the_layer_under_release(name: str) -> None:
    series = RELEASES[name].bitbake
    assert series is not None
    tree = BITBAKE_TREES / series / "lib"
    if not (tree / "bb" / "__init__.py").is_file():
        message = (
            f"{name}'s BitBake is not installed in {tree}: scripts/setup --test installs it from BitBake's git "
            "repository (IMAGEPROV_BITBAKE_GIT names a copy of it where that cannot be reached)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, RELEASE_ENV: name}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not under_release"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
