"""A network namespace for a device that reaches the edge and nothing else."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import need
from tests.edge_support import wait_for


@contextmanager
def device_namespace() -> Iterator[tuple[int, str]]:
    """A network namespace (``unshare -n``) whose only way out is a veth to this one: a process in it, and the
    address of this side of the veth (where the edge listens). Its own loopback is not this one's: the stand-in
    storage and Mender, on this side's 127.0.0.1, are out of its reach."""
    need("unshare", "nsenter", "ip")
    if os.geteuid() != 0:
        pytest.skip("a network namespace with a veth needs root")
    suffix = secrets.token_hex(3)
    outside, inside = f"iah{suffix}", f"iad{suffix}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "infinity"])
    try:

        def ip(*args: str, netns: bool = False) -> None:
            prefix = ["nsenter", "-t", str(holder.pid), "-n"] if netns else []
            subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

        wait_for(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
                 "the namespace")  # fmt: skip
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", str(holder.pid))
        ip("addr", "add", f"{subnet}.1/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("link", "set", "lo", "up", netns=True)
        ip("addr", "add", f"{subnet}.2/30", "dev", inside, netns=True)
        ip("link", "set", inside, "up", netns=True)
        yield holder.pid, f"{subnet}.1"
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
