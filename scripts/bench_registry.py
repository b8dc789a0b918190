"""What the registry adds per device: SQLite and PostgreSQL, one station and three.

Each station is a process that, per device, does what ``stamp`` asks of the
registry: issue a certificate (the CA's work, timed apart), look for a live
certificate, record it pending, and mark it delivered. The PostgreSQL server
is a real one started here (tests/pg.py) with its durable settings (fsync
on), over a Unix socket; SQLite is a file in a temporary PKI, with
``synchronous=FULL`` as imageprov opens it. Printed: certificates issued and
recorded per second (the whole line), and the registry's milliseconds per
device in each station (mean and 95th percentile) against the goal of 5 ms,
with this disk's fdatasync time: the floor of the one durable commit a device
needs. With three stations, each waits its turn for the others' commits.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageprov.pki.ca import CertificateAuthority, Subject, load_ca  # noqa: E402
from imageprov.pki.registry import Registry, Status  # noqa: E402
from tests.pg import Db, running_postgres  # noqa: E402

GOAL_MS = 5.0


def station(pki: str, name: str, count: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ca = load_ca(Path(pki), None)
    issue, registry_ms = [], []
    with Registry(Path(pki)) as registry:
        registry.lease()  # once per station run, as stamp does at its first device
        start = time.perf_counter()
        for i in range(count):
            t0 = time.perf_counter()
            issued = ca.issue_device(f"{name}-{i:05d}")
            t1 = time.perf_counter()
            registry.revoke_abandoned(issued.cert.subject.rfc4514_string().removeprefix("CN="))
            registry.record(issued, status=Status.PENDING)
            registry.deliver(issued.serial_hex, f"/out/{name}-{i:05d}.sdimg")
            t2 = time.perf_counter()
            issue.append(t1 - t0)
            registry_ms.append((t2 - t1) * 1000)
        queue.put((time.perf_counter() - start, issue, registry_ms))


def run(pki: Path, stations: int, count: int) -> tuple[float, list[float], list[float]]:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    jobs = [context.Process(target=station, args=(str(pki), f"s{n}", count, queue)) for n in range(stations)]
    for job in jobs:
        job.start()
    results = [queue.get() for _ in jobs]
    for job in jobs:
        job.join()
    wall = max(r[0] for r in results)
    return wall, [x for r in results for x in r[1]], [x for r in results for x in r[2]]


def fsync_ms(directory: Path, rounds: int = 50) -> float:
    """This disk's cost of one small durable write: the floor of a durable commit."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(rounds):
            os.write(fd, b"x" * 512)
            os.fdatasync(fd)
        return (time.perf_counter() - start) * 1000 / rounds
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="devices per station (default 200)")
    args = parser.parse_args()
    print(f"{'backend':<11} {'stations':>8} {'certs/s':>8} {'issue ms':>9} {'registry ms':>12} {'p95':>6}  goal (mean)")
    with running_postgres(durable=True) as server, tempfile.TemporaryDirectory() as work:
        for backend in ("sqlite", "postgresql"):
            for stations in (1, 3):
                pki = Path(work) / f"{backend}-{stations}"
                pki.mkdir()
                CertificateAuthority.create(Subject("Bench CA")).write_to(pki, None)
                Db.make(backend, server if backend == "postgresql" else None).configure(pki)
                wall, issue, registry = run(pki, stations, args.count)
                mean = statistics.fmean(registry)
                p95 = statistics.quantiles(registry, n=20)[-1]
                print(
                    f"{backend:<11} {stations:>8} {stations * args.count / wall:>8.0f} "
                    f"{statistics.fmean(issue) * 1000:>9.2f} {mean:>12.2f} {p95:>6.2f}  "
                    f"{'ok' if mean <= GOAL_MS else 'over'} ({mean / GOAL_MS:.2f} of {GOAL_MS:g} ms)"
                )
        # A certificate is on disk before its key is in an image: one durable commit per device, at least.
        print(f"floor: one fdatasync on this disk takes {fsync_ms(Path(work)):.2f} ms")


if __name__ == "__main__":
    main()
