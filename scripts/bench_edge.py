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
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageprov.pki.ca import Issued  # noqa: E402
from imageprov.pki.registry import Registry, Status  # noqa: E402
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp_name:
        tmp = Path(tmp_name)
        ca = FleetCA()
        pki, server = ca.write_edge(tmp / "edge")
        password = tmp / "password"
        password.write_text(PASSWORD)
        burst = make_fleet(ca, args.devices, tmp / "burst", pki / "ca-cert.pem", "burst")
        paced = make_fleet(ca, args.devices, tmp / "paced", pki / "ca-cert.pem", "paced")
        _register(pki, [burst, paced])
        port, gate_port = free_port(), free_port()
        with standin_process() as standin:
            # The defaults: the registry for revocation and the identity pin, and the route check.
            serve = ["--pki", pki, "--upstream", standin["url"], "--username", USER, "--password-file", password]
            with edge_service(tmp, *serve) as service:
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
                    for wave in (*waves.values(), *timed.values(), bare_polls):
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


if __name__ == "__main__":
    main()
