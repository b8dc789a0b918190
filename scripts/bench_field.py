"""What the field checks cost a batch: the golden image checked once, an unreplayed journal replayed once.

For a golden image with a data partition of ``--data-mib``, time (alternating
rounds, median) ``imageprov stamp`` of ``--devices`` devices
  - on a clean golden image (the golden check, ``e2fsck -fn`` of the data
    partition, is part of every batch);
  - on the same golden image whose data partition has ``needs_recovery`` and a
    committed transaction (a ``dd`` of a running device): stamp replays it once,
    on its private copy;
and print both, their ratio, and the time of one ``e2fsck -fn`` of the data partition alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imageprov.disk.golden import GoldenSpec, Scheme, build_golden
from imageprov.disk.layout import read_layout

IMAGEPROV = [sys.executable, "-m", "imageprov"]
PASSPHRASE = "bench passphrase 1"


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "IMAGEPROV_CA_PASSPHRASE": PASSPHRASE, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"}
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, env=env, **kwargs)  # type: ignore[call-overload]


def unreplay(image: Path) -> None:
    """Leave the data partition's journal with a committed transaction and needs_recovery set."""
    layout = read_layout(image)
    fs = f"{image}?offset={layout.data_partition.partition.offset}"
    block = int(run("debugfs", "-R", "bmap /mender 0", fs).stdout.split()[0])
    size = next(int(ln.split()[-1]) for ln in run("dumpe2fs", "-h", fs).stdout.decode().splitlines()
                if ln.startswith("Block size:"))  # fmt: skip
    saved = image.with_suffix(".block")
    with open(image, "rb") as handle:
        handle.seek(layout.data_partition.partition.offset + block * size)
        saved.write_bytes(handle.read(size))
    run("debugfs", "-w", "-f", "-", fs, input=f"jo\njw -b {block} {saved}\njc\n".encode())


def stamp_seconds(golden: Path, pki: Path, out: Path, devices: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    ids = [a for i in range(devices) for a in ("--device-id", f"b-{time.monotonic_ns()}-{i}")]
    start = time.perf_counter()
    run(*IMAGEPROV, "stamp", golden, "--pki", pki, "--out", out, *ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-mib", type=int, default=256)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-field-", dir=Path.cwd()) as tmp:
        work = Path(tmp)
        clean = build_golden(work / "clean.sdimg", GoldenSpec(Scheme.MBR, rootfs_mib=64, data_mib=args.data_mib))
        dirty = work / "dirty.sdimg"
        run("cp", "--sparse=always", clean, dirty)
        unreplay(dirty)
        run(*IMAGEPROV, "ca", "init", work / "pki", "--cn", "bench CA")
        offset = read_layout(clean).data_partition.partition.offset
        fsck = []
        times: dict[str, list[float]] = {"clean": [], "unreplayed": []}
        for _ in range(args.rounds):
            for name, golden in (("clean", clean), ("unreplayed", dirty)):
                times[name].append(stamp_seconds(golden, work / "pki", work / "out", args.devices))
            start = time.perf_counter()
            run("e2fsck", "-fn", f"{clean}?offset={offset}")
            fsck.append(time.perf_counter() - start)
        result = {
            "data_mib": args.data_mib,
            "devices": args.devices,
            "stamp_clean_s": round(statistics.median(times["clean"]), 3),
            "stamp_unreplayed_s": round(statistics.median(times["unreplayed"]), 3),
            "e2fsck_data_once_s": round(statistics.median(fsck), 3),
        }
        result["unreplayed_over_clean"] = round(result["stamp_unreplayed_s"] / result["stamp_clean_s"], 2)
        result["golden_check_share_of_clean_batch"] = round(result["e2fsck_data_once_s"] / result["stamp_clean_s"], 3)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
