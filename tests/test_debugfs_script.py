"""The debugfs script builder: which paths may reach debugfs, how they are quoted, and the exact commands.

Pure: no image, no debugfs. test_files.py runs the scripts through the real
debugfs; these pin down what is sent, and run against every mutant of the
builder (scripts/mutants).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from imageprov.disk.ext4 import NewFile, PlannedFile, WritePlan, fs_path
from imageprov.errors import UsageError


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("/", "/"),
        ("/data", "/data"),
        ("//mender///x/", "/mender/x"),
        ("/with space/and-dash", "/with space/and-dash"),
        ("/" + "n" * 255, "/" + "n" * 255),
        ("/ünï", "/ünï"),
    ],
)
def test_paths_accepted(text: str, path: str) -> None:
    assert fs_path(text) == PurePosixPath(path)


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        ("mender/x", "'mender/x' is not an absolute path inside the filesystem", ""),
        ("", "'' is not an absolute path inside the filesystem", ""),
        ('/a"b', "'/a\"b' holds a quote, a backslash or a control character", "rename it"),
        ("/a\\b", "'/a\\\\b' holds a quote, a backslash or a control character", "rename it"),
        ("/a\nb", "'/a\\nb' holds a quote, a backslash or a control character", "rename it"),
        ("/a\x00b", "'/a\\x00b' holds a quote, a backslash or a control character", "rename it"),
        ("/a\x1fb", "'/a\\x1fb' holds a quote, a backslash or a control character", "rename it"),
        ("/a\x7fb", "'/a\\x7fb' holds a quote, a backslash or a control character", "rename it"),
        ("/a/../b", "'/a/../b' holds '.' or '..'", "give the path without them"),
        ("/a/./b", "'/a/./b' holds '.' or '..'", "give the path without them"),
        ("/" + "n" * 256, f"a name in '/{'n' * 256}' is longer than 255 bytes", ""),
        ("/" + "é" * 128, f"a name in '/{'é' * 128}' is longer than 255 bytes", ""),  # 256 bytes in UTF-8
    ],
    ids=["relative", "empty", "quote", "backslash", "newline", "nul", "unit-separator", "delete", "dotdot", "dot",
         "long", "long-in-bytes"],
)  # fmt: skip
def test_paths_refused(text: str, message: str, hint: str) -> None:
    with pytest.raises(UsageError) as info:
        fs_path(text)
    assert (info.value.message, info.value.hint) == (message, hint)


def test_names_with_dots_inside_are_names() -> None:
    assert fs_path("/a/.hidden/..x/...") == PurePosixPath("/a/.hidden/..x/...")


KEY, CERT = PurePosixPath("/mender/mender-cert-private.pem"), PurePosixPath("/mender/mender-cert.pem")


def test_commands() -> None:
    plan = WritePlan(
        mkdirs=(PurePosixPath("/mender"), PurePosixPath("/mender/sub dir")),
        files=(PlannedFile(KEY, replace=True), PlannedFile(CERT, replace=False)),
    )
    files = [NewFile(CERT, b"cert", 0o644, 0, 0), NewFile(KEY, b"key", 0o600, 5, 1000)]
    sources = {KEY: Path("/tmp/s 0/f0"), CERT: Path("/tmp/s 0/f1")}
    assert plan.commands(files, sources) == [
        'mkdir "/mender"',
        'sif "/mender" mode 040755',
        'sif "/mender" uid 0',
        'sif "/mender" gid 0',
        'mkdir "/mender/sub dir"',
        'sif "/mender/sub dir" mode 040755',
        'sif "/mender/sub dir" uid 0',
        'sif "/mender/sub dir" gid 0',
        'rm "/mender/mender-cert-private.pem"',  # debugfs's write never overwrites
        'write "/tmp/s 0/f0" "/mender/mender-cert-private.pem"',
        'sif "/mender/mender-cert-private.pem" mode 0100600',
        'sif "/mender/mender-cert-private.pem" uid 5',
        'sif "/mender/mender-cert-private.pem" gid 1000',
        'write "/tmp/s 0/f1" "/mender/mender-cert.pem"',
        'sif "/mender/mender-cert.pem" mode 0100644',
        'sif "/mender/mender-cert.pem" uid 0',
        'sif "/mender/mender-cert.pem" gid 0',
    ]


def test_commands_with_another_directory_mode_and_special_bits() -> None:
    plan = WritePlan(mkdirs=(PurePosixPath("/d"),), files=(PlannedFile(KEY, replace=False),), dir_mode=0o700)
    commands = plan.commands([NewFile(KEY, b"", 0o4755)], {KEY: Path("/s")})
    assert commands[1] == 'sif "/d" mode 040700'
    assert 'sif "/mender/mender-cert-private.pem" mode 0104755' in commands


@pytest.mark.parametrize(
    "files",
    [
        [NewFile(KEY, b"")],  # one missing
        [NewFile(KEY, b""), NewFile(CERT, b""), NewFile(PurePosixPath("/x"), b"")],  # one more
        [NewFile(KEY, b""), NewFile(KEY, b"")],  # twice
        [NewFile(KEY, b""), NewFile(PurePosixPath("/x"), b"")],  # another
    ],
    ids=["missing", "extra", "twice", "another"],
)
def test_commands_refuse_files_that_were_not_planned(files: list[NewFile]) -> None:
    plan = WritePlan(mkdirs=(), files=(PlannedFile(KEY, replace=False), PlannedFile(CERT, replace=False)))
    with pytest.raises(UsageError) as info:
        plan.commands(files, {f.path: Path("/s") for f in files})
    assert info.value.message == "the files to write are not the ones planned"


def test_nothing_to_do() -> None:
    assert WritePlan(mkdirs=(), files=()).commands([], {}) == []
