"""Devices per second through the accepting edge: real nginx (real TLS), ``imageprov edge serve`` and the
stand-in Mender server on loopback.

A fleet of N devices (each its own key, certificate, TLS context and signed
auth request) switches on at once; then the same fleet again. That gives
devices/s accepted the first time (TLS, every check, preauthorization, the
forwarded request) and the second time (cached: no preauthorization). Latency
is measured on a second fleet arriving at the goal rates (a fleet all at once
queues by construction), as p50/p99. Goals: >= 200 new/s, >= 500 cached/s,
p99 < 1 s. It also prints the CPU each part spent per device, which says what
the edge alone would reach on idle cores when other work shares the machine.

As deployed by default: a PKI registry holding every device's certificate as
delivered, the identity pinned there (``--identity pin``), and the route check
that cuts revoked devices off (nginx ``auth_request``) on the deployment polls
every accepted device then makes, once with the service's recheck window
(``--recheck``, 2 s) and once asking the registry on every poll (0), beside
nginx alone with no route check at all: what the cut-off costs.

With ``--crl-churn`` the edge also reads a CRL of ``--crl-size`` entries
(100,000; none of them a device here), and the latency of the cached auth
requests and the polls is measured again, ``--churn-rounds`` times each way,
in turn (so that other work on the machine weighs on both alike): with that CRL
left alone, and with a newer one (the same serials, the next CRL number)
written beside it and renamed over it every ``--churn-interval`` seconds, as
``imageprov crl --out`` publishes one. Every request the edge answers while it
rereads the CRL shows in the second; the ratio of the p99s is what reloading
costs the devices.

With ``--instances 1,2`` (issue 25, "Many instances") it measures instead
devices/s accepted with one ``edge serve`` and with two sharing one
PostgreSQL registry (a real server, started unprivileged in a temporary
directory: tests/pg.py), side by side, and prints the ratio (2 instances / 1
instance). Each instance is behind an nginx of its own, and the fleet is split
between them (every other device to each), as tests/edge_replicas.py runs
replicas and as a fleet whose mender.conf lists both servers, half of them in
each order, would arrive: ``edge nginx --accept`` takes one service address,
so one nginx cannot spread the auth requests over two services. One instance
runs on the same PostgreSQL registry, so the instance count is the only
difference. The same devices (``--devices``, 1000 by default) switch on all at
once: new, then again (cached: each instance remembers the devices it
accepted), and with two instances once more through the other instance
(crossed: a device coming back through the server it did not use, as after a
failover; that instance's cache does not know it). Every configuration starts
afresh (a new database, a new stand-in Mender, new processes), so the fleet is
new to each, ``--rounds`` times (2 by default, the order reversed every other
round so that drift weighs on both alike). It checks that the answers are the
same: every device accepted at its one attempt, each once in Mender with its
own key, one pin per device in the registry naming the Mender device that holds
it. It prints the CPU each part spent per device: on a machine of few cores
the parts (the simulated devices included) share the cores already, and a
second instance can add little there beyond lifting the bound of one edge
serve, one Python process on one core at most; what it must show is that two
give the same answers and lose no throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from imageprov.pki.ca import CertificateAuthority, Issued  # noqa: E402
from imageprov.pki.registry import Reason, Record, Registry, Status  # noqa: E402
from imageprov.pki.revocation import build_crl, crl_bytes  # noqa: E402
from tests.conftest import imageprov_pki  # noqa: E402
from tests.edge_fleet import ClientRetry, SimDevice, Wave, make_fleet, poll, standin_process, switch_on  # noqa: E402
from tests.edge_replicas import (  # noqa: E402
    EdgeFiles,
    Tracked,
    mender_devices,
    register,
    replicas,
    shared_pki,
    switch_on_across,
)
from tests.edge_support import PASSWORD, USER, FleetCA, decisions, edge_service, free_port, nginx  # noqa: E402
from tests.pg import Db, Postgres, running_postgres  # noqa: E402


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children (nginx's workers), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _cpus(pids: dict[str, list[int]]) -> dict[str, float]:
    found = {name: sum(_cpu(pid) for pid in of) for name, of in pids.items()}
    found["devices"] = time.process_time()
    return found


def _register(pki: Path, fleets: list[list[SimDevice]]) -> None:
    """The PKI's registry, every device's certificate in it as delivered (what a line station leaves)."""
    with Registry(pki, create=True) as registry:
        for device in (d for fleet in fleets for d in fleet):
            registry.record(Issued(device.cert, device.key), status=Status.ACTIVE)


def _revoked(size: int) -> list[Record]:
    """``size`` revoked certificates as the registry lists them, none a device's here."""
    rng = random.Random(24)
    when = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    return [
        Record(serial=f"{rng.getrandbits(159) | 1:x}", device_id=f"gone-{n}", kind="device", fingerprint="",
               public_key="", not_before="", not_after="", issued_at="", status=Status.REVOKED, revoked_at=when,
               reason=Reason.KEY_COMPROMISE if n % 10 == 0 else None, delivered_to=None, delivered_at=None, owner=None)
        for n in range(size)
    ]  # fmt: skip


def _crl(ca: FleetCA, revoked: list[Record], number: int) -> bytes:
    """The CRL ``imageprov crl`` would write, in PEM."""
    return crl_bytes(build_crl(CertificateAuthority(ca.cert, ca.key), revoked, number=number))


@contextmanager
def _churn(live: Path, crl: bytes | None, interval: float) -> Iterator[list[float]]:
    """In a thread, publish ``crl`` over ``live`` every ``interval`` seconds, written whole to a file beside it
    and renamed over it (the edge sees the old file or the new one, never part of one); yields when each was.

    The same CRL every time: each is a new file to the edge, read, verified and swapped in all the same."""
    stop, published = threading.Event(), []

    def publish() -> None:
        while crl is not None and not stop.wait(interval):
            new = live.with_name(live.name + ".new")
            new.write_bytes(crl)
            os.replace(new, live)
            published.append(time.monotonic())

    thread = threading.Thread(target=publish, name="crl-churn", daemon=True)
    thread.start()
    try:
        yield published
    finally:
        stop.set()
        thread.join()


def _wait_idle(pid: int, what: str, limit: float = 300.0) -> float:
    """Wait until ``pid`` (and its children) use under a tenth of a core over half a second; how long it took."""
    started = time.monotonic()
    before = _cpu(pid)
    while time.monotonic() - started < limit:
        time.sleep(0.5)
        after = _cpu(pid)
        if after - before < 0.05:
            return time.monotonic() - started
        before = after
    sys.exit(f"bench edge: {what} still busy after {limit:.0f} s")


def _percentile(waves: list[Wave], share: float) -> float:
    """Of the latencies of every attempt in ``waves``."""
    ordered = sorted(t for wave in waves for times in wave.latencies.values() for t in times)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _line(name: str, throughput: float, paced: Wave, rate: float, goal: float) -> str:
    p50, p99 = paced.percentile(0.50), paced.percentile(0.99)
    verdict = "ok" if throughput >= goal and p99 < 1.0 else "BELOW GOAL"
    return (f"{name:>7}: all at once {throughput:6.1f} devices/s; arriving at {rate:.0f}/s: p50 {p50 * 1000:4.0f} ms,"
            f" p99 {p99 * 1000:5.0f} ms  (goal >= {goal:.0f}/s, p99 < 1000 ms: {verdict})")  # fmt: skip


# -- --instances: one edge serve against two on one PostgreSQL registry --------------------------------------

# Each device one auth request and no retry, as switch_on without a ClientRetry: no interval is ever reached.
ONE_ATTEMPT = ClientRetry(per_interval=0)
# The waves, in order: "crossed" with two instances only.
WAVES = ("new", "cached", "crossed")
WAVE_NOTES = {"new": "preauthorized", "cached": "by the instance's cache", "crossed": "through the other instance"}
SWITCH_ON_DEADLINE = 600.0
# A ratio of throughputs (2 instances / 1) below this is called a loss (a run on a shared machine is noisy).
KEPT = 0.85


@dataclasses.dataclass
class _Run:
    """One configuration (1 or 2 instances) measured once, in an environment of its own."""

    seconds: dict[str, float]  # by wave: from the first request to the last answer
    cpu: dict[str, dict[str, float]]  # by wave and part: CPU seconds
    accepted_by: dict[str, Counter[str]]  # by wave: devices accepted by each instance
    preauthorized: dict[str, Counter[bool]]  # by wave: the instances' decision lines, preauthorized or not
    mender: dict[str, tuple[str, int, bool]]  # by device: its status in Mender, its auth sets, its own key
    calls: dict[str, int]  # the stand-in Mender's


def _environment(first: EdgeFiles, postgres: Postgres, directory: Path) -> EdgeFiles:
    """``first``'s CA, server certificate and password with a registry of its own: a new database on the same
    PostgreSQL, in which the fleet is new."""
    pki = directory / "pki"
    pki.mkdir(parents=True)
    (pki / "ca-cert.pem").write_bytes(first.server_ca.read_bytes())
    db = Db.make("postgresql", postgres)
    db.configure(pki)
    with Registry(pki, create=True):
        pass
    return dataclasses.replace(first, pki=pki, db=db)


def _children(name: str) -> list[int]:
    """This process's children running the program ``name`` (the nginx masters edge_replicas.replicas started;
    _cpu adds their workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, IndexError, ValueError):
            continue
        if comm == name and rest.split()[1] == str(os.getpid()):
            found.append(int(stat.parent.name))
    return found


def _postmaster(files: EdgeFiles) -> int:
    """The PostgreSQL server's pid (its backends are its children)."""
    assert files.db.server is not None
    return int((files.db.server.data / "postmaster.pid").read_text().split()[0])


def _measure(count: int, files: EdgeFiles, fleet: list[SimDevice], directory: Path) -> _Run:
    """The fleet through ``count`` instances on ``files``' registry: new, cached, and (with two) crossed."""
    register(files, fleet)
    waves = WAVES if count > 1 else WAVES[:2]
    run = _Run({}, {}, {}, {}, {}, {})
    with standin_process() as standin, replicas(directory, files, standin["url"], count=count) as servers:
        nginxes = _children("nginx")
        if len(nginxes) != count:
            sys.exit(f"bench edge: found {len(nginxes)} nginx for {count} instances")
        parts = {"nginx": nginxes, "edge serve": [r.service["proc"].pid for r in servers],
                 "PostgreSQL": [_postmaster(files)], "stand-in": [standin["pid"]]}  # fmt: skip
        for wave in waves:
            logged = {r.name: len(decisions(r.service["log"])) for r in servers}
            # Every other device to each instance; crossed: to the other one.
            shift = 1 if wave == "crossed" else 0
            tracked = [Tracked(d, [servers[(i + shift) % count]]) for i, d in enumerate(fleet)]
            before = _cpus(parts)
            spread = switch_on_across(tracked, ONE_ATTEMPT, rate=math.inf, deadline=SWITCH_ON_DEADLINE)
            after = _cpus(parts)
            run.cpu[wave] = {part: after[part] - before[part] for part in before}
            _check_wave(f"{count} instance(s), {wave}", spread.devices)
            run.seconds[wave] = max(t.ended for d in spread.devices for t in d.tries) - spread.started
            run.accepted_by[wave] = Counter(str(d.accepted_by) for d in spread.devices)
            lines = [line for r in servers for line in decisions(r.service["log"])[logged[r.name] :]]
            if {line["decision"] for line in lines} != {"accepted"} or len(lines) != len(fleet):
                sys.exit(f"bench edge: {count} instance(s), {wave}: the instances decided"
                         f" {Counter((line['decision'], line['reason']) for line in lines)}")  # fmt: skip
            run.preauthorized[wave] = Counter(bool(line["preauthorized"]) for line in lines)
        _check_registry(files, fleet, mender_devices(standin["url"]))
    summary = standin["summary"]
    if summary["deviations"]:
        sys.exit(f"bench edge: the stand-in saw requests off the spec: {summary['deviations'][:3]}")
    keys = {d.name: d.pubkey.strip() for d in fleet}
    run.mender = {d["identity"]["serial"]: (d["status"], d["auth_sets"], (d["pubkey"] or "").strip() == keys.get(
        d["identity"]["serial"])) for d in summary["devices"]}  # fmt: skip
    run.calls = summary["calls"]
    return run


def _check_wave(what: str, devices: list[Tracked]) -> None:
    """Every device accepted at its one request, by the instance it went to."""
    wrong = [(d.device.name, [(t.server, t.status) for t in d.tries]) for d in devices
             if [(t.server, t.status) for t in d.tries] != [(d.servers[0].name, 200)]]  # fmt: skip
    if wrong:
        sys.exit(f"bench edge: {what}: {len(wrong)} devices not accepted at once, e.g. {wrong[:3]}")


def _check_registry(files: EdgeFiles, fleet: list[SimDevice], held: list[dict[str, Any]]) -> None:
    """One pin per device, naming the Mender device that holds its identity, whichever instance made it."""
    pins = files.rows("SELECT identity, mender_device_id FROM pins WHERE released_at IS NULL")
    pinned = Counter(json.loads(str(identity))["serial"] for identity, _ in pins)
    ids = {json.loads(str(identity))["serial"]: str(mender_id) for identity, mender_id in pins}
    in_mender = {d["identity_data"]["serial"]: str(d["id"]) for d in held}
    names = {d.name for d in fleet}
    if set(pinned) != names or max(pinned.values()) != 1 or ids != in_mender:
        sys.exit(f"bench edge: the registry's pins ({len(pins)}, {len(set(pinned))} devices) do not match the"
                 f" fleet ({len(names)}) and Mender's devices ({len(in_mender)})")  # fmt: skip


def _instances(args: argparse.Namespace, counts: list[int]) -> None:
    started = time.monotonic()
    runs: dict[int, list[_Run]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp_name, running_postgres() as postgres:
        tmp = Path(tmp_name)
        first = shared_pki(tmp / "edge", postgres)
        fleet = make_fleet(first.ca, args.devices, tmp / "fleet", first.server_ca, "inst")
        for round_ in range(args.rounds):
            for count in counts if round_ % 2 == 0 else counts[::-1]:
                directory = tmp / f"round-{round_}-{count}"
                files = first if not any(runs.values()) else _environment(first, postgres, directory)
                directory.mkdir(exist_ok=True)
                runs[count].append(_measure(count, files, fleet, directory))
    _report(args, counts, runs, time.monotonic() - started)


def _report(args: argparse.Namespace, counts: list[int], runs: dict[int, list[_Run]], took: float) -> None:
    cores, devices, rounds = os.cpu_count() or 1, args.devices, args.rounds
    label = {count: f"{count} instance{'s' if count > 1 else ''}" for count in counts}
    waves = [w for w in WAVES if any(w in r.seconds for rs in runs.values() for r in rs)]
    print(f"{devices} devices switching on all at once, one request each, through nginx (TLS) and edge serve"
          " (identity pinned,")  # fmt: skip
    print("route check) to the stand-in Mender server, on loopback; the registry on one PostgreSQL; each instance")
    print(f"behind its own nginx, every other device to each; {rounds} round{'s' if rounds > 1 else ''}, each"
          f" configuration afresh every time (took {took:.0f} s)")  # fmt: skip
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f} (other work on them slows every figure)")
    print()
    ratio = len(counts) == 2
    print(f"{'devices/s accepted':<44}" + "".join(f"{label[c]:>20}" for c in counts)
          + (f"{f'ratio {counts[1]}/{counts[0]}':>12}" if ratio else ""))  # fmt: skip
    mean: dict[tuple[int, str], float] = {}
    ratios: dict[str, float] = {}
    for wave in waves:
        cells = []
        for count in counts:
            rates = [devices / r.seconds[wave] for r in runs[count] if wave in r.seconds]
            if not rates:
                cells.append("-")
                continue
            mean[count, wave] = sum(rates) / len(rates)
            each = f" ({' '.join(f'{x:.0f}' for x in rates)})" if len(rates) > 1 else ""
            cells.append(f"{mean[count, wave]:.1f}{each}")
        line = f"{f'  {wave:<8}({WAVE_NOTES[wave]})':<44}" + "".join(f"{cell:>20}" for cell in cells)
        if ratio and all((c, wave) in mean for c in counts):
            ratios[wave] = mean[counts[1], wave] / mean[counts[0], wave]
            line += f"{ratios[wave]:>12.2f}"
        print(line)
    if rounds > 1:
        print(f"  (the mean of {rounds} rounds; each round's in brackets)")
    print()
    names = ["nginx", "edge serve", "PostgreSQL", "stand-in", "devices"]
    spent: dict[tuple[int, str], dict[str, float]] = {}  # CPU ms per device, by count and wave, by part
    print(f"{'CPU ms per device':<22}" + "".join(f"{name:>11}" for name in names)
          + f"{'the edge alone':>16}{'everything':>12}")  # fmt: skip
    for wave in waves:
        for count in counts:
            done = [r for r in runs[count] if wave in r.cpu]
            if not done:
                continue
            ms = {n: sum(r.cpu[wave][n] for r in done) * 1000 / (devices * len(done)) for n in names}
            spent[count, wave] = ms
            edge = cores * 1000 / (ms["nginx"] + ms["edge serve"] + ms["PostgreSQL"])
            print(f"  {wave:<8}{label[count]:>12}" + "".join(f"{ms[n]:>11.2f}" for n in names)
                  + f"{f'{edge:.0f}/s':>16}{f'{cores * 1000 / sum(ms.values()):.0f}/s':>12}")  # fmt: skip
    print(f"  (the edge alone: nginx + edge serve + PostgreSQL on {cores} idle cores; everything: all that ran here,"
          f" on {cores} cores)")  # fmt: skip
    print()
    expected = ("accepted", 1, True)
    every = [r.mender for rs in runs.values() for r in rs]
    same = all(view == every[0] for view in every) and all(v == expected for v in every[0].values())
    print("answers: every device accepted at its one request, in every wave and every run;")
    for count in counts:
        by = sum((r.accepted_by["new"] for r in runs[count]), Counter())
        shares = ", ".join(f"{name} {n // rounds}" for name, n in sorted(by.items()))
        pre = {w: sum((r.preauthorized[w] for r in runs[count] if w in r.preauthorized), Counter()) for w in waves}
        made = ", ".join(f"{w} {pre[w][True] // rounds}" for w in waves if pre[w])
        calls = ", ".join(f"{k} {v}" for k, v in runs[count][0].calls.items())
        print(f"  {label[count]:>12}: accepted by instance {shares}; preauthorized: {made};"
              f" Mender's calls: {calls}")  # fmt: skip
    print(f"  Mender's view after each run: {'the same' if same else 'DIFFERENT'} with"
          f" {' and '.join(label[c] for c in counts)} (each device accepted, one auth set, its own key);")  # fmt: skip
    print("  the registry after each run: one pin per device, naming the Mender device that holds its identity")
    if ratio:
        kept = all(r >= KEPT for r in ratios.values())
        figures = ", ".join(f"{w} {r:.2f}" for w, r in ratios.items())
        one, two = spent[counts[0], "new"], spent[counts[1], "new"]
        print()
        print(f"On {cores} cores the second instance cannot add much: everything here (the simulated devices, the"
              f" stand-in Mender,")  # fmt: skip
        print(f"PostgreSQL, nginx, edge serve) shares the {cores} cores and costs {sum(two.values()):.1f} ms of CPU"
              f" per new device, so no number of")  # fmt: skip
        print(f"instances passes ~{cores * 1000 / sum(two.values()):.0f} new devices/s on this machine. What a second"
              " one can take away here is the bound of one")  # fmt: skip
        print(f"edge serve, one Python process on one core at most ({one['edge serve']:.2f} ms per new device:"
              f" <= {1000 / one['edge serve']:.0f}/s). What counts is that")  # fmt: skip
        print(f"two instances give the same answers ({'they do' if same else 'THEY DO NOT'}) and lose no"
              f" throughput: ratio {figures} ({'none below' if kept else 'BELOW'} {KEPT};")  # fmt: skip
        print("each round's figures, in brackets, show how much other work on the machine moves them).")
    if not same:
        sys.exit("bench edge: the instances' answers differ")


def main() -> None:
    if "--est" in sys.argv[1:]:
        # Enrollments/s (issue 27): a benchmark of its own, scripts/bench_edge_est.py (--est --help).
        os.execv(sys.executable, [sys.executable, str(ROOT / "scripts" / "bench_edge_est.py"), *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument("--new-rate", type=float, default=200, help="arrivals/s for the new-device latency")
    parser.add_argument("--cached-rate", type=float, default=500, help="arrivals/s for the cached latency")
    parser.add_argument("--crl-churn", action="store_true", help="also the latency while the edge's CRL changes")
    parser.add_argument("--crl-size", type=int, default=100_000, help="revoked serials in that CRL (default 100000)")
    parser.add_argument("--churn-interval", type=float, default=0.5, help="seconds between two CRLs (default 0.5)")
    parser.add_argument("--churn-rounds", type=int, default=2, help="measurements each way (default 2)")
    parser.add_argument("--instances", metavar="1,2", help="instead: devices/s with 1 and 2 edge serve instances on"
                        " one PostgreSQL registry, and the ratio (counts, comma-separated: 1, 2 or both)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="with --instances: runs of each (default 2)")
    parser.add_argument("--est", action="store_true", help="instead: enrollments/s (EST) at the edge against the "
                        "station issuing certificates itself (scripts/bench_edge_est.py; --est --help)")  # fmt: skip
    args = parser.parse_args()
    if args.crl_churn and not (args.crl_size >= 1 and args.churn_interval > 0 and args.churn_rounds >= 1):
        parser.error("--crl-size and --churn-rounds must be at least 1, --churn-interval above 0")
    if args.instances is not None:
        counts = [int(c) if c.strip() in ("1", "2") else 0 for c in args.instances.split(",")]
        if 0 in counts or len(set(counts)) != len(counts) or args.crl_churn or args.rounds < 1 or args.devices < 2:
            parser.error("--instances takes 1, 2 or 1,2 (not with --crl-churn); --rounds at least 1, --devices 2")
        try:
            _instances(args, sorted(counts))  # the ratio: 2 instances / 1
        except pytest.skip.Exception as missing:  # tests/pg.py: no PostgreSQL server here, or not root
            sys.exit(f"bench edge --instances: {missing}")
        return
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp_name:
        tmp = Path(tmp_name)
        ca = FleetCA()
        pki, server = ca.write_edge(tmp / "edge")
        password = tmp / "password"
        password.write_text(PASSWORD)
        burst = make_fleet(ca, args.devices, tmp / "burst", pki / "ca-cert.pem", "burst")
        paced = make_fleet(ca, args.devices, tmp / "paced", pki / "ca-cert.pem", "paced")
        _register(pki, [burst, paced])
        live, crl_args, churn_crl, made, settled = pki / "crl.pem", [], None, 0.0, 0.0
        if args.crl_churn:
            revoked = _revoked(args.crl_size)
            live.write_bytes(_crl(ca, revoked, 1))
            started = time.monotonic()
            churn_crl = _crl(ca, revoked, 2)  # the same serials, newer: the edge takes it
            made = time.monotonic() - started
            crl_args = ["--crl", live]
        port, gate_port = free_port(), free_port()
        with standin_process() as standin:
            # The defaults: the registry for revocation and the identity pin, and the route check.
            serve = ["--pki", pki, "--upstream", standin["url"], "--username", USER, "--password-file", password]
            with edge_service(tmp, *serve, *crl_args) as service:
                if args.crl_churn:
                    # Its first round of cutting revoked devices off asks the registry of every serial in the CRL.
                    settled = _wait_idle(service["proc"].pid, "edge serve, after it read the CRL,")
                nginx_args = ["edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream", standin["url"]]
                conf = imageprov_pki(*nginx_args, "--listen", f"127.0.0.1:{port}", "--accept", service["url"]).stdout
                # The same nginx without the service: TLS and the CA check only, no route check.
                bare = imageprov_pki(*nginx_args, "--listen", f"127.0.0.1:{gate_port}").stdout
                with nginx(tmp, conf, port) as nginx_proc, nginx(tmp, bare, gate_port):
                    pids = {"nginx": [nginx_proc.pid], "edge serve": [service["proc"].pid],
                            "stand-in": [standin["pid"]]}  # fmt: skip
                    url = f"https://localhost:{port}"
                    # Throughput: the whole fleet at once, then again (cached), then its deployment polls,
                    # with the CPU each part spent.
                    marks = [_cpus(pids)]
                    waves = {}
                    for name, run in (("new", switch_on), ("cached", switch_on), ("polls", poll)):
                        waves[name] = run(burst, url)
                        marks.append(_cpus(pids))
                    bare_polls = poll(burst, f"https://localhost:{gate_port}")
                    cpu = {part: [b[part] - a[part] for a, b in itertools.pairwise(marks)] for part in marks[0]}
                    # Latency: another fleet arriving at the goal rates.
                    timed = {"new": switch_on(paced, url, rate=args.new_rate),
                             "cached": switch_on(paced, url, rate=args.cached_rate),
                             "polls": poll(paced, url, rate=args.cached_rate)}  # fmt: skip
                    # By way ("steady", "churn") and wave ("cached", "polls"): the waves of every round.
                    churned: dict[str, dict[str, list[Wave]]] = {}
                    published, edge_cpu = 0, {"steady": 0.0, "churn": 0.0}
                    for _, label in itertools.product(range(args.churn_rounds if args.crl_churn else 0),
                                                      ("steady", "churn")):  # fmt: skip
                        before = _cpu(service["proc"].pid)
                        with _churn(live, churn_crl if label == "churn" else None, args.churn_interval) as times:
                            way = churned.setdefault(label, {"cached": [], "polls": []})
                            way["cached"].append(switch_on(paced, url, rate=args.cached_rate))
                            way["polls"].append(poll(paced, url, rate=args.cached_rate))
                        published += len(times)
                        edge_cpu[label] += _cpu(service["proc"].pid) - before
                    churn_waves = [w for way in churned.values() for waves_of in way.values() for w in waves_of]
                    for wave in (*waves.values(), *timed.values(), bare_polls, *churn_waves):
                        if set(wave.statuses()) - {200, 204}:
                            sys.exit(f"bench edge: not every device got through: {wave.statuses()}")
        deviations = standin["summary"]["deviations"]
        if deviations:
            sys.exit(f"bench edge: the stand-in saw requests off the spec: {deviations[:3]}")
    cores = os.cpu_count() or 1
    print(f"{args.devices} devices through nginx (TLS), edge serve (registry, identity pinned, route check) and the")
    print("stand-in Mender server, on loopback")
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f} (other work on them slows every figure)")
    rates = {"new": args.new_rate, "cached": args.cached_rate, "polls": args.cached_rate}
    goals = {"new": 200, "cached": 500, "polls": 500}
    for index, name in enumerate(waves):
        print(_line(name, args.devices / waves[name].seconds, timed[name], rates[name], goals[name]))
        spent = {part: seconds[index] * 1000 / args.devices for part, seconds in cpu.items()}
        edge = spent["nginx"] + spent["edge serve"]
        total = sum(spent.values())
        print(f"{'':>9}CPU ms per device: " + ", ".join(f"{part} {ms:.2f}" for part, ms in spent.items())
              + f"; the edge (nginx + edge serve) alone: {cores * 1000 / edge:.0f} devices/s on {cores} idle cores,"
              f" everything here: {cores * 1000 / total:.0f}")  # fmt: skip
    with_check, without = args.devices / waves["polls"].seconds, args.devices / bare_polls.seconds
    print(f"  route check (cut-off): polls {with_check:.0f}/s with it, {without:.0f}/s through nginx without it:"
          f" ratio {with_check / without:.2f}")  # fmt: skip
    if churned:
        print(f"  CRL churn: the edge reads a CRL of {args.crl_size} serials (built, signed, PEM-encoded in"
              f" {made:.2f} s; the edge's first cut-off round over them took {settled:.1f} s); {args.churn_rounds}"
              " rounds each way,"
              f" with churn a new one renamed over it every {args.churn_interval:g} s ({published} in all); edge"
              f" serve and its worker spent {edge_cpu['churn']:.1f} s CPU with churn, {edge_cpu['steady']:.1f} s"
              " without")  # fmt: skip
        for name in ("cached", "polls"):
            steady, churn = churned["steady"][name], churned["churn"][name]
            figures = {way: [_percentile(waves, share) * 1000 for share in (0.5, 0.99)]
                       for way, waves in (("steady", steady), ("churn", churn))}  # fmt: skip
            ratio = figures["churn"][1] / max(figures["steady"][1], 1e-6)
            print(f"{name:>9} at {args.cached_rate:.0f}/s: steady p50 {figures['steady'][0]:.0f} ms, p99"
                  f" {figures['steady'][1]:.0f} ms; with churn p50 {figures['churn'][0]:.0f} ms, p99"
                  f" {figures['churn'][1]:.0f} ms: p99 ratio {ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
