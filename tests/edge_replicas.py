"""Several ``edge serve`` replicas on one PostgreSQL registry and one Mender server (issue 25, "Many instances").

Each replica is a real ``edge serve`` behind a real nginx of its own: ``edge
nginx --accept`` takes one service address, so one nginx cannot spread the
auth requests over two services. Devices reach the replicas as a Mender client
with two servers in mender.conf (``Servers``) does: each attempt sends the auth
request to each server in turn until one answers 200 (``TryAuthenticate`` in
mender-auth; tests/edge_fleet.py, ClientRetry), and a failed attempt waits out
the client's backoff before the next.

Each replica reaches the stand-in Mender server by a name of its own
(``127.0.0.1`` or ``localhost``): the stand-in records every call with its
``Host``, which says which replica made it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from imageprov.pki.ca import Issued
from imageprov.pki.registry import Registry, Status
from tests.conftest import imageprov_pki
from tests.edge_fleet import NO_ANSWER, ClientRetry, SimDevice
from tests.edge_support import AUTH_PATH, PASSWORD, USER, FleetCA, edge_service, free_port, key_pem, nginx, pem
from tests.edge_support import signed_request as make_request
from tests.pg import Db, Postgres
from tests.standin_mender import StandinMender

NEXT_DEPLOYMENT = "/api/devices/v1/deployments/device/deployments/next?device_type=test&artifact_name=release-1"
DEVICES = "/api/management/v2/devauth/devices"
# The names each replica reaches the Mender server by, in order: replica A, replica B.
UPSTREAM_HOSTS = ("127.0.0.1", "localhost")


# -- the stand-in, with a log of who called what ------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    host: str  # host:port as the caller named the server: which replica
    status: int
    at: float  # time.monotonic() when answered


class RecordingStandin(StandinMender):
    """The stand-in Mender server, recording every call it answered (``answered``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls_log: list[Call] = []
        # Seconds the management API takes to answer a device read (GET .../devices/{id}): a slow Mender server.
        self.device_read_delay = 0.0

    @web.middleware
    async def _check_spec(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await super()._check_spec(request, handler)
        if request.method == "GET" and request.path.startswith(DEVICES + "/") and self.device_read_delay:
            await asyncio.sleep(self.device_read_delay)  # read now, answered late
        with self.lock:
            self.calls_log.append(Call(request.method, request.path, request.host, response.status, time.monotonic()))
        return response

    def answered(self, method: str | None = None, path: str | None = None, host: str | None = None) -> list[Call]:
        with self.lock:
            return [
                c
                for c in self.calls_log
                if (method is None or c.method == method)
                and (path is None or c.path.startswith(path))
                and (host is None or c.host.startswith(host + ":"))
            ]


@contextmanager
def recording_standin() -> Iterator[RecordingStandin]:
    """Like edge_support.running_standin: the test fails if any request or answer deviated from the spec."""
    server = RecordingStandin()
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.deviations == [], "\n".join(server.deviations[:20])


def upstream_of(standin_url: str, index: int) -> str:
    """The stand-in's URL as replica ``index`` names it."""
    port = standin_url.rsplit(":", 1)[1]
    return f"http://{UPSTREAM_HOSTS[index]}:{port}"


# -- the shared PKI and registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeFiles:
    ca: FleetCA
    pki: Path  # ca-cert.pem and imageprov.toml naming the PostgreSQL registry; no CA key
    server: Path  # nginx's server certificate (localhost)
    password: Path  # the Mender service user's
    db: Db

    @property
    def server_ca(self) -> Path:
        return self.pki / "ca-cert.pem"

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        return self.db.rows(self.pki, sql)


def shared_pki(directory: Path, postgres: Postgres) -> EdgeFiles:
    """A fleet CA (its key stays here) and a PKI directory whose registry is a new PostgreSQL database."""
    ca = FleetCA()
    pki, server = ca.write_edge(directory)
    db = Db.make("postgresql", postgres)
    db.configure(pki)
    with Registry(pki, create=True):
        pass
    password = directory / "password"
    password.write_text(PASSWORD)
    return EdgeFiles(ca, pki, server, password, db)


def register(files: EdgeFiles, devices: Sequence[Any]) -> None:
    """Record each device's certificate as delivered, as a line station leaves it."""
    with Registry(files.pki) as registry:
        for device in devices:
            registry.record(Issued(device.cert, device.key), status=Status.ACTIVE)


# -- the replicas ---------------------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    url: str  # its nginx, as devices reach it
    service: dict[str, Any]  # edge_support.edge_service's: url, log, proc, port
    upstream: str  # the Mender server as this replica names it

    @property
    def host(self) -> str:
        return self.upstream.removeprefix("http://").rsplit(":", 1)[0]

    def freeze(self) -> None:
        """SIGSTOP its edge serve: what nginx passes it from now on waits, unanswered, in its socket."""
        os.kill(self.service["proc"].pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL its edge serve (its nginx stays, answering 502 for what it cannot pass on)."""
        os.kill(self.service["proc"].pid, signal.SIGKILL)

    def metric(self, name: str) -> float:
        """A counter's value (summed over labels) from this replica's /metrics, read from edge serve directly."""
        with urllib.request.urlopen(self.service["url"] + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and (line[len(name)] in " {")
        )


@contextmanager
def replicas(
    tmp_path: Path, files: EdgeFiles, standin_url: str, *serve: str, count: int = 2
) -> Iterator[list[Replica]]:
    """``count`` edge serve processes on the same registry and Mender server, each behind its own nginx."""
    with ExitStack() as stack:
        started = []
        for index in range(count):
            upstream = upstream_of(standin_url, index)
            service = stack.enter_context(
                edge_service(tmp_path, "--pki", files.pki, "--upstream", upstream, "--username", USER,
                             "--password-file", files.password, *serve)
            )  # fmt: skip
            port = free_port()
            conf = imageprov_pki("edge", "nginx", "--pki", files.pki, "--server-cert", files.server,
                                 "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
                                 "--accept", service["url"]).stdout  # fmt: skip
            stack.enter_context(nginx(tmp_path, conf, port))
            started.append(
                Replica("AB"[index] if count <= 2 else str(index), f"https://localhost:{port}", service, upstream)
            )
        yield started


# -- one device, by hand ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Board:
    """A device certificate and key of the fleet CA's, and the TLS client a board would have."""

    name: str
    cert: Any
    key: Any
    context: ssl.SSLContext

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:x}"

    def auth(self, replica: Replica, identity: dict[str, Any]) -> tuple[int, bytes]:
        """An auth request for ``identity`` through the replica's nginx; (status, body): the body is the token."""
        signed = make_request(self.key, identity)
        return _request(self.context, replica.url + AUTH_PATH, signed.body, signed.headers)

    def poll(self, replica: Replica, token: bytes) -> int:
        """deployments/next with the token, through nginx's route check: 204 (nothing to install) or a refusal."""
        return _request(
            self.context, replica.url + NEXT_DEPLOYMENT, None, {"Authorization": f"Bearer {token.decode()}"}
        )[0]


def make_board(files: EdgeFiles, directory: Path, name: str) -> Board:
    cert, key = files.ca.issue(name)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_text(pem(cert))
    key_path.write_bytes(key_pem(key))
    context = ssl.create_default_context(cafile=str(files.server_ca))
    context.load_cert_chain(cert_path, key_path)
    return Board(name, cert, key, context)


def _request(context: ssl.SSLContext, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def once(device: SimDevice, replica: Replica) -> int:
    """A simulated device's own signed auth request, once, through the replica's nginx; the status."""
    headers = {"Content-Type": "application/json", "X-MEN-Signature": device.signature}
    return _request(device.context, replica.url + AUTH_PATH, device.body, headers)[0]


# -- a fleet that knows both replicas -------------------------------------------------------------------------


@dataclass(frozen=True)
class Try:
    """One auth request of an attempt, to one server."""

    attempt: int
    server: str  # the replica's name
    status: int  # NO_ANSWER when none came
    started: float
    ended: float


@dataclass
class Tracked:
    device: SimDevice
    servers: list[Replica]  # in the order its mender.conf lists them
    tries: list[Try] = field(default_factory=list)
    started: float | None = None  # its first attempt
    accepted_by: str | None = None
    waiting_on: str | None = None  # the replica its request is at now, unanswered
    waiting_since: float = 0.0  # when that request was sent


@dataclass
class Spread:
    """A fleet switched on across the replicas, and what each device went through."""

    devices: list[Tracked]
    started: float = 0.0
    # Devices from this index on are switched on only once release() is called (None: all on the schedule).
    held_from: int | None = None
    _released: asyncio.Event | None = None

    def release(self) -> None:
        """Let the held devices switch on, ``rate`` a second from now."""
        assert self._released is not None, "release() is for what runs beside the fleet"
        self._released.set()

    def accepted_by(self, name: str, before: float | None = None) -> list[Tracked]:
        return [d for d in self.devices if d.accepted_by == name and (before is None or d.tries[-1].ended < before)]

    def waiting_on(self, name: str, *, sent_after: float = 0.0) -> list[Tracked]:
        """Devices whose request is at replica ``name``, unanswered, sent after ``sent_after``."""
        return [d for d in self.devices if d.waiting_on == name and d.waiting_since > sent_after]

    def attempts(self, device: Tracked) -> int:
        return len({t.attempt for t in device.tries})


async def _switch_on(session: aiohttp.ClientSession, tracked: Tracked, retry: ClientRetry) -> None:
    device = tracked.device
    headers = {"Content-Type": "application/json", "X-MEN-Signature": device.signature}
    timeout = aiohttp.ClientTimeout(total=retry.timeout)
    jitter = random.Random(device.name)
    waits = retry.waits()
    tracked.started = time.monotonic()
    for attempt in range(len(waits) + 1):
        if attempt:
            await asyncio.sleep(waits[attempt - 1] * jitter.uniform(1 - retry.jitter, 1 + retry.jitter))
        for replica in tracked.servers:  # each configured server once, until one answers 200
            started = time.monotonic()
            token = b""
            tracked.waiting_on, tracked.waiting_since = replica.name, started
            try:
                async with session.post(
                    replica.url + AUTH_PATH, data=device.body, headers=headers, ssl=device.context, timeout=timeout
                ) as answer:
                    token = await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError):
                status = NO_ANSWER
            tracked.waiting_on = None
            tracked.tries.append(Try(attempt, replica.name, status, started, time.monotonic()))
            if status == 200:
                tracked.accepted_by = replica.name
                device.token = token.decode()
                return


def switch_on_across(
    tracked: list[Tracked],
    retry: ClientRetry,
    *,
    rate: float,
    deadline: float,
    meanwhile: Callable[[Spread], Coroutine[Any, Any, None]] | None = None,
    held_from: int | None = None,
) -> Spread:
    """Switch the devices on, ``rate`` a second, each trying its servers in turn on the client's schedule;
    ``meanwhile`` runs beside them (it may kill a replica). With ``held_from``, the devices from that index on
    wait for ``meanwhile`` to call ``spread.release()``, then come at ``rate`` from then: what happens after an
    event does not depend on how fast a loaded machine got to it. A device still trying at ``deadline`` is
    stopped where it is (not accepted); ``meanwhile`` must be done by then."""
    spread = Spread(tracked, held_from=held_from)

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)  # each board its own connections
        spread._released = asyncio.Event()
        async with aiohttp.ClientSession(connector=connector) as session:
            spread.started = time.monotonic()

            async def one(index: int, device: Tracked) -> None:
                start, slot = spread.started, index
                if held_from is not None and index >= held_from:
                    assert spread._released is not None
                    await spread._released.wait()
                    start, slot = time.monotonic(), index - held_from
                await asyncio.sleep(max(0.0, start + slot / rate - time.monotonic()))
                await _switch_on(session, device, retry)

            tasks = [asyncio.create_task(one(i, d)) for i, d in enumerate(tracked)]
            side: list[asyncio.Task[None]] = [asyncio.create_task(meanwhile(spread))] if meanwhile else []
            done, pending = await asyncio.wait([*tasks, *side], timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()  # a failure of meanwhile's (or of the harness) fails the test
            assert not set(side) & pending, "what ran beside the fleet did not finish before the deadline"

    asyncio.run(run())
    return spread


# -- the Mender server's view, through its management API (a stand-in in a process of its own) ----------------


def mender_devices(standin_url: str) -> list[dict[str, Any]]:
    """Every device the Mender server holds, with its auth sets, as an operator's API call lists them."""
    login = urllib.request.Request(
        standin_url + "/api/management/v1/useradm/auth/login",
        headers={"Authorization": "Basic " + _basic(USER, PASSWORD)},
        method="POST",
    )
    with urllib.request.urlopen(login, timeout=30) as answer:
        token = answer.read().decode()
    found: list[dict[str, Any]] = []
    page = 1
    while True:
        listing = urllib.request.Request(
            f"{standin_url}{DEVICES}?page={page}&per_page=500", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(listing, timeout=30) as answer:
            batch = json.loads(answer.read())
        found += batch
        if len(batch) < 500:
            return found
        page += 1


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()
