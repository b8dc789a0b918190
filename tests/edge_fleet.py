"""Many simulated devices switching on at once through nginx and the service: for the load test and
scripts/bench_edge.py.

Each device has its own key and certificate (made here with cryptography, as
stamping would, without the images), its own TLS client context, and signs
its auth request as the Mender client does. A device that gets 503 waits for
Retry-After and tries again, as the client does.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.edge_support import AUTH_PATH, FleetCA, key_pem, pem, signed_request

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SimDevice:
    name: str
    identity: dict[str, str]
    context: ssl.SSLContext
    body: bytes
    signature: str
    pubkey: str
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def make_fleet(ca: FleetCA, count: int, directory: Path, server_ca: Path, prefix: str = "sim") -> list[SimDevice]:
    """``count`` devices with keys, certificates and signed auth requests, ready to switch on.

    Devices of one ``prefix`` share identities (and would be one device to Mender): give each fleet its own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    devices = []
    for number in range(count):
        name = f"{prefix}-{number:05d}"
        cert, key = ca.issue(name)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_text(pem(cert))
        key_path.write_bytes(key_pem(key))
        context = ssl.create_default_context(cafile=str(server_ca))
        context.load_cert_chain(cert_path, key_path)
        identity = {"mac": f"02:00:{number >> 24 & 255:02x}:{number >> 16 & 255:02x}:{number >> 8 & 255:02x}:"
                           f"{number & 255:02x}", "serial": name}  # fmt: skip
        request = signed_request(key, identity)
        pubkey = json.loads(request.body)["pubkey"]
        devices.append(SimDevice(name, identity, context, request.body, request.signature, pubkey))
    return devices


@dataclass
class Wave:
    """One switch-on of a fleet: how long until every device was answered, and each request's outcome."""

    seconds: float
    statuses_seen: list[int]
    latencies: list[float]

    def percentile(self, share: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(share * len(values)))] if values else 0.0

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for status in self.statuses_seen:
            counts[status] = counts.get(status, 0) + 1
        return counts


async def _switch_on(session: aiohttp.ClientSession, url: str, device: SimDevice, attempts: int) -> None:
    headers = {"Content-Type": "application/json", "X-MEN-Signature": device.signature}
    for _ in range(attempts):
        started = time.monotonic()
        try:
            async with session.post(url + AUTH_PATH, data=device.body, headers=headers, ssl=device.context) as answer:
                await answer.read()
                status, retry_after = answer.status, answer.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError):
            status, retry_after = 0, "1"
        device.latencies.append(time.monotonic() - started)
        device.statuses.append(status)
        if status not in (0, 503):
            return
        await asyncio.sleep(float(retry_after or 1))


async def _wave(devices: list[SimDevice], url: str, attempts: int, rate: float | None) -> float:
    for device in devices:
        device.statuses, device.latencies = [], []
    # Each device its own connection, as separate boards would have.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.monotonic()

        async def one(index: int, device: SimDevice) -> None:
            if rate is not None:
                await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            await _switch_on(session, url, device, attempts)

        await asyncio.gather(*(one(i, d) for i, d in enumerate(devices)))
        return time.monotonic() - started


def switch_on(devices: list[SimDevice], url: str, *, attempts: int = 1, rate: float | None = None) -> Wave:
    """Every device sends its auth request at once (or ``rate`` a second); returns how long until all were
    answered, and each request's status and latency."""
    seconds = asyncio.run(_wave(devices, url, attempts, rate))
    return Wave(seconds, [s for d in devices for s in d.statuses], [t for d in devices for t in d.latencies])


@contextmanager
def standin_process(faults: float = 0.0, fault_delay: float = 3.0) -> Iterator[dict[str, Any]]:
    """The stand-in Mender server in a process of its own (its work off this process's GIL).

    Yields a dict with its ``url``; after the block, ``summary`` holds its calls, devices and deviations.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.standin_mender", "--faults", str(faults), "--fault-delay", str(fault_delay)],
        cwd=REPO, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    state: dict[str, Any] = {"url": proc.stdout.readline().strip(), "pid": proc.pid}
    if not state["url"].startswith("http://"):
        proc.kill()
        raise AssertionError("the stand-in Mender server did not start")
    try:
        yield state
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        state["summary"] = json.loads(out.strip().splitlines()[-1])
