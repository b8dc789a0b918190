"""Shared fixtures: real images built with real tools, and real tools to check them.

A test that needs a tool that is missing skips on a developer's machine and
fails in CI (CI=true), where scripts/setup must have installed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imageprov.disk.golden import GoldenSpec, Scheme, build_golden

SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# imageprov as this interpreter runs it: never a bare `imageprov` or `python3` from PATH,
# which may be another install than the one under test.
IMAGEPROV_ARGV = (sys.executable, "-m", "imageprov")


def sigint_default() -> None:
    """``preexec_fn`` of a child a test means to interrupt: SIGINT at its default disposition.

    A runner that ignores SIGINT (``nohup``, ``cmd &`` in a script, many CI runners) passes the
    ignored disposition on to every child; Python then installs no KeyboardInterrupt handler and a
    shell's ``kill -INT`` does nothing, so the child would run to its end instead of being interrupted.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def need(*tools: str) -> None:
    """Skip (fail in CI) unless every tool is installed."""
    path = os.environ.get("PATH", "") + os.pathsep + SBIN
    missing = [t for t in tools if shutil.which(t, path=path) is None]
    if missing:
        message = f"missing tools: {', '.join(missing)} (scripts/setup --test installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def tool(*argv: str | Path, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a real tool (not through imageprov's wrapper) and return its output."""
    need(str(argv[0]))
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN, "LANG": "C.UTF-8"}
    return subprocess.run([str(a) for a in argv], capture_output=True, check=check, env=env, input=input)


def imageprov(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real imageprov CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "imageprov", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"imageprov {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sfdisk_json(image: Path) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(tool("sfdisk", "--json", image).stdout)["partitiontable"]
    return table


def offset_of(image: Path, number: int) -> int:
    for part in sfdisk_json(image)["partitions"]:
        if part["node"] == f"{image}{number}":
            return int(part["start"]) * 512
    raise AssertionError(f"no partition {number} in {image}")


def debugfs(image: Path, number: int, command: str) -> str:
    """Run one debugfs request on partition ``number``, read-only."""
    proc = tool("debugfs", "-R", command, f"{image}?offset={offset_of(image, number)}")
    return proc.stdout.decode()


def e2fsck_clean(image: Path, number: int) -> None:
    proc = tool("e2fsck", "-fn", f"{image}?offset={offset_of(image, number)}", check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def fsck_vfat_clean(image: Path, number: int, tmp: Path) -> None:
    """fsck.vfat has no offset option: check a copy of the partition."""
    part = next(p for p in sfdisk_json(image)["partitions"] if p["node"] == f"{image}{number}")
    copy = tmp / f"vfat-{number}.img"
    with open(image, "rb") as src, open(copy, "wb") as dst:
        src.seek(part["start"] * 512)
        dst.write(src.read(part["size"] * 512))
    proc = tool("fsck.vfat", "-n", copy, check=False)
    assert proc.returncode == 0, proc.stdout.decode()


@pytest.fixture
def make_golden(tmp_path: Path) -> Callable[..., Path]:
    """Build a golden image in tmp_path with sfdisk, mkfs.vfat and mke2fs -d."""
    need("sfdisk", "mkfs.vfat", "mke2fs")

    def make(scheme: Scheme = Scheme.MBR, name: str | None = None, **kwargs: Any) -> Path:
        path = tmp_path / (name or f"golden-{scheme.value}{scheme.suffix}")
        return build_golden(path, GoldenSpec(scheme=scheme, **kwargs))

    return make


@pytest.fixture(params=list(Scheme), ids=[s.value for s in Scheme])
def golden(request: pytest.FixtureRequest, make_golden: Callable[..., Path]) -> Path:
    """A golden image for each of the three layouts: MBR, MBR with extended, GPT."""
    return make_golden(request.param)


# Partition types that hold no Mender filesystem: extended containers and swap (MBR codes, GPT GUIDs).
_NOT_A_VOLUME = {"5", "f", "85", "82", "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"}


def roles(image: Path) -> dict[str, int]:
    """Partition numbers by Mender role, read with sfdisk alone (not imageprov's reader).

    Mender's image classes lay out boot, rootfs A, rootfs B first and data
    last, with only extended containers and swap besides.
    """
    volumes = [
        int(re.findall(r"\d+$", p["node"])[0])
        for p in sfdisk_json(image)["partitions"]
        if p["type"].lower() not in _NOT_A_VOLUME
    ]
    boot, rootfs_a, rootfs_b, *_, data = volumes
    return {"boot": boot, "rootfs-a": rootfs_a, "rootfs-b": rootfs_b, "data": data}


PASSPHRASE = "test passphrase 1"


def cli_env(passphrase: str | None = PASSPHRASE, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGEPROV_CA_PASSPHRASE"}
    if passphrase is not None:
        env["IMAGEPROV_CA_PASSPHRASE"] = passphrase
    return {**env, **extra}


def imageprov_pki(
    *args: str | Path, check: bool = True, passphrase: str | None = PASSPHRASE
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI with the test CA's passphrase (or none) in the environment, no terminal."""
    proc = subprocess.run(
        [sys.executable, "-m", "imageprov", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(passphrase),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"imageprov {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A PKI made by the real CLI, with an encrypted CA key."""
    path = tmp_path / "pki"
    imageprov_pki("ca", "init", path, "--cn", "Test Fleet CA", "--org", "imageprov tests", "--country", "NO")
    return path


def partition_bytes(image: Path, number: int) -> str:
    """SHA-256 of one partition's bytes, located by sfdisk."""
    part = next(p for p in sfdisk_json(image)["partitions"] if p["node"] == f"{image}{number}")
    digest = hashlib.sha256()
    with open(image, "rb") as handle:
        handle.seek(part["start"] * 512)
        left = part["size"] * 512
        while left:
            block = handle.read(min(left, 1 << 20))
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()
