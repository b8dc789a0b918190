"""Per-device cost of imageprov stamp versus the manual recipe, on the same golden images.

For each image size: build a golden image with real tools (a quarter of each
rootfs filled with random data), then time
  - ``cp --sparse=always`` of the image (the floor: a per-device image must be copied);
  - the manual recipe: openssl key, CSR and signature, then ``mender-artifact install``
    key and certificate, ``mender-artifact cp`` mender.conf out, edit, and back,
    on a ``cp --sparse=always`` copy of the golden image;
  - ``imageprov stamp`` (debugfs engine): the marginal cost per device in a batch,
    from two batch sizes, and the per-device time it reports;
  - ``imageprov stamp --engine mender-artifact``, one device;
and print the figures, the ratios, and the blocks each output allocates.
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

ROOT = Path(__file__).resolve().parent.parent
IMAGEPROV = [sys.executable, "-m", "imageprov"]


def timed(argv: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def spec_for(size_mib: int) -> GoldenSpec:
    """A Mender-like layout of about ``size_mib``: boot 16, two rootfs, data, 8 MiB alignment."""
    data = max(32, size_mib // 10)
    rootfs = (size_mib - 16 - data - 16) // 2
    return GoldenSpec(scheme=Scheme.MBR, rootfs_mib=rootfs, data_mib=data, payload_mib=rootfs // 4)


def manual_recipe(golden: Path, work: Path, device: str, ca: Path) -> tuple[float, float]:
    """The recipe for one device; (seconds for the whole device, of which the copy)."""
    image = work / f"{device}.sdimg"
    start = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", golden, image], check=True)
    copied = time.perf_counter() - start
    key, csr, cert, conf = (work / f"{device}.{ext}" for ext in ("key", "csr", "pem", "conf"))
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    run("openssl", "ecparam", "-genkey", "-name", "P-256", "-noout", "-out", key)
    run("openssl", "req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={device}")
    run(
        "openssl",
        "x509",
        "-req",
        "-CA",
        ca / "ca-cert.pem",
        "-CAkey",
        ca / "ca-private.key",
        "-CAcreateserial",
        "-in",
        csr,
        "-out",
        cert,
        "-days",
        "3650",
    )
    run("mender-artifact", "install", "-m", "0600", key, f"{image}:/data/mender/mender-cert-private.pem")
    run("mender-artifact", "install", "-m", "0644", cert, f"{image}:/data/mender/mender-cert.pem")
    run("mender-artifact", "cp", f"{image}:/etc/mender/mender.conf", conf)
    settings = json.loads(conf.read_text())
    settings["HttpsClient"] = {
        "Certificate": "/data/mender/mender-cert.pem",
        "Key": "/data/mender/mender-cert-private.pem",
    }
    conf.write_text(json.dumps(settings, indent=2))
    run("mender-artifact", "cp", conf, f"{image}:/etc/mender/mender.conf")
    return time.perf_counter() - start, copied


def stamp_batch(
    golden: Path, pki: Path, out: Path, ids: list[str], *extra: str
) -> tuple[float, list[dict[str, object]]]:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            *IMAGEPROV,
            "stamp",
            str(golden),
            "--pki",
            str(pki),
            "--out",
            str(out),
            "--json",
            *(a for i in ids for a in ("--device-id", i)),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, [json.loads(line) for line in proc.stdout.splitlines()]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sync() -> None:
    subprocess.run(["sync"], check=True)


def cp_batch(golden: Path, out: Path, count: int) -> tuple[float, float]:
    """``cp --sparse=always`` of the golden image to ``count`` new files: (seconds, seconds until synced)."""
    out.mkdir()
    sync()
    start = time.perf_counter()
    for i in range(count):
        subprocess.run(["cp", "--sparse=always", golden, out / f"cp-{i}.sdimg"], check=True)
    done = time.perf_counter() - start
    sync()
    return done, time.perf_counter() - start


def stamp_timed(golden: Path, pki: Path, out: Path, ids: list[str]) -> tuple[float, float, list[dict[str, object]]]:
    sync()
    start = time.perf_counter()
    _, results = stamp_batch(golden, pki, out, ids)
    done = time.perf_counter() - start
    sync()
    return done, time.perf_counter() - start, results


def bench(size_mib: int, work: Path, batch: int, recipe_devices: int, rounds: int) -> dict[str, float]:
    work.mkdir(parents=True)
    golden = build_golden(work / "golden.sdimg", spec_for(size_mib))
    pki = work / "pki"
    subprocess.run(
        [*IMAGEPROV, "ca", "init", str(pki), "--cn", "Bench CA", "--no-passphrase"], check=True, capture_output=True
    )
    single = []
    for i in range(3):
        sync()
        single.append(timed(["cp", "--sparse=always", str(golden), str(work / f"cp{i}.sdimg")]))
        (work / f"cp{i}.sdimg").unlink()
    # cp and imageprov are timed alike, in alternating rounds (this machine's
    # disk slows down for a while after a burst of writes): a batch of new
    # files from a synced start; "durable" adds the sync that puts them on
    # disk (imageprov fsyncs each image before publishing it; cp does not).
    per_round: list[dict[str, float]] = []
    for n in range(rounds):
        one_t, one_durable, _ = stamp_timed(golden, pki, work / f"small-{n}", [f"warm-{n}"])
        ids = [f"dev-{n}-{i:04d}" for i in range(batch + 1)]
        big_t, big_durable, results = stamp_timed(golden, pki, work / f"big-{n}", ids)
        cp_t, cp_durable = cp_batch(golden, work / f"cp-{n}", batch)
        per_round.append(
            {
                "cp_batch_s": cp_t / batch,
                "cp_batch_durable_s": cp_durable / batch,
                "imageprov_marginal_s": (big_t - one_t) / batch,
                "imageprov_marginal_durable_s": (big_durable - one_durable) / batch,
                "imageprov_reported_s": statistics.mean(float(r["seconds"]) for r in results),
            }
        )
        allocated_out = allocated(work / f"big-{n}" / f"{ids[0]}.sdimg")
        for folder in (f"small-{n}", f"big-{n}", f"cp-{n}"):
            shutil.rmtree(work / folder)
    recipe_work = work / "recipe"
    recipe_work.mkdir()
    recipe = [manual_recipe(golden, recipe_work, f"manual-{i}", pki) for i in range(recipe_devices)]
    ma_t, _ = stamp_batch(golden, pki, work / "out-ma", ["ma-0"], "--engine", "mender-artifact")
    medians = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    return {
        "size_mib": size_mib,
        "golden_allocated_mib": allocated(golden) / 2**20,
        "cp_single_s": statistics.median(single),
        **medians,
        "recipe_s": statistics.mean(t for t, _ in recipe),
        "recipe_copy_s": statistics.mean(c for _, c in recipe),
        "engine_mender_artifact_s": ma_t,
        "imageprov_output_allocated_mib": allocated_out / 2**20,
        "recipe_output_allocated_mib": allocated(recipe_work / "manual-0.sdimg") / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="image sizes in MiB, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="devices in the timed imageprov batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of imageprov and cp (medians)")
    parser.add_argument("--recipe-devices", type=int, default=1, help="devices through the manual recipe")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="imageprov-bench-", dir=args.workdir))
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(bench(size, base / f"{size}", args.batch, args.recipe_devices, args.rounds))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        ms = {k: v * 1000 for k, v in r.items() if k.endswith("_s")}
        target = 1.5 * ms["cp_batch_durable_s"] + 30
        marginal = ms["imageprov_marginal_durable_s"]
        print(
            f"== {r['size_mib']} MiB image ({r['golden_allocated_mib']:.0f} MiB allocated), batch of {args.batch},"
            f" medians of {args.rounds} rounds"
        )
        print(f"cp --sparse=always, one image, alone       {ms['cp_single_s']:8.0f} ms")
        print(
            f"cp --sparse=always, per image in a batch   {ms['cp_batch_s']:8.0f} ms"
            f"   ({ms['cp_batch_durable_s']:.0f} ms with the final sync)"
        )
        print(
            f"imageprov stamp, marginal per device       {ms['imageprov_marginal_s']:8.0f} ms"
            f"   ({marginal:.0f} ms with the final sync; {ms['imageprov_reported_s']:.0f} ms reported per device)"
        )
        print(
            f"  target 1.5 x cp + 30 ms (durable)        {target:8.0f} ms"
            f"   -> {'met' if marginal <= target else 'MISSED'} ({marginal / ms['cp_batch_durable_s']:.2f} x cp)"
        )
        print(
            f"manual recipe (mender-artifact), 1 device  {ms['recipe_s']:8.0f} ms"
            f"   (of which cp {ms['recipe_copy_s']:.0f} ms)"
        )
        print(f"imageprov --engine mender-artifact         {ms['engine_mender_artifact_s']:8.0f} ms")
        print(f"speed-up over the manual recipe            {ms['recipe_s'] / marginal:8.0f} x   (target 200 x)")
        print(
            f"allocated: golden {r['golden_allocated_mib']:.0f} MiB, imageprov output"
            f" {r['imageprov_output_allocated_mib']:.0f} MiB, recipe output {r['recipe_output_allocated_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
