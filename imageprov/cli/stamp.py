"""The main job's commands: stamp images per device, and verify an image."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography import x509

from imageprov.cli.ca_token import PinFile
from imageprov.cli.options import (
    AuthKeyOpt,
    BootPart,
    ConfTargetOpt,
    CurveOpt,
    DataPart,
    EnrollOpt,
    Json,
    LineDays,
    PassFile,
    Pki,
    RegistryOpt,
    RootfsParts,
    ServerCaOpt,
    ServerUrl,
    TenantToken,
)
from imageprov.cli.output import progress_bar
from imageprov.cli.pki import open_ca
from imageprov.disk.compress import Compression, decompressed
from imageprov.disk.layout import Overrides
from imageprov.errors import ImageprovError, PkiError, UsageError
from imageprov.line.prepare import prepare_image
from imageprov.line.stamp import Batch, Engine, Failed, Stamped, StampOptions, check_outputs
from imageprov.mender.conf import AuthKey, Settings
from imageprov.mender.enroll import Enrollment
from imageprov.mender.prepare import ConfTarget
from imageprov.mender.server_ca import ServerCa
from imageprov.mender.verify import Report, verify_image
from imageprov.pki.ca import BOOTSTRAP_DAYS, Curve, load_cert
from imageprov.pki.devices import check_device_ids, read_device_ids
from imageprov.pki.registry import Registry


def check_golden(image: Path) -> None:
    """Refuse a golden image that is not there before anything is asked (a passphrase, a PIN)."""
    if not image.is_file():
        raise UsageError(f"golden image {image} does not exist" if not image.exists() else f"{image} is not a file")


def device_options(
    server_url: str | None,
    tenant_token: str | None,
    auth_key: AuthKey,
    conf_target: ConfTarget,
    days: int | None,
    curve: Curve,
    reissue: bool,
    overrides: Overrides,
    server_ca: Path | None = None,
    enroll: str | None = None,
) -> StampOptions:
    """What each device gets, from the options stamp and flash share."""
    settings = Settings(server_url=server_url, tenant_token=tenant_token, auth_key=auth_key,
                        server_ca=ServerCa.load(server_ca) if server_ca is not None else None)  # fmt: skip
    enrollment = Enrollment(enroll) if enroll is not None else None
    if enrollment is not None:
        settings = enrollment.settings(settings)
        days = BOOTSTRAP_DAYS if days is None else days
    return StampOptions(
        settings=settings,
        conf_target=conf_target,
        days=3650 if days is None else days,
        curve=curve,
        reissue=reissue,
        overrides=overrides,
        enroll=enrollment,
    )


class StampFailed(ImageprovError):
    """Some devices of a batch failed; the others were delivered."""


def stamp(
    image: Annotated[Path, typer.Argument(help="The golden disk image (never modified).")],
    pki: Pki,
    out: Annotated[Path, typer.Option("--out", help="Directory for the images: OUT/<ID>.sdimg.")],
    device_id: Annotated[Optional[list[str]], typer.Option("--device-id", help="A device serial (repeat).")] = None,
    device_ids: Annotated[
        Optional[Path], typer.Option("--device-ids", help="File of ids: one per line, or CSV with device_id.")
    ] = None,
    server_url: ServerUrl = None,
    tenant_token: TenantToken = None,
    conf_target: ConfTargetOpt = ConfTarget.AUTO,
    auth_key: AuthKeyOpt = AuthKey.CERT,
    engine: Annotated[
        Engine, typer.Option("--engine", help="debugfs (fast, in place) or mender-artifact.")
    ] = Engine.DEBUGFS,
    days: LineDays = None,
    curve: CurveOpt = Curve.P256,
    reissue: Annotated[
        bool, typer.Option("--reissue", help="Revoke a device's live certificate and issue anew.")
    ] = False,
    passphrase_file: PassFile = None,
    pin_file: PinFile = None,
    json_out: Json = False,
    bmap: Annotated[bool, typer.Option("--bmap", help="Write <ID>.bmap beside each image, for bmaptool copy.")] = False,
    compress: Annotated[
        Optional[Compression], typer.Option("--compress", help="Compress each image (gz, xz, bz2, zst).")
    ] = None,
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
    registry_url: RegistryOpt = None,
    server_ca: ServerCaOpt = None,
    enroll: EnrollOpt = None,
) -> None:
    """Write one ready, verified image per device: its own key and CA-signed certificate, and mender.conf.

    Outputs appear under their final name only when complete and verified. A
    device that fails does not stop the others. Rerunning the same command
    after an interruption delivers the devices not yet done and leaves the
    others as they are.

    Example: imageprov stamp golden.sdimg --pki pki --out images --device-ids serials.txt --server-url https://edge
    """
    ids = list(device_id or [])
    if device_ids is not None:
        ids += read_device_ids(device_ids)
    if not ids:
        raise UsageError("no device ids", hint="pass --device-id ID (repeatable) or --device-ids FILE")
    ids = check_device_ids(ids)
    check_golden(image)
    check_outputs(image, out, ids, compress)
    # Before the CA is opened: a wrong --server-ca is refused before a passphrase or PIN is asked.
    base = device_options(server_url, tenant_token, auth_key, conf_target, days, curve, reissue,
                          Overrides.parse(data_part, rootfs_parts, boot_part), server_ca, enroll)  # fmt: skip
    ca = open_ca(pki, passphrase_file, pin_file)
    ca.check_usable()
    options = replace(
        base,
        engine=engine,
        bmap=bmap,
        compress=compress,
    )  # fmt: skip
    failures: list[tuple[str, str]] = []
    batch: Batch | None = None
    try:
        with Registry(pki, registry_url) as registry, Batch(image, out, ca, registry, options) as batch:
            batch.prepare()
            for stale in batch.removed:
                typer.echo(f"note: removed {stale.name}, left by an interrupted run", err=True)
            for note in batch.notes:
                typer.echo(f"note: {note}", err=True)
            _stamp_all(batch, ids, sys.stderr.isatty() and not json_out, json_out, failures)
    except KeyboardInterrupt:
        # One line (typer would exit 130 silently): what is done, and what to do.
        done = len(batch.delivered) if batch is not None else 0
        typer.echo(f"imageprov: interrupted: delivered {done} of {len(ids)} devices; "
                   f"rerun the same command to stamp the other {len(ids) - done}", err=True)  # fmt: skip
        raise typer.Exit(130) from None
    if failures:
        if len(ids) == 1:
            raise StampFailed(f"{failures[0][0]}: {failures[0][1]}")
        names = ", ".join(d for d, _ in failures[:10]) + (", ..." if len(failures) > 10 else "")
        delivered = len(batch.delivered)
        raise StampFailed(
            f"{len(failures)} of {len(ids)} devices failed: {names}",
            hint=f"{'the other ' + str(delivered) if delivered else 'none'} were delivered; "
            "fix the cause and rerun the same command",
        )
    if not json_out:
        typer.echo(f"delivered {len(ids)} images to {out}", err=True)


def _stamp_all(batch: Batch, ids: list[str], show_bar: bool, json_out: bool, failures: list[tuple[str, str]]) -> None:
    # closing(): an interrupt here also stops the batch, before the one line about it is printed.
    with (
        typer.progressbar(length=len(ids), label="stamping", file=sys.stderr, hidden=not show_bar) as bar,
        contextlib.closing(batch.run(ids)) as outcomes,
    ):
        for outcome in outcomes:
            bar.update(1)
            if isinstance(outcome, Failed):
                failures.append((outcome.device_id, outcome.error))
                if len(ids) > 1:  # one device: the error line below says it all
                    typer.echo(f"failed {outcome.device_id}: {outcome.error}", err=True)
                if json_out:
                    typer.echo(json.dumps({"device_id": outcome.device_id, "status": "failed",
                                           "error": outcome.error}))  # fmt: skip
                continue
            for note in outcome.notes:
                typer.echo(f"{outcome.device_id}: {note}", err=True)
            if json_out:
                typer.echo(json.dumps(_stamped_dict(outcome)))
            elif not show_bar:
                typer.echo(f"{outcome.status} {outcome.device_id}: {outcome.image} (serial {outcome.serial})",
                           err=True)  # fmt: skip


def _stamped_dict(done: Stamped) -> dict[str, object]:
    return {
        "device_id": done.device_id,
        "status": done.status,
        "image": str(done.image),
        "serial": done.serial,
        "fingerprint": done.fingerprint,
        "seconds": round(done.seconds, 4),
    }


def verify(
    image: Annotated[Path, typer.Argument(help="A stamped disk image, or a flashed card (a block device).")],
    ca: Annotated[Path, typer.Option("--ca", help="The CA certificate (PKI/ca-cert.pem).")],
    device_id: Annotated[Optional[str], typer.Option("--device-id", help="The id the certificate must name.")] = None,
    crl: Annotated[
        Optional[Path], typer.Option("--crl", help="A CRL (PEM or DER): the device must not be on it.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    server_url: Annotated[
        Optional[str], typer.Option("--server-url", help="The ServerURL the client must use (main conf over fallback).")
    ] = None,
    tenant_token: Annotated[Optional[str], typer.Option("--tenant-token", help="The TenantToken it must use.")] = None,
    auth_key: AuthKeyOpt = AuthKey.CERT,
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too (a CRL past its nextUpdate).")] = False,
    server_ca: Annotated[
        Optional[Path],
        typer.Option(
            "--server-ca", metavar="FILE", help="PEM certificate(s) that the file ServerCertificate names must hold."
        ),
    ] = None,
) -> None:
    """Prove an image right before it is flashed; exit 0 only if every check holds.

    Checks the partition table; the key (0600 root) and certificate (0644 root)
    on the data partition; that the certificate chains to the CA, is valid, is
    not revoked, names the device and allows clientAuth; that the key matches
    it; that the configuration the client uses (each rootfs's
    /etc/mender/mender.conf over the data partition's /data/mender/mender.conf,
    field by field) points HttpsClient at exactly those files, warning when
    only a rootfs holds it, and Security.AuthPrivateKey at the key (unless
    --auth-key device); that no journal is left unreplayed; and e2fsck -fn.
    With --crl, a CRL past its nextUpdate is a warning (a failure with
    --strict). Where ServerCertificate is set, the file it names must be in the
    image and hold PEM certificates (with --server-ca, those of FILE). Takes a
    bare rootfs.ext4 or .dataimg too, and checks what it holds,
    and a compressed image (.gz, .xz, .bz2, .zst), such as stamp --compress writes.

    An image made with --enroll (it holds /data/imageprov/enroll/enroll.conf) is
    checked as one that enrolls at first boot: no key or certificate at the
    client's paths; the bootstrap key (0600) and certificate, which chains to the
    CA, names the device and has the bootstrap profile; fleet-ca.pem is the CA;
    enroll.conf names the device and an https URL; and the client loads the
    token's key through the pkcs11 engine, for TLS and for its auth requests.
    """
    if not image.exists():
        raise UsageError(f"{image} does not exist")
    ca_cert, revoked = load_cert(ca), _load_crl(crl) if crl else None
    expected_server_ca = ServerCa.load(server_ca) if server_ca is not None else None
    with decompressed(image, meter=progress_bar) as plain:
        report = verify_image(plain, ca_cert, device_id=device_id, crl=revoked,
                              overrides=Overrides.parse(data_part, rootfs_parts, boot_part),
                              settings=Settings(server_url=server_url, tenant_token=tenant_token,
                                                server_ca=expected_server_ca),
                              strict=strict, auth_key=auth_key)  # fmt: skip
    report = _named(report, image)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for check in report.checks:
            status = "FAIL" if not check.ok else "warn" if check.warning else "ok  "
            typer.echo(f"{status}  {check.name}" + (f"  ({check.detail})" if check.detail else ""))
    if not report.ok:
        names = ", ".join(c.name for c in report.failures)
        raise StampFailed(f"{image}: {len(report.failures)} checks failed: {names}")


def _named(report: Report, image: Path) -> Report:
    """The report of a decompressed copy, as the user named the image."""
    if report.image == image:
        return report
    checks = tuple(replace(c, detail=c.detail.replace(str(report.image), str(image))) for c in report.checks)
    return replace(report, image=image, checks=checks)


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a CRL") from exc


def prepare(
    image: Annotated[Path, typer.Argument(help="The build's own image, changed in place.")],
    server_url: ServerUrl = None,
    tenant_token: TenantToken = None,
    conf_target: ConfTargetOpt = ConfTarget.AUTO,
    auth_key: AuthKeyOpt = AuthKey.CERT,
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
    server_ca: ServerCaOpt = None,
) -> None:
    """Do, once and in place, the part of stamping that is the same for every device.

    Merges the HttpsClient and Security blocks (and --server-url/--tenant-token) into
    mender.conf and creates /data/mender. Idempotent: a prepared image is not
    written to. Atomic: a failure leaves the image as it was. stamp on a
    prepared image touches only the data partition. Takes a bare rootfs.ext4
    (with --conf-target rootfs) or .dataimg too, and a compressed image (.gz,
    .xz, .bz2, .zst: written back in its own compression, beside itself). In a
    Yocto build, the meta-imageprov layer (yocto/meta-imageprov) does this in
    the rootfs instead.
    """
    if not image.is_file():
        raise UsageError(f"{image} does not exist" if not image.exists() else f"{image} is not a file")
    settings = Settings(server_url=server_url, tenant_token=tenant_token, auth_key=auth_key,
                        server_ca=ServerCa.load(server_ca) if server_ca is not None else None)  # fmt: skip
    overrides = Overrides.parse(data_part, rootfs_parts, boot_part)
    done = prepare_image(image, settings, conf_target, overrides, meter=progress_bar)
    for note in done.notes:
        typer.echo(f"note: {note}", err=True)
    if done.changed and image.is_symlink():
        typer.echo(f"note: {image} is a link: edited its target {image.resolve()}", err=True)
    typer.echo(f"prepared {image}" if done.changed else f"{image} was already prepared: not changed", err=True)


def register(app: typer.Typer) -> None:
    app.command()(prepare)
    app.command()(stamp)
    app.command()(verify)
