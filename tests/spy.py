"""Real tools with a fault planted, for tests that must see imageprov's own checks refuse.

``install_spy(bin_dir, "debugfs", fault=...)`` writes an executable
``bin_dir/debugfs`` that runs the real debugfs, after logging what it is
handed and, for the one debugfs run that writes a device's key and
certificate, planting one fault: a wrong mode, a changed or foreign file, a
filesystem that e2fsck refuses. Put ``bin_dir`` first on imageprov's PATH.

Nothing inside imageprov is mocked or patched: it runs as a user runs it, and
its subprocesses get a tool that misbehaves the way an old or broken tool
would (debugfs exits 0 even when a write fails). ``run()`` passes only PATH
to tools, so the fault and the log's path are written into the spy itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tests.conftest import SBIN, need

KEY_FILE = "/mender/mender-cert-private.pem"
CERT_FILE = "/mender/mender-cert.pem"

_SPY = r"""#!{python}
import json, os, re, shlex, stat, subprocess, sys

REAL, FAULT, LOG, NAME = {real!r}, {fault!r}, {log!r}, {name!r}
FOREIGN_CERT, FOREIGN_KEY = {foreign_cert!r}, {foreign_key!r}
args = sys.argv[1:]


def mode(path):
    return oct(stat.S_IMODE(os.stat(path).st_mode))


def note(**entry):
    with open(LOG, "a") as log:
        log.write(json.dumps({{"tool": NAME, **entry}}) + "\n")


if NAME == "mender-artifact" and args[:1] == ["install"]:
    local = args[3]
    note(action="install", source=local, mode=mode(local), dir_mode=mode(os.path.dirname(local)))
    sys.exit(subprocess.call([REAL, *args]))

script = args[args.index("-f") + 1] if "-f" in args else None
lines = open(script).read().splitlines() if script else []
for line in lines:
    words = shlex.split(line)
    if words[:1] == ["write"]:
        note(action="write", source=words[1], target=words[2], mode=mode(words[1]),
             dir_mode=mode(os.path.dirname(words[1])))
    elif words[:1] == ["dump"]:
        note(action="dump", source=words[1], dir_mode=mode(os.path.dirname(words[2])))

device = "-w" in args and any(shlex.split(ln)[:1] == ["write"] and shlex.split(ln)[2] == {key!r} for ln in lines)
if device and FAULT:
    note(action="fault", fault=FAULT)
    sources = {{shlex.split(ln)[2]: shlex.split(ln)[1] for ln in lines if shlex.split(ln)[:1] == ["write"]}}
    if FAULT == "mode":
        lines = [ln.replace("mode 0100600", "mode 0100644") for ln in lines]
    elif FAULT == "content":
        with open(sources[{cert!r}], "ab") as handle:
            handle.write(b"\n")
    elif FAULT == "foreign-cert":
        with open(sources[{cert!r}], "wb") as handle:
            handle.write(open(FOREIGN_CERT, "rb").read())
    elif FAULT == "foreign-key":
        with open(sources[{key!r}], "wb") as handle:
            handle.write(open(FOREIGN_KEY, "rb").read())
    with open(script, "w") as handle:
        handle.write("\n".join(lines) + "\n")
status = subprocess.call([REAL, *args])
if device and FAULT == "fsck":
    # A link count e2fsck -fn refuses, and nothing else changed.
    subprocess.call([REAL, "-w", "-R", "sif /mender/device_type links_count 2", args[-1]],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
sys.exit(status)
"""


def install_spy(
    bin_dir: Path,
    name: str,
    log: Path,
    *,
    fault: str = "",
    foreign_cert: Path | None = None,
    foreign_key: Path | None = None,
) -> Path:
    """Write ``bin_dir/name``: the real tool, logging to ``log`` and with ``fault`` planted."""
    need(name)
    real = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN)
    bin_dir.mkdir(parents=True, exist_ok=True)
    spy = bin_dir / name
    spy.write_text(
        _SPY.format(
            python=sys.executable,
            real=real,
            fault=fault,
            log=str(log),
            name=name,
            foreign_cert=str(foreign_cert or ""),
            foreign_key=str(foreign_key or ""),
            key=KEY_FILE,
            cert=CERT_FILE,
        )
    )
    spy.chmod(0o755)
    return spy


def spy_log(log: Path) -> list[dict[str, str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]
