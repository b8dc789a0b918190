"""A TPM 2.0 for tests: swtpm, behind tpm2-abrmd (the resource manager a device has as /dev/tpmrm0).

swtpm alone keeps every object and session a process loaded until someone
flushes them, and holds three: the tpm2-pkcs11 module opens a few per process,
so the third process to use the token fails. tpm2-abrmd flushes what each
client leaves, as the kernel's resource manager does on a device; it runs on
a private D-Bus session bus, so tests in parallel have a TPM each.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, need
from tests.edge_support import wait_for

# Debian's paths (libtpm2-pkcs11-1, libengine-pkcs11-openssl).
TPM2_PKCS11 = Path("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
PKCS11_ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
TOOLS = ("swtpm", "tpm2-abrmd", "dbus-daemon", "tpm2_getcap", "pkcs11-tool", "certtool", "curl", "openssl")


@dataclass(frozen=True)
class Tpm:
    """What a program needs in its environment to use the TPM, through the resource manager."""

    env: dict[str, str]


def _need_modules() -> None:
    missing = [str(path) for path in (TPM2_PKCS11, PKCS11_ENGINE) if not path.exists()]
    if missing:
        message = f"missing: {', '.join(missing)} (scripts/setup --test installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def running_tpm(directory: Path) -> Iterator[Tpm]:
    need(*TOOLS)
    _need_modules()
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "state"
    state.mkdir(exist_ok=True)
    with ExitStack() as stack:

        def started(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
            proc: subprocess.Popen[bytes] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
            stack.callback(_stop, proc)
            return proc

        # Unix sockets, not TCP ports: nothing to collide with another test's (a port and port + 1 free a moment
        # ago are not free for sure).
        socket = directory / "tpm.sock"
        swtpm = started(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--flags",
                         "not-need-init,startup-clear", "--server", f"type=unixio,path={socket}",
                         "--ctrl", f"type=unixio,path={socket}.ctrl", "--log", f"file={directory / 'swtpm.log'}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        raw = f"swtpm:path={socket}"
        # A socket in the filesystem, not an abstract one: those belong to a network namespace, and the device's
        # programs may run in another (tests/netns.py).
        bus = started(["dbus-daemon", "--session", "--nofork", "--print-address=1",
                       f"--address=unix:path={directory / 'bus'}"], stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL)  # fmt: skip
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        assert address, "dbus-daemon printed no address"
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": address}
        wait_for(lambda: _alive(swtpm, directory / "swtpm.log") and _answers(raw, env), "swtpm to answer")
        with open(directory / "abrmd.log", "wb") as log:
            started(["tpm2-abrmd", "--allow-root", "--session", f"--tcti={raw}"],
                    env=env, stdout=log, stderr=log)  # fmt: skip
        tcti = "tabrmd:bus_type=session"
        wait_for(lambda: _answers(tcti, env), "tpm2-abrmd to answer")
        yield Tpm({"DBUS_SESSION_BUS_ADDRESS": address, "TPM2TOOLS_TCTI": tcti, "TPM2_PKCS11_TCTI": tcti,
                   "PKCS11_MODULE_PATH": str(TPM2_PKCS11), "TPM2_PKCS11_LOG_LEVEL": "0"})  # fmt: skip


def _answers(tcti: str, env: dict[str, str]) -> bool:
    probe = subprocess.run(["tpm2_getcap", "-T", tcti, "properties-fixed"], env=env, capture_output=True, check=False)
    return probe.returncode == 0


def _alive(proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"swtpm exited {proc.returncode}: {log.read_text() if log.exists() else ''}")
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
