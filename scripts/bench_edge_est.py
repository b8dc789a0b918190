"""Enrollments per second at the edge (``scripts/bench edge --est``): real nginx (real TLS) and
``imageprov edge serve --est`` on loopback, against what enrollment replaces, the station issuing each
device's certificate itself.

A fleet of N devices, each with a bootstrap certificate recorded delivered in
the PKI's registry (as ``stamp --enroll`` leaves it) and a key and certificate
request of its own (made here ahead: on a device the TPM makes them, which is
not the edge's time), asks for its certificate at once (``simpleenroll``, each
its own TLS connection with its bootstrap certificate); then every enrolled
device renews once (``simplereenroll``, TLS with the new certificate). Each
answer is checked: a certificate for the device's own key and name, chaining
to the fleet CA, recorded active in the registry, the bootstrap one marked used.

Side by side, the station's way for the same N devices, in one process as
``stamp`` does it: a key made, a certificate issued and recorded pending, then
delivered (``CertificateAuthority.issue_device``, ``Registry.record``,
``Registry.deliver``). The ratio (edge enrollments/s over station issues/s)
says what moving issuance to the edge costs per device; the CPU each part spent
per enrollment says where it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import pkcs7  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from imageprov.edge.nginx import EST_SIMPLEENROLL, EST_SIMPLEREENROLL  # noqa: E402
from imageprov.pki.ca import load_ca  # noqa: E402
from imageprov.pki.registry import Kind, Registry, Status  # noqa: E402
from tests.conftest import PASSPHRASE, imageprov_pki  # noqa: E402
from tests.edge_support import PASSWORD, USER, edge_service, free_port, nginx  # noqa: E402


@dataclass
class Enrolling:
    """A device: its bootstrap credential's files, its key and request, and what it got."""

    name: str
    boot_cert: Path
    boot_key: Path
    key: ec.EllipticCurvePrivateKey
    csr: bytes  # base64 of the DER, as EST sends it
    statuses: list[int] = field(default_factory=list)
    cert: x509.Certificate | None = None


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (nginx's workers), as /proc says."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _fleet(pki: Path, count: int, directory: Path) -> list[Enrolling]:
    ca = load_ca(pki, PASSPHRASE.encode())
    directory.mkdir(parents=True)
    devices = []
    with Registry(pki) as registry:
        for number in range(count):
            name = f"est-{number:05d}"
            issued = ca.issue_bootstrap(name)
            registry.record(issued, kind=Kind.BOOTSTRAP.value, status=Status.ACTIVE, delivered_to="bench")
            cert, key = directory / f"{name}.pem", directory / f"{name}.key"
            cert.write_bytes(issued.cert_pem())
            key.write_bytes(issued.key_pem())
            own = ec.generate_private_key(ec.SECP256R1())
            request = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .sign(own, hashes.SHA256())
            )
            devices.append(Enrolling(name, cert, key, own,
                                     base64.b64encode(request.public_bytes(serialization.Encoding.DER))))  # fmt: skip
    return devices


async def _wave(devices: list[Enrolling], url: str, server_ca: Path, path: str, directory: Path) -> float:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    contexts = []
    for device in devices:
        context = ssl.create_default_context(cafile=str(server_ca))
        if path == EST_SIMPLEENROLL:
            context.load_cert_chain(device.boot_cert, device.boot_key)
        else:  # renewal: TLS with the certificate it got, and its own key
            assert device.cert is not None
            cert, key = directory / f"{device.name}-own.pem", directory / f"{device.name}-own.key"
            cert.write_bytes(device.cert.public_bytes(serialization.Encoding.PEM))
            key.write_bytes(device.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))  # fmt: skip
            context.load_cert_chain(cert, key)
        contexts.append(context)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()

        async def one(device: Enrolling, context: ssl.SSLContext) -> None:
            headers = {"Content-Type": "application/pkcs10"}
            async with session.post(url + path, data=device.csr, headers=headers, ssl=context,
                                    timeout=aiohttp.ClientTimeout(total=300)) as answer:  # fmt: skip
                body = await answer.read()
                device.statuses.append(answer.status)
            if answer.status == 200:
                [device.cert] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))

        await asyncio.gather(*(one(d, c) for d, c in zip(devices, contexts, strict=True)))
        return time.monotonic() - started


def _check(devices: list[Enrolling], pki: Path, what: str) -> None:
    ca_cert = x509.load_pem_x509_certificate((pki / "ca-cert.pem").read_bytes())
    for device in devices:
        if device.statuses[-1:] != [200] or device.cert is None:
            sys.exit(f"bench edge --est: {device.name} was not {what}: {device.statuses}")
        device.cert.verify_directly_issued_by(ca_cert)
        if device.cert.public_key() != device.key.public_key():
            sys.exit(f"bench edge --est: {device.name} got a certificate for another key")
    with Registry(pki) as registry:
        for device in devices:
            assert device.cert is not None
            record = registry.record_of(f"{device.cert.serial_number:x}")
            if record is None or record.status is not Status.ACTIVE:
                sys.exit(f"bench edge --est: {device.name}'s certificate is not active in the registry")


def _station(pki: Path, count: int) -> float:
    """The station's way: per device a key, a certificate recorded pending, then delivered; seconds for all."""
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        started = time.monotonic()
        for number in range(count):
            issued = ca.issue_device(f"station-{number:05d}")
            registry.record(issued, status=Status.PENDING)
            registry.deliver(issued.serial_hex, "bench")
        return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--est", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=500, help="devices that enroll at once (default 500)")
    args = parser.parse_args()
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-est-") as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "pki"
        imageprov_pki("ca", "init", pki, "--cn", "Bench EST CA")
        server = tmp / "server"
        imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
        devices = _fleet(pki, args.devices, tmp / "devices")
        passphrase, password = tmp / "passphrase", tmp / "password"
        passphrase.write_text(PASSPHRASE)
        password.write_text(PASSWORD)
        port = free_port()
        # No Mender server is asked by EST: the upstream is never reached.
        serve = ["--pki", pki, "--upstream", "http://127.0.0.1:9", "--username", USER, "--password-file", password]
        with edge_service(tmp, *serve, "--est", "--passphrase-file", passphrase) as service:
            conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream",
                                 "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}", "--accept", service["url"],
                                 "--est").stdout  # fmt: skip
            with nginx(tmp, conf, port) as nginx_proc:
                pids = {"nginx": nginx_proc.pid, "edge serve": service["proc"].pid}
                url, server_ca = f"https://localhost:{port}", pki / "ca-cert.pem"
                seconds, cpu = {}, {}
                for name, path in (("enroll", EST_SIMPLEENROLL), ("renew", EST_SIMPLEREENROLL)):
                    before = {part: _cpu(pid) for part, pid in pids.items()}
                    seconds[name] = asyncio.run(_wave(devices, url, server_ca, path, tmp / "devices"))
                    cpu[name] = {part: _cpu(pid) - before[part] for part, pid in pids.items()}
                    _check(devices, pki, f"{name}ed")
        station = _station(pki, args.devices)
    cores = os.cpu_count() or 1
    print(f"{args.devices} devices enrolling through nginx (TLS) and edge serve --est (registry, CA key in a file),"
          " on loopback")  # fmt: skip
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f} (other work on them slows every figure)")
    station_rate = args.devices / station
    for name in ("enroll", "renew"):
        rate = args.devices / seconds[name]
        spent = ", ".join(f"{part} {cpu[name][part] * 1000 / args.devices:.2f}" for part in pids)
        print(f"{name:>7}: {rate:.0f} devices/s ({seconds[name]:.2f} s for all); CPU ms per device: {spent}")
    enroll_rate = args.devices / seconds["enroll"]
    print(f"station: {station_rate:.0f} certificates/s issued, recorded and delivered in one process (stamp's way)")
    print(f"  ratio enroll at the edge / issue at the station: {enroll_rate / station_rate:.2f}")


if __name__ == "__main__":
    main()
