"""What keeping the CA key on a PKCS#11 token costs: a file key against a SoftHSM2 key.

  - device certificates issued per second, in-process (key generation, building,
    signing), with each CA key, and signatures per second alone;
  - ``imageprov stamp``'s marginal cost per device in a batch (from a batch of
    two and a batch of N+2, in alternating rounds, medians), with each CA key,
    and the time stamp reports per device.
The issue's target: the marginal cost per device rises by at most 10 ms.
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

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.disk.golden import GoldenSpec, Scheme, build_golden
from imageprov.pki.ca import CertificateAuthority, load_ca

IMAGEPROV = [sys.executable, "-m", "imageprov"]
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "bench-1234"


def softhsm(work: Path) -> Path:
    """A token labelled 'bench' in ``work``; SOFTHSM2_CONF and the PIN set for this process and its children."""
    tokens = work / "tokens"
    tokens.mkdir(parents=True)
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["IMAGEPROV_PKCS11_PIN"] = PIN
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", "so-" + PIN,
                    "--pin", PIN], check=True, capture_output=True)  # fmt: skip
    return next(Path(m) for m in MODULES if Path(m).is_file())


def make_pkis(work: Path, module: Path) -> dict[str, Path]:
    file_pki, token_pki = work / "pki-file", work / "pki-token"
    subprocess.run([*IMAGEPROV, "ca", "init", str(file_pki), "--cn", "Bench CA", "--no-passphrase"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([*IMAGEPROV, "ca", "init", str(token_pki), "--cn", "Bench CA", "--pkcs11",
                    "pkcs11:token=bench;object=bench-ca", "--module", str(module)], check=True,
                   capture_output=True)  # fmt: skip
    return {"file": file_pki, "token": token_pki}


def issue_rate(ca: CertificateAuthority, seconds: float) -> tuple[float, float]:
    """(device certificates per second, bare signatures per second) for ``seconds`` each."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ca.issue_device(f"rate-{count}")
        count += 1
    issued = count / (time.perf_counter() - start)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ca.key.sign(b"%d" % count, ec.ECDSA(hashes.SHA256()))
        count += 1
    return issued, count / (time.perf_counter() - start)


def stamp(golden: Path, pki: Path, out: Path, ids: list[str]) -> tuple[float, list[float]]:
    """(wall seconds, the seconds stamp reports for each device) for one batch."""
    argv = [*IMAGEPROV, "stamp", str(golden), "--pki", str(pki), "--out", str(out), "--json"]
    start = time.perf_counter()
    proc = subprocess.run([*argv, *(a for i in ids for a in ("--device-id", i))], check=True, capture_output=True)
    took = time.perf_counter() - start
    shutil.rmtree(out)
    return took, [float(json.loads(line)["seconds"]) for line in proc.stdout.splitlines()]


def marginal(golden: Path, pki: Path, work: Path, batch: int, tag: str) -> tuple[float, float]:
    """(seconds per device beyond a batch of two, in a batch of ``batch`` + 2; median reported seconds per device)."""
    small, _ = stamp(golden, pki, work / f"{tag}-small", [f"{tag}-warm-{i}" for i in range(2)])
    big, reported = stamp(golden, pki, work / f"{tag}-big", [f"{tag}-{i:04d}" for i in range(batch + 2)])
    return (big - small) / batch, statistics.median(reported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="devices in the timed stamp batch (plus two)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of file and token key (medians)")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each in-process rate measurement")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imageprov-bench-hsm-"))
    try:
        module = softhsm(work / "hsm")
        pkis = make_pkis(work, module)
        rates = {}
        for kind, pki in pkis.items():
            ca = load_ca(pki, None, pin=lambda _: PIN)
            rates[kind] = issue_rate(ca, args.seconds)
        golden = build_golden(work / "golden.sdimg", GoldenSpec(scheme=Scheme.MBR))
        rounds: dict[str, list[tuple[float, float]]] = {"file": [], "token": []}
        for n in range(args.rounds):
            # Alternating which goes first: this machine's load drifts within a round.
            for kind in ("file", "token") if n % 2 == 0 else ("token", "file"):
                rounds[kind].append(marginal(golden, pkis[kind], work, args.batch, f"{kind}{n}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ms = {kind: statistics.median(m for m, _ in values) * 1000 for kind, values in rounds.items()}
    reported = {kind: statistics.median(r for _, r in values) * 1000 for kind, values in rounds.items()}
    figures = {
        "certs_per_s": {k: r[0] for k, r in rates.items()},
        "signatures_per_s": {k: r[1] for k, r in rates.items()},
        "stamp_marginal_ms": ms,
        # Paired by round, so that a round slowed by other load does not count as the token's.
        "stamp_marginal_rise_ms": statistics.median(
            (token[0] - file[0]) * 1000 for file, token in zip(rounds["file"], rounds["token"], strict=True)
        ),
        "stamp_reported_per_device_ms": reported,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    certs, sigs = figures["certs_per_s"], figures["signatures_per_s"]
    print(f"== CA key in a file vs on SoftHSM2; stamp batches of 2 and {args.batch}+2, medians of {args.rounds} rounds")
    print(f"device certificates issued per second   file {certs['file']:8.0f}   token {certs['token']:8.0f}"
          f"   ({certs['token'] / certs['file']:.2f} x)")  # fmt: skip
    print(f"signatures per second                   file {sigs['file']:8.0f}   token {sigs['token']:8.0f}"
          f"   ({sigs['token'] / sigs['file']:.2f} x)")  # fmt: skip
    extra = 1000 / certs["token"] - 1000 / certs["file"]
    print(f"  extra time per certificate            {extra:8.2f} ms")
    print(f"stamp, marginal per device              file {ms['file']:8.1f}   token {ms['token']:8.1f} ms")
    print(f"stamp, reported per device              file {reported['file']:8.1f}   token {reported['token']:8.1f} ms")
    rise = figures["stamp_marginal_rise_ms"]
    print(f"  rise with the token key (paired)      {rise:8.1f} ms   (target at most 10 ms: "
          f"{'met' if rise <= 10 else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    main()
