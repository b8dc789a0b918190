"""The one way imageprov runs another program.

Modelled on mkosi's ``run()``: argv lists only (never a shell, so a path or a
device id can never become a command), a fixed C.UTF-8 environment so that the
messages we parse are the untranslated ones, stdin closed, and the command
logged with ``shlex.join`` for ``--debug``.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from imageprov.errors import ToolError

log = logging.getLogger("imageprov")

# Which Debian package brings each tool we drive, for the "not found" hint.
PACKAGES = {
    "debugfs": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "fsck.vfat": "dosfstools",
    "openssl": "openssl",
    "mender-artifact": "mender-artifact",
    "mender": "mender-client",
    "nginx": "nginx-light",
    "bmaptool": "bmap-tools",
    "zstd": "zstd",
    "unsquashfs": "squashfs-tools",
}

# Debian keeps e2fsprogs and dosfstools in /sbin, which is not on a normal
# user's PATH.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str


def find_tool(name: str) -> str:
    """Return the absolute path of ``name`` or raise a ToolError naming its package."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_EXTRA_PATH)
    found = shutil.which(name, path=path)
    if found is None:
        package = PACKAGES.get(name, name)
        raise ToolError(f"{name} not found", hint=f"install {package}: apt-get install {package}")
    return found


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 600,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> Completed:
    """Run ``argv`` and capture its output; raise ToolError if it fails and ``check``."""
    full = [find_tool(argv[0]), *argv[1:]]
    log.debug("+ %s", shlex.join(full))
    environment = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if env:
        environment.update(env)
    try:
        proc = subprocess.run(
            full,
            input=input,
            # stdin is closed unless we feed it: no tool may wait on a terminal.
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            env=environment,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{argv[0]} took longer than {timeout:.0f} s", hint="see --debug") from exc
    stderr = proc.stderr.decode("utf-8", "replace")
    if stderr:
        log.debug("%s stderr: %s", argv[0], stderr.strip())
    done = Completed(tuple(full), proc.returncode, proc.stdout, stderr)
    if check and proc.returncode != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {proc.returncode}"
        raise ToolError(f"{argv[0]} failed: {last}", hint="run with --debug to see the command")
    return done
