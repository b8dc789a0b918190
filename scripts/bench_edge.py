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
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageprov.pki.ca import CertificateAuthority, Issued  # noqa: E402
from imageprov.pki.registry import Reason, Record, Registry, Status  # noqa: E402
from imageprov.pki.revocation import build_crl, crl_bytes  # noqa: E402
from tests.conftest import imageprov_pki  # noqa: E402
from tests.edge_fleet import SimDevice, Wave, make_fleet, poll, standin_process, switch_on  # noqa: E402
from tests.edge_support import PASSWORD, USER, FleetCA, edge_service, free_port, nginx  # noqa: E402


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


def _cpus(pids: dict[str, int]) -> dict[str, float]:
    found = {name: _cpu(pid) for name, pid in pids.items()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument("--new-rate", type=float, default=200, help="arrivals/s for the new-device latency")
    parser.add_argument("--cached-rate", type=float, default=500, help="arrivals/s for the cached latency")
    parser.add_argument("--crl-churn", action="store_true", help="also the latency while the edge's CRL changes")
    parser.add_argument("--crl-size", type=int, default=100_000, help="revoked serials in that CRL (default 100000)")
    parser.add_argument("--churn-interval", type=float, default=0.5, help="seconds between two CRLs (default 0.5)")
    parser.add_argument("--churn-rounds", type=int, default=2, help="measurements each way (default 2)")
    args = parser.parse_args()
    if args.crl_churn and not (args.crl_size >= 1 and args.churn_interval > 0 and args.churn_rounds >= 1):
        parser.error("--crl-size and --churn-rounds must be at least 1, --churn-interval above 0")
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
                    pids = {"nginx": nginx_proc.pid, "edge serve": service["proc"].pid, "stand-in": standin["pid"]}
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
