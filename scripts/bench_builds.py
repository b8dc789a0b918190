"""Stamping a golden image laid out as a real meta-mender build, against imageprov's own demo layout.

Two golden images of the same size: the demo layout (vfat boot, rootfs B a copy of
A, one mender.conf) stamped with ``--conf-target rootfs``, and a real build's
layout (ext4 boot, rootfs B an empty ext4, split configuration) stamped with the
default ``--conf-target auto``. For each: the marginal cost per device in a
batch (from two batch sizes), and the blocks the golden image and one output
allocate. Prints the figures and the ratio real/demo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imageprov.disk.golden import GoldenSpec, RootfsB, Scheme, build_golden

IMAGEPROV = [sys.executable, "-m", "imageprov"]


def batch(golden: Path, pki: Path, out: Path, count: int, *extra: str) -> float:
    ids = [a for i in range(count) for a in ("--device-id", f"{out.name}-{i:04d}")]
    start = time.perf_counter()
    subprocess.run([*IMAGEPROV, "stamp", str(golden), "--pki", str(pki), "--out", str(out), "--json", *ids, *extra],
                   check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def marginal(golden: Path, pki: Path, work: Path, small: int, large: int, *extra: str) -> float:
    """Seconds per device, from the difference between two batch sizes (start-up cost cancels out)."""
    t_small = batch(golden, pki, work / f"{golden.stem}-s", small, *extra)
    t_large = batch(golden, pki, work / f"{golden.stem}-l", large, *extra)
    return (t_large - t_small) / (large - small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rootfs-mib", type=int, default=128)
    parser.add_argument("--small", type=int, default=2)
    parser.add_argument("--large", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imageprov-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        pki = work / "pki"
        subprocess.run([*IMAGEPROV, "ca", "init", str(pki), "--cn", "Bench CA", "--no-passphrase"],
                       check=True, capture_output=True)  # fmt: skip
        common = {"scheme": Scheme.MBR, "rootfs_mib": args.rootfs_mib, "payload_mib": args.rootfs_mib // 4}
        demo = build_golden(work / "demo.sdimg", GoldenSpec(**common))  # type: ignore[arg-type]
        real = build_golden(work / "real.sdimg", GoldenSpec(**common, boot_fs="ext4",  # type: ignore[arg-type]
                                                             rootfs_b=RootfsB.EMPTY_EXT4, split_conf=True))  # fmt: skip
        results = {
            "demo layout, --conf-target rootfs": marginal(
                demo, pki, work, args.small, args.large, "--conf-target", "rootfs"
            ),
            "real layout, --conf-target auto": marginal(real, pki, work, args.small, args.large),
        }
        for name, seconds in results.items():
            print(f"{name:38s} {seconds * 1000:8.1f} ms per device")
        demo_s, real_s = results.values()
        print(f"ratio real/demo                        {real_s / demo_s:8.2f}")
        for golden in (demo, real):
            out = next((work / f"{golden.stem}-l").glob("*.sdimg"))
            print(f"{golden.name}: golden allocates {golden.stat().st_blocks * 512 >> 20} MiB, "
                  f"one output {out.stat().st_blocks * 512 >> 20} MiB")  # fmt: skip
        print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
