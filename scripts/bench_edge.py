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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import imageprov_pki  # noqa: E402
from tests.edge_fleet import make_fleet, standin_process, switch_on  # noqa: E402
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
        port = free_port()
        with standin_process() as standin:
            serve = ["--ca", pki / "ca-cert.pem", "--upstream", standin["url"], "--username", USER,
                     "--password-file", password]  # fmt: skip
            with edge_service(tmp, *serve) as service:
                conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream",
                                     standin["url"], "--listen", f"127.0.0.1:{port}", "--accept",
                                     service["url"]).stdout  # fmt: skip
                with nginx(tmp, conf, port) as nginx_proc:
                    pids = {"nginx": nginx_proc.pid, "edge serve": service["proc"].pid, "stand-in": standin["pid"]}
                    url = f"https://localhost:{port}"
                    # Throughput: the whole fleet at once, then again (cached), with the CPU each part spent.
                    burst = make_fleet(ca, args.devices, tmp / "burst", pki / "ca-cert.pem", "burst")
                    start = _cpus(pids)
                    new = switch_on(burst, url)
                    middle = _cpus(pids)
                    cached = switch_on(burst, url)
                    end = _cpus(pids)
                    cpu = {name: (middle[name] - start[name], end[name] - middle[name]) for name in start}
                    # Latency: another fleet arriving at the goal rates.
                    paced = make_fleet(ca, args.devices, tmp / "paced", pki / "ca-cert.pem", "paced")
                    new_paced = switch_on(paced, url, rate=args.new_rate)
                    cached_paced = switch_on(paced, url, rate=args.cached_rate)
                    for wave in (new, cached, new_paced, cached_paced):
                        if wave.statuses() != {200: args.devices}:
                            sys.exit(f"bench edge: not every device was accepted: {wave.statuses()}")
        deviations = standin["summary"]["deviations"]
        if deviations:
            sys.exit(f"bench edge: the stand-in saw requests off the spec: {deviations[:3]}")
    cores = os.cpu_count() or 1
    print(f"{args.devices} devices through nginx (TLS), edge serve and the stand-in Mender server, on loopback")
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f} (other work on them slows every figure)")
    rows = (("new", new, new_paced, args.new_rate, 200), ("cached", cached, cached_paced, args.cached_rate, 500))
    for index, (name, wave, paced_wave, rate, goal) in enumerate(rows):
        throughput = args.devices / wave.seconds
        p50, p99 = paced_wave.percentile(0.50), paced_wave.percentile(0.99)
        verdict = "ok" if throughput >= goal and p99 < 1.0 else "BELOW GOAL"
        print(f"{name:>7}: all at once {throughput:6.1f} devices/s; arriving at {rate:.0f}/s: p50 {p50 * 1000:4.0f} ms,"
              f" p99 {p99 * 1000:5.0f} ms  (goal >= {goal}/s, p99 < 1000 ms: {verdict})")  # fmt: skip
        spent = {part: seconds[index] * 1000 / args.devices for part, seconds in cpu.items()}
        edge = spent["nginx"] + spent["edge serve"]
        total = sum(spent.values())
        print(f"{'':>9}CPU ms per device: " + ", ".join(f"{part} {ms:.2f}" for part, ms in spent.items())
              + f"; the edge (nginx + edge serve) alone: {cores * 1000 / edge:.0f} devices/s on {cores} idle cores,"
              f" everything here: {cores * 1000 / total:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
