"""Many simulated devices switching on at once through nginx and the service: for the load test and
scripts/bench_edge.py.

Each device has its own key and certificate (made here with cryptography, as
stamping would, without the images), its own TLS client context, and signs
its auth request as the Mender client does. Given a ``ClientRetry``, a device
whose request fails retries on the Mender client's schedule (scaled down in
time); without one it makes one attempt, which is what the benchmark measures.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec

from tests.edge_support import AUTH_PATH, FleetCA, key_pem, pem, sign, signed_request

REPO = Path(__file__).resolve().parent.parent
# No answer at all (a connection refused, reset or timed out): what a device records instead of a status.
NO_ANSWER = 0


@dataclass(frozen=True)
class ClientRetry:
    """When a Mender client tries to authorize again after a failed attempt; seconds, as the client has them.

    What the client does (mendersoftware/mender at dc6ff6e, 5.x, the C++ client):

    - mender-auth sends the auth request once to each configured server; a
      connection error or any answer but 200 (401, 400, 500, others alike)
      moves on to the next server, and when none is left the token request
      fails (``TryAuthenticate`` in src/mender-auth/api/auth/auth.cpp). It does
      not retry by itself; the update daemon waits at most a minute for a token
      (``auth_timeout``, src/api/auth.hpp).
    - The daemon's poll that needed the token fails, and it waits out
      ``http::ExponentialBackoff`` before polling (and authorizing) again
      (``HandlePollingError``, src/mender-update/daemon/states.cpp):
      ``NextInterval`` (src/common/http/http.cpp) gives one minute three
      times, then doubles it every three tries, capped at
      RetryPollIntervalSeconds (300 s by default, src/client_shared/config_parser.hpp);
      after three tries at the cap it returns MaxRetryError and the client
      falls back to its regular poll (UpdatePollIntervalSeconds, 30 min).
      That is 12 retries over 36 minutes. A Retry-After is honoured only on a
      429, so the edge's 503 + Retry-After is backed off like any failure.
    - The 3.x Go client had the same schedule in ``GetExponentialBackoffTime``
      (client/client.go).

    The client adds no jitter: a real fleet spreads because its boards boot and
    poll at independent times. A test switches every device on in the same
    instant, so each wait is stretched or shortened by up to ``jitter`` of
    itself, at random per device, instead of every failure retrying in one burst.
    """

    smallest: float = 60.0  # ExponentialBackoff's smallest interval
    cap: float = 300.0  # RetryPollIntervalSeconds
    per_interval: int = 3  # tries at each interval before it doubles
    timeout: float = 60.0  # one attempt: the daemon's wait for a token
    jitter: float = 0.25

    def scaled(self, factor: float) -> ClientRetry:
        """The same schedule with every wait multiplied by ``factor`` (the attempt's timeout is the server's
        work, and is not scaled)."""
        return replace(self, smallest=self.smallest * factor, cap=self.cap * factor)

    def waits(self) -> list[float]:
        """The wait before each retry, until the client stops backing off (12 of them with the defaults)."""
        # A cap below the smallest interval makes it a fixed interval (HandlePollingError).
        interval, waits = min(self.smallest, self.cap), []
        while True:
            waits += [interval] * self.per_interval
            if interval >= self.cap:
                return waits
            interval = min(interval * 2, self.cap)

    @property
    def attempts(self) -> int:
        """The most attempts a device makes: the first and every retry."""
        return len(self.waits()) + 1


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
    settled: float | None = None  # from its first attempt to its 200, backoff included
    token: str = ""  # the JWT its last accepted auth request brought
    cert: Any = None
    key: Any = None


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
        devices.append(SimDevice(name, identity, context, request.body, request.signature, pubkey, cert=cert, key=key))
    return devices


def forge_signatures(devices: list[SimDevice]) -> None:
    """Sign each device's auth request with a key of nobody's: certificate and request still name the
    device's own key, so only the signature is wrong."""
    for device in devices:
        device.signature = sign(ec.generate_private_key(ec.SECP256R1()), device.body)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


@dataclass
class Wave:
    """One switch-on of a fleet: how long until every device was done, and each attempt's outcome."""

    seconds: float
    attempts: dict[str, list[int]]  # by device name: the status of each attempt (NO_ANSWER: none)
    latencies: dict[str, list[float]]  # by device name: each attempt's
    settled: dict[str, float]  # by name, of each accepted device: from its first attempt to its 200

    def of(self, names: set[str]) -> Wave:
        """The same wave, for these devices only."""
        return Wave(
            self.seconds,
            {n: s for n, s in self.attempts.items() if n in names},
            {n: t for n, t in self.latencies.items() if n in names},
            {n: t for n, t in self.settled.items() if n in names},
        )

    def percentile(self, share: float) -> float:
        """Of the attempts' latencies."""
        return _percentile([t for times in self.latencies.values() for t in times], share)

    def statuses(self) -> dict[int, int]:
        """How many attempts ended with each status."""
        return dict(Counter(status for statuses in self.attempts.values() for status in statuses))

    def finals(self) -> dict[int, int]:
        """How many devices ended with each status."""
        return dict(Counter(s[-1] if s else NO_ANSWER for s in self.attempts.values()))

    def retries(self) -> int:
        return sum(max(0, len(s) - 1) for s in self.attempts.values())

    def figures(self, label: str) -> str:
        """One line for a human: latency, time to be accepted, attempts and retries, statuses."""
        per_device = dict(sorted(Counter(len(s) for s in self.attempts.values()).items()))
        settled = list(self.settled.values())
        request = f"p50 {self.percentile(0.5) * 1000:.0f} ms, p99 {self.percentile(0.99) * 1000:.0f} ms"
        accepted = f"{len(settled)} accepted"
        if settled:
            accepted += f" after p50 {_percentile(settled, 0.5):.2f} s, p99 {_percentile(settled, 0.99):.2f} s"
        return (
            f"{label}: {len(self.attempts)} devices; a request {request}; {accepted};"
            f" devices by attempts made {per_device}, {self.retries()} retries;"
            f" statuses {dict(sorted(self.statuses().items()))}"
        )


async def _switch_on(session: aiohttp.ClientSession, url: str, device: SimDevice, retry: ClientRetry | None) -> None:
    headers = {"Content-Type": "application/json", "X-MEN-Signature": device.signature}
    waits = retry.waits() if retry is not None else []
    timeout = aiohttp.ClientTimeout(total=retry.timeout if retry is not None else 60)
    jitter = random.Random(device.name)  # the same spread on every run
    first = time.monotonic()
    for attempt in range(len(waits) + 1):
        if attempt:
            assert retry is not None
            # The modelled backoff: the one wait here that is not a poll.
            await asyncio.sleep(waits[attempt - 1] * jitter.uniform(1 - retry.jitter, 1 + retry.jitter))
        started = time.monotonic()
        token = b""
        try:
            async with session.post(
                url + AUTH_PATH, data=device.body, headers=headers, ssl=device.context, timeout=timeout
            ) as answer:
                token = await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = NO_ANSWER
        device.latencies.append(time.monotonic() - started)
        device.statuses.append(status)
        if status == 200:
            device.settled = time.monotonic() - first
            device.token = token.decode()
            return


# What a Mender client asks most once accepted: through nginx's auth_request to the service, then upstream.
NEXT_DEPLOYMENT = "/api/devices/v1/deployments/device/deployments/next?device_type=bench&artifact_name=release-1"


async def _poll(session: aiohttp.ClientSession, url: str, device: SimDevice, retry: ClientRetry | None) -> None:
    """One deployments/next poll with the device's token (``switch_on`` first): 204, nothing to install."""
    started = time.monotonic()
    try:
        async with session.get(
            url + NEXT_DEPLOYMENT, headers={"Authorization": f"Bearer {device.token}"}, ssl=device.context
        ) as answer:
            await answer.read()
            status = answer.status
    except (aiohttp.ClientError, TimeoutError):
        status = NO_ANSWER
    device.latencies.append(time.monotonic() - started)
    device.statuses.append(status)
    if status == 204:
        device.settled = time.monotonic() - started


Action = Callable[[aiohttp.ClientSession, str, SimDevice, ClientRetry | None], Awaitable[None]]


async def _wave(
    devices: list[SimDevice],
    url: str,
    retry: ClientRetry | None,
    rate: float | None,
    deadline: float | None,
    action: Action = _switch_on,
) -> float:
    for device in devices:
        device.statuses, device.latencies, device.settled = [], [], None
    # Each device its own connection, as separate boards would have.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()

        async def one(index: int, device: SimDevice) -> None:
            if rate is not None:
                await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            await action(session, url, device, retry)

        tasks = [asyncio.create_task(one(i, d)) for i, d in enumerate(devices)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        # A device still trying at the deadline is left as it is: not accepted.
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        return time.monotonic() - started


def switch_on(
    devices: list[SimDevice],
    url: str,
    *,
    retry: ClientRetry | None = None,
    rate: float | None = None,
    deadline: float | None = None,
) -> Wave:
    """Every device sends its auth request at once (or ``rate`` a second), and with ``retry`` tries again on
    that schedule until it gets a 200; returns how long until all were done, and every attempt's outcome.
    A device not done within ``deadline`` seconds is stopped where it is."""
    return _outcome(devices, asyncio.run(_wave(devices, url, retry, rate, deadline)))


def poll(devices: list[SimDevice], url: str, *, rate: float | None = None) -> Wave:
    """Every accepted device polls for a deployment once (at once, or ``rate`` a second), as it does all day."""
    return _outcome(devices, asyncio.run(_wave(devices, url, None, rate, None, _poll)))


def _outcome(devices: list[SimDevice], seconds: float) -> Wave:
    return Wave(
        seconds,
        {d.name: list(d.statuses) for d in devices},
        {d.name: list(d.latencies) for d in devices},
        {d.name: d.settled for d in devices if d.settled is not None},
    )


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
