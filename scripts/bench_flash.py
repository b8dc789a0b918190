"""Cards per device: imageprov flash against the old way (stamp, then bmaptool copy per device), on loop devices.

For each number of targets (1 and 4 by default), the same golden image goes
onto the same loop devices
  (a) the old way: ``imageprov stamp --bmap`` for the batch, then
      ``bmaptool copy`` of each image to its card, one card after the other
      (bmaptool writes one target per run);
  (b) ``imageprov flash`` with every card at once;
in alternating rounds, each from a synced start and until the cards are
flushed. Printed: seconds per device and the ratio (goal: flash at most 0.6x
the old way), bytes written per card against the image's mapped bytes (the
bmap's; goal: equal within 1%), bytes read from the golden image per batch
(goal: once, whatever the number of cards), and the largest the scratch
directory grew (goal: only the small per-device scratch) against the old
way's image files. Needs root (loop devices).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from imageprov.disk.golden import GoldenSpec, Scheme, build_golden

IMAGEPROV = [sys.executable, "-m", "imageprov"]
ENV = {**os.environ, "PATH": f"/usr/sbin:/sbin:{os.environ['PATH']}"}
# The configuration on the data partition (issue 16's default): per batch, only
# the data partition changes, so the scratch is the data partition only. With
# --conf-target rootfs, the batch's scratch also holds both rootfs partitions.
CONF_TARGET = "data"


def spec_for(size_mib: int) -> GoldenSpec:
    """A Mender-like layout of about ``size_mib``, a quarter of each rootfs random data."""
    data = max(32, size_mib // 10)
    rootfs = (size_mib - 16 - data - 16) // 2
    return GoldenSpec(scheme=Scheme.MBR, rootfs_mib=rootfs, data_mib=data, payload_mib=rootfs // 4)


def sh(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, env=ENV).stdout


def allocated(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class Peak(threading.Thread):
    """The most a directory held at once, polled."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory, self.peak, self.running = directory, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, allocated(self.directory))
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, allocated(self.directory))


def old_way(golden: Path, pki: Path, work: Path, cards: list[Path], tag: str) -> dict[str, float]:
    out = work / f"images-{tag}"
    ids = [f"old-{tag}-{i}" for i in range(len(cards))]
    sh("sync")
    start = time.perf_counter()
    stamp = ["stamp", golden, "--pki", pki, "--out", out, "--bmap", "--conf-target", CONF_TARGET]
    sh(*IMAGEPROV, *stamp, *(a for i in ids for a in ("--device-id", i)))
    for device_id, card in zip(ids, cards):
        sh("bmaptool", "-q", "copy", "--bmap", out / f"{device_id}.bmap", out / f"{device_id}.sdimg", card)
    seconds = time.perf_counter() - start
    bmap = (out / f"{ids[0]}.bmap").read_text()
    mapped = int(re.search(r"<MappedBlocksCount>\s*(\d+)", bmap).group(1)) * 4096  # type: ignore[union-attr]
    files = allocated(out)
    shutil.rmtree(out)
    return {"seconds": seconds, "mapped": mapped, "files": files}


def new_way(golden: Path, pki: Path, work: Path, cards: list[Path], tag: str) -> dict[str, float]:
    scratch = work / f"scratch-{tag}"
    scratch.mkdir()
    ids = [f"new-{tag}-{i}" for i in range(len(cards))]
    peak = Peak(scratch)
    peak.start()
    sh("sync")
    start = time.perf_counter()
    proc = subprocess.run(
        [*IMAGEPROV, "flash", str(golden), "--pki", str(pki), "--scratch", str(scratch), "--log", str(work / "log"),
         "--json", "--conf-target", CONF_TARGET, *(a for c, i in zip(cards, ids) for a in ("--target", f"{c}={i}"))],
        check=True, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    grown = peak.stop()
    written = [int(json.loads(line)["bytes_written"]) for line in proc.stdout.splitlines()]
    read = int(re.search(r"\((\d+) bytes\) of the golden image", proc.stderr).group(1))  # type: ignore[union-attr]
    shutil.rmtree(scratch)
    return {"seconds": seconds, "written": max(written), "written_min": min(written), "golden_read": read,
            "scratch_peak": grown}  # fmt: skip


def bench(size_mib: int, counts: list[int], rounds: int, work: Path) -> list[dict[str, float]]:
    golden = build_golden(work / "golden.sdimg", spec_for(size_mib))
    size = golden.stat().st_size
    pki = work / "pki"
    sh(*IMAGEPROV, "ca", "init", pki, "--cn", "Bench CA", "--no-passphrase")
    rows = []
    for count in counts:
        files = [work / f"card-{count}-{i}.img" for i in range(count)]
        cards = []
        try:
            for path in files:
                with open(path, "wb") as handle:
                    handle.truncate(size)
                cards.append(Path(sh("losetup", "-f", "--show", path).strip()))
            old, new = [], []
            for n in range(rounds):
                old.append(old_way(golden, pki, work, cards, f"{count}-{n}"))
                new.append(new_way(golden, pki, work, cards, f"{count}-{n}"))
        finally:
            for card in cards:
                subprocess.run(["losetup", "-d", str(card)], check=False)
            for path in files:
                path.unlink(missing_ok=True)
        rows.append(
            {
                "size_mib": size_mib,
                "cards": count,
                "old_s_per_device": statistics.median(r["seconds"] for r in old) / count,
                "flash_s_per_device": statistics.median(r["seconds"] for r in new) / count,
                "mapped_bytes": old[0]["mapped"],
                "flash_bytes_written": new[0]["written"],
                "flash_bytes_written_min": new[0]["written_min"],
                "golden_bytes_read": new[0]["golden_read"],
                "golden_allocated": os.stat(golden).st_blocks * 512,
                "flash_scratch_peak": max(r["scratch_peak"] for r in new),
                "old_image_files": old[0]["files"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="golden image size in MiB")
    parser.add_argument("--cards", default="1,4", help="numbers of cards, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (medians)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench flash: needs root for loop devices")
    base = Path(tempfile.mkdtemp(prefix="imageprov-bench-flash-", dir=args.workdir))
    try:
        rows = bench(args.size, [int(c) for c in args.cards.split(",")], args.rounds, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    mib = 1 << 20
    for r in rows:
        ratio = r["flash_s_per_device"] / r["old_s_per_device"]
        written = r["flash_bytes_written"] / r["mapped_bytes"]
        print(f"== {r['size_mib']} MiB golden image, {r['cards']} card(s), medians of {args.rounds} rounds")
        print(f"old way (stamp + bmaptool copy), per device  {r['old_s_per_device']:7.2f} s")
        print(f"imageprov flash, per device                  {r['flash_s_per_device']:7.2f} s"
              f"   -> {ratio:.2f} x the old way (goal <= 0.6: {'met' if ratio <= 0.6 else 'MISSED'})")  # fmt: skip
        print(f"bytes written per card                       {r['flash_bytes_written'] / mib:7.1f} MiB"
              f" (mapped {r['mapped_bytes'] / mib:.1f} MiB: {written:.3f} x;"
              f" goal within 1%: {'met' if abs(written - 1) <= 0.01 else 'MISSED'})")  # fmt: skip
        print(f"golden image read per batch                  {r['golden_bytes_read'] / mib:7.1f} MiB"
              f" ({r['golden_bytes_read'] / r['mapped_bytes']:.2f} x mapped, {r['cards']} card(s))")  # fmt: skip
        print(f"files written: flash scratch at most         {r['flash_scratch_peak'] / mib:7.1f} MiB"
              f" (old way: {r['old_image_files'] / mib:.1f} MiB of image files)")  # fmt: skip


if __name__ == "__main__":
    main()
