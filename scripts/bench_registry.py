"""What the registry costs per device: stations sharing one registry, or one registry grown to a fleet's size.

Both modes run against SQLite and PostgreSQL. The PostgreSQL server is a real
one started here (tests/pg.py) with its durable settings (fsync on), over a
Unix socket; SQLite is a file in a temporary PKI, with ``synchronous=FULL``
as imageprov opens it.

stations (the default: no --rows)
  Each station is a process that, per device, does what ``stamp`` asks of the
  registry: issue a certificate (the CA's work, timed apart), look for a live
  certificate, record it pending, and mark it delivered. Printed: certificates
  issued and recorded per second (the whole line), and the registry's
  milliseconds per device in each station (mean and 95th percentile) against
  the goal of 5 ms, with this disk's fdatasync time: the floor of the one
  durable commit a device needs. With three stations, each waits its turn for
  the others' commits.

fleet (--rows N[,N...]; --rows alone is 0,10k,100k; 1M is allowed)
  For each N, a registry of N real certificates from the PKI's CA with a
  fleet's history (mostly delivered, a tenth revoked: superseded or
  key-compromise, a few pending of stations that were killed), made fast and
  bulk-inserted by scripts/registry_fill.py into the schema that Registry
  itself creates, then checked with 'imageprov registry check'. Then timed
  through the public API (Registry's methods, the CLI as a subprocess), so
  that changes to the registry's queries show up here:

    stamp      per new device, what stamp asks: its share of live_of (the
               batch's live certificates, read at the start), record
               (pending), deliver (imageprov/line/stamp.py)
    flash      per new device, what flash asks: live (its delivery check),
               revoke_abandoned, record (pending), deliver (line/flash.py)
    reissue    stamp --reissue of a delivered device: live, revoke_abandoned,
               record(reissue=True), deliver
    wait       flash --wait's start: per id already delivered, live() (what
               the CLI does now), and the bulk query if Registry has one
    live       Registry.live(id) of a delivered device (also a stamp rerun)
    status     Registry.status_of_serial (the edge's lookup), microseconds
    revoke     Registry.revoke(device_id=...)
    crl        Registry.revocations() and build_crl over all revoked, then the
               'imageprov crl' command; with seconds per 100,000 revoked
    devices    'imageprov devices --json': wall time and peak RSS

  Only the registry is timed: the timed devices' certificates are issued
  before the clock starts. Per-device figures are medians (milliseconds
  unless marked). Printed: how long each fill and each 'registry check' took,
  then a table per backend with a column per N, the ratio of the largest N to
  the smallest (0: an empty registry), and the goals: per-device cost at the
  largest N within 1.5x of the smallest, a CRL of 100,000 revoked in at most
  1 s, 'devices --json' memory flat (1.5x). Write a million as 1M or
  1000000: commas separate sizes.

  scripts/bench registry --rows                  0, 10k and 100k, both backends
  scripts/bench registry --rows 0,1M --backends postgresql
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from registry_fill import Certificates, Filled, PostgresSink, Sink, SqliteSink, fill  # noqa: E402

from imageprov.pki.ca import CertificateAuthority, Issued, Subject, load_ca  # noqa: E402
from imageprov.pki.registry import Reason, Registry, Status  # noqa: E402
from imageprov.pki.revocation import build_crl, crl_bytes  # noqa: E402
from tests.pg import Db, Postgres, running_postgres  # noqa: E402

GOAL_MS = 5.0
BACKENDS = ("sqlite", "postgresql")
DEFAULT_ROWS = "0,10k,100k"
STATUS_LOOKUPS = 1000
REVOKES = 50
FLAT = 1.5  # the largest registry's per-device cost (and devices' memory) within this of the smallest's
CRL_GOAL_S = 1.0  # per 100,000 revoked
CRL_MIN_REVOKED = 10_000  # fewer, and the estimate per 100,000 is mostly fixed costs


# -- stations (the default mode) ------------------------------------------------------------


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


def stations_mode(args: argparse.Namespace) -> None:
    print(f"{'backend':<11} {'stations':>8} {'certs/s':>8} {'issue ms':>9} {'registry ms':>12} {'p95':>6}  goal (mean)")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_postgres(durable=True)) if "postgresql" in args.backends else None
        work = stack.enter_context(tempfile.TemporaryDirectory())
        for backend in args.backends:
            for stations in (1, 3):
                pki = Path(work) / f"{backend}-{stations}"
                pki.mkdir()
                CertificateAuthority.create(Subject("Bench CA")).write_to(pki, None)
                Db.make(backend, server).configure(pki)
                Registry(pki, create=True).close()  # as 'ca init' makes it: only a PKI's start creates one
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


# -- fleet (--rows) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    digits: int
    goal: str = ""  # "flat": within FLAT of the smallest N; "crl": at most CRL_GOAL_S
    ratio: bool = True  # show the largest N's against the smallest's


def metrics(devices: int) -> list[Metric]:
    return [
        Metric("stamp", f"stamp: registry ms/device ({devices} new)", 2, "flat"),
        Metric("flash", f"flash: registry ms/device ({devices} new)", 2, "flat"),
        Metric("reissue", f"stamp --reissue: ms/device ({devices} delivered)", 2, "flat"),
        Metric("wait", f"flash --wait start: ms/id, live() each, as before ({2 * devices})", 3),
        Metric("wait_bulk", f"flash --wait start: ms/id, one bulk query (*) ({2 * devices})", 4, "flat"),
        Metric("live", f"live(id) ms, delivered ({devices}; = stamp rerun)", 3, "flat"),
        Metric("status", f"status_of_serial us ({STATUS_LOOKUPS})", 1, "flat"),
        Metric("revoke", f"revoke(device_id=) ms ({REVOKES})", 2, "flat"),
        Metric("revoked", "revoked certificates (R)", 0, ratio=False),
        Metric("crl_read", "crl: Registry.revocations() s", 3),
        Metric("crl_build", "crl: build_crl + encode s", 3),
        Metric("crl_100k", "crl: s per 100k revoked (read+build)", 2, "crl"),
        Metric("crl_cli", "imageprov crl: wall s", 2),
        Metric("devices_s", "devices --json: wall s", 2),
        Metric("devices_mb", "devices --json: peak RSS MB", 0, "flat"),
        Metric("devices_out", "devices --json: output MB", 1, ratio=False),
        Metric("insert_s", "fill: bulk insert s", 1, ratio=False),
        Metric("check_s", "registry check: wall s", 2, ratio=False),
    ]


Results = dict[str, float | None]


def parse_rows(text: str) -> list[int]:
    """0,10k,100k,1M (k and M, or underscores) into sizes."""
    sizes = []
    for part in text.split(","):
        word = part.strip().lower().replace("_", "")
        scale = {"k": 1_000, "m": 1_000_000}.get(word[-1:], 1)
        try:
            sizes.append(int(word[:-1] if scale > 1 else word) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {part!r} (e.g. 0,10000,100k,1M)") from None
    if any(n < 0 for n in sizes):
        raise argparse.ArgumentTypeError("sizes are 0 or more")
    return sorted(set(sizes))


def parse_backends(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"backends are {' and '.join(BACKENDS)}, not {', '.join(unknown)}")
    return names


@dataclass(frozen=True)
class Child:
    seconds: float
    peak_mb: float  # the child's own maximum resident set (wait4), not other children's
    output: bytes  # stdout, if kept
    output_bytes: int


def run_imageprov(*args: str | Path, keep: bool = False) -> Child:
    """Run ``python -m imageprov ARGS`` as the operator would; its wall time and peak RSS (of it alone)."""
    argv = [sys.executable, "-m", "imageprov", *map(str, args)]
    # A child forked from this process counts this process's pages in its RSS until it execs (the fill's
    # rows among them): GNU time, a small process, forks imageprov and reports imageprov's own peak.
    gnu_time = Path("/usr/bin/time")
    peak_file = tempfile.NamedTemporaryFile(suffix=".rss")  # noqa: SIM115 - closed below
    if gnu_time.exists():
        argv = [str(gnu_time), "-q", "-f", "%M", "-o", peak_file.name, *argv]
    with peak_file, tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, cwd=ROOT) as proc:
            assert proc.stdout is not None
            kept, size = [], 0
            while chunk := proc.stdout.read(1 << 20):  # read as it comes: stdout is no file to fill
                size += len(chunk)
                if keep:
                    kept.append(chunk)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            errors.seek(0)
            said = b"".join(kept).decode(errors="replace") + errors.read().decode(errors="replace")
            raise SystemExit(f"imageprov {' '.join(map(str, args))} failed ({proc.returncode}):\n{said}")
        peak_kb = float(Path(peak_file.name).read_text() or 0) if gnu_time.exists() else usage.ru_maxrss
    return Child(seconds, peak_kb / 1024, b"".join(kept), size)


def median_ms(seconds: Sequence[float]) -> float | None:
    return statistics.median(seconds) * 1000 if seconds else None


def per_item(items: Sequence[str], step: Callable[[str], object]) -> list[float]:
    """Seconds of ``step`` for each item."""
    times = []
    for item in items:
        start = time.perf_counter()
        step(item)
        times.append(time.perf_counter() - start)
    return times


def issue(ca: CertificateAuthority, device_ids: Sequence[str]) -> list[Issued]:
    """Certificates for the timed devices, issued for real (each its own key) before the clock starts."""
    return [ca.issue_device(device_id) for device_id in device_ids]


def measure(pki: Path, ca: CertificateAuthority, filled: Filled, devices: int, tag: str) -> Results:
    """Time what stamp, flash and the edge ask of the registry at ``pki``, and the CLI's crl and devices."""
    out: Results = {}
    fleet = list(filled.delivered.items)
    random.Random(11).shuffle(fleet)
    with Registry(pki) as registry:
        registry.lease()  # as a station does at its first device, before the clock starts

        def new_devices(kind: str, stamp: bool, where: Callable[[str], str]) -> list[tuple[str, str]]:
            ids = [f"new-{kind}-{tag}-{n:05d}" for n in range(devices)]
            certificates = issue(ca, ids)
            # stamp reads the batch's live certificates in one query per 500 ids at its start (Batch.run), and
            # asks revoke_abandoned only of devices that had one: a share of that query is each device's.
            start = time.perf_counter()
            ahead = registry.live_of(ids) if stamp else {}
            share = (time.perf_counter() - start) / len(ids)
            times = []
            for device_id, issued in zip(ids, certificates):
                start = time.perf_counter()
                if not stamp:
                    assert registry.live(device_id) is None  # FlashBatch.delivery
                if not stamp or device_id in ahead:
                    registry.revoke_abandoned(device_id)
                registry.record(issued, status=Status.PENDING)
                registry.deliver(issued.serial_hex, where(device_id))
                times.append(time.perf_counter() - start + share)
            out[kind] = median_ms(times)
            return [(device_id, issued.serial_hex) for device_id, issued in zip(ids, certificates)]

        own = new_devices("stamp", True, lambda d: f"/srv/bench/out/{d}.sdimg")
        own += new_devices("flash", False, lambda d: f"card /dev/sdz: {d}")
        # The fleet's delivered devices first; on a small registry, the ones just stamped and flashed.
        pool = fleet + own
        revokes = max(0, min(REVOKES, len(pool) - devices))

        # flash --wait, at its start: the ids already delivered are skipped. Once one live() each; now one query
        # per 500 ids (Registry.live_of, through FlashBatch.delivered_among). As many ids at every N (the devices
        # just stamped and flashed are enough of them on an empty registry).
        waiting = [device_id for device_id, _ in pool[: 2 * devices]]
        times = per_item(waiting, registry.live)
        out["wait"] = sum(times) * 1000 / len(waiting) if waiting else None
        start = time.perf_counter()
        found = registry.live_of(waiting)
        out["wait_bulk"] = (time.perf_counter() - start) * 1000 / len(waiting) if waiting else None
        assert len(found) == len(waiting), f"{len(found)} of {len(waiting)} delivered ids found"

        out["live"] = median_ms(per_item([device_id for device_id, _ in pool[:devices]], registry.live))
        serials = [serial for _, serial in pool[: STATUS_LOOKUPS // 2]]
        serials += [serial for _, serial in filled.revoked.items[: STATUS_LOOKUPS - len(serials)]]
        times = per_item(serials, registry.status_of_serial)
        out["status"] = statistics.median(times) * 1e6 if times else None

        # stamp --reissue of a delivered device whose image is there: _already_delivered, then a new certificate.
        reissued = [device_id for device_id, _ in pool[:devices]]
        times = []
        for device_id, issued in zip(reissued, issue(ca, reissued)):
            start = time.perf_counter()
            registry.live(device_id)
            registry.revoke_abandoned(device_id)
            registry.record(issued, status=Status.PENDING, reissue=True)
            registry.deliver(issued.serial_hex, f"/srv/bench/out/{device_id}.sdimg")
            times.append(time.perf_counter() - start)
        out["reissue"] = median_ms(times)

        doomed = [device_id for device_id, _ in pool[devices : devices + revokes]]
        out["revoke"] = median_ms(
            per_item(doomed, lambda device_id: registry.revoke(device_id=device_id, reason=Reason.KEY_COMPROMISE))
        )

        start = time.perf_counter()
        revoked = registry.revocations()  # what 'imageprov crl' reads
        read = time.perf_counter()
        crl_bytes(build_crl(ca, revoked, number=registry.next_crl_number()))
        built = time.perf_counter()
    out["revoked"] = len(revoked)
    out["crl_read"], out["crl_build"] = read - start, built - read
    out["crl_100k"] = (built - start) * 100_000 / len(revoked) if revoked else None
    out["crl_cli"] = run_imageprov("crl", "--pki", pki, "--out", pki / "bench.crl").seconds
    listed = run_imageprov("devices", "--pki", pki, "--json")
    out["devices_s"], out["devices_mb"], out["devices_out"] = listed.seconds, listed.peak_mb, listed.output_bytes / 1e6
    return out


def one_size(
    rows: int, work: Path, ca_dir: Path, backends: Sequence[str], server: Postgres | None, certificates: Certificates,
    devices: int,
) -> dict[str, Results]:  # fmt: skip
    """Fill a registry of ``rows`` in every backend (one set of certificates), check it, then measure each."""
    ca = load_ca(ca_dir, None)
    here = work / f"rows-{rows}"
    made: dict[str, tuple[Path, Db]] = {}
    try:
        sinks: list[Sink] = []
        for backend in backends:
            pki = here / backend
            pki.mkdir(parents=True)
            ca.write_to(pki, None)
            db = Db.make(backend, server if backend == "postgresql" else None)
            db.configure(pki)
            made[backend] = (pki, db)
            Registry(pki, create=True).close()  # the schema, by Registry's own migrations
            sinks.append(SqliteSink(pki / "registry.sqlite") if backend == "sqlite" else PostgresSink(db.url(pki)))
        filled = fill(rows, certificates, sinks)
        states = ", ".join(f"{status} {count}" for status, count in sorted(filled.by_status.items())) or "empty"
        inserts = ", ".join(f"{sink.name} {sink.seconds:.1f} s" for sink in sinks)
        print(
            f"N={rows}: {filled.rows} certificates ({states}) signed and inserted in {filled.seconds:.1f} s "
            f"({certificates.workers} signing processes; inserts: {inserts})",
            flush=True,
        )
        results: dict[str, Results] = {}
        for backend, sink in zip(backends, sinks):
            pki, _ = made[backend]
            checked = run_imageprov("registry", "check", "--pki", pki, keep=True)
            said = "\n".join(f"    {line}" for line in checked.output.decode().strip().splitlines())
            print(f"  {backend}: registry check passed in {checked.seconds:.1f} s:\n{said}")
            start = time.perf_counter()
            results[backend] = measure(pki, ca, filled, devices, tag=backend[:2])
            results[backend]["insert_s"] = sink.seconds
            results[backend]["check_s"] = checked.seconds
            print(f"  {backend}: measured in {time.perf_counter() - start:.1f} s", flush=True)
        return results
    finally:
        for backend, (_, db) in made.items():
            if backend == "postgresql" and server is not None:
                server.query("postgres", f'DROP DATABASE IF EXISTS "{db.database}" WITH (FORCE)')
        shutil.rmtree(here, ignore_errors=True)


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_tables(all_results: dict[int, dict[str, Results]], backends: Sequence[str], devices: int) -> None:
    sizes = sorted(all_results)
    small, large = sizes[0], sizes[-1]
    width = max(len(m.label) for m in metrics(devices))
    for backend in backends:
        head = f"{backend:<{width}}" + "".join(f"{'N=' + format(n, ','):>13}" for n in sizes)
        print(f"\n{head}  {f'{large:,}/{small:,}':>12}  goal")
        for metric in metrics(devices):
            values = [all_results[n][backend].get(metric.key) for n in sizes]
            first, last = values[0], values[-1]
            ratio = last / first if metric.ratio and first and last is not None and len(sizes) > 1 else None
            verdict = ""
            if metric.goal == "flat" and ratio is not None:
                verdict = f"{'ok' if ratio <= FLAT else 'OVER'} (<= {FLAT:g}x)"
            elif metric.goal == "crl" and last is not None:
                # Below 10,000 revoked, the fixed costs (a query, a signature) would dominate the estimate.
                revoked = all_results[large][backend].get("revoked") or 0
                verdict = (
                    f"{'ok' if last <= CRL_GOAL_S else 'OVER'} (<= {CRL_GOAL_S:g} s"
                    + (f", linear from R={revoked:,.0f})" if revoked < 100_000 else ")")
                    if revoked >= CRL_MIN_REVOKED
                    else f"too few revoked to tell (R < {CRL_MIN_REVOKED:,})"
                )
            cells = "".join(f"{_cell(v, metric.digits):>13}" for v in values)
            shown = f"{ratio:.2f}x" if ratio is not None else "-"
            print(f"{metric.label:<{width}}{cells}  {shown:>12}  {verdict}".rstrip())
    print(
        "\n(*) Registry.live_of, the one-query set of delivered ids: what flash --wait asks now.\n"
        "Per-device rows are medians. crl per 100k is linear from R (measured directly once R is 100k or more: at "
        "1M rows).\ndevices' peak RSS is the child's own (wait4). Wall times of commands include Python's start."
    )


def fleet_mode(args: argparse.Namespace) -> None:
    all_results: dict[int, dict[str, Results]] = {}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_postgres(durable=True)) if "postgresql" in args.backends else None
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-registry-")))
        ca_dir = work / "ca"
        ca_dir.mkdir()
        CertificateAuthority.create(Subject("Bench Fleet CA")).write_to(ca_dir, None)
        certificates = stack.enter_context(Certificates(ca_dir, args.workers))
        for rows in args.rows:
            all_results[rows] = one_size(rows, work, ca_dir, args.backends, server, certificates, args.devices)
    print_tables(all_results, args.backends, args.devices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="stations mode: devices per station (default 200)")
    parser.add_argument(
        "--rows", type=parse_rows, nargs="?", const=parse_rows(DEFAULT_ROWS), metavar="N[,N...]",
        help=f"fleet mode: registry sizes, e.g. 0,10000,100k,1M (--rows alone: {DEFAULT_ROWS})",
    )  # fmt: skip
    parser.add_argument(
        "--backends", type=parse_backends, default=list(BACKENDS), metavar="NAME[,NAME]",
        help="sqlite, postgresql or both (default both)",
    )  # fmt: skip
    parser.add_argument(
        "--devices", type=int, default=200, help="fleet mode: devices per timed stamp, flash and reissue (default 200)"
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1),
        help="fleet mode: processes signing the fill's certificates (default 2)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.rows is None:
        stations_mode(args)
    else:
        fleet_mode(args)


if __name__ == "__main__":
    main()
