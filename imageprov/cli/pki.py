"""PKI commands: the CA, the edge's server certificate, device certificates, revocation."""

from __future__ import annotations

import atexit
import getpass
import json
import os
import stat
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from imageprov.cli.ca_token import (
    ModuleOpt,
    PinFile,
    Pkcs11Opt,
    import_from_token,
    init_on_token,
    read_secret,
    refuse_file_key_options,
    refuse_token_options,
    token_pin,
)
from imageprov.cli.options import (
    PASSPHRASE_ENV,
    CaDays,
    CrlDays,
    CurveOpt,
    DeviceDays,
    Json,
    PassFile,
    Pki,
    RegistryOpt,
    ServerDays,
)
from imageprov.errors import UsageError
from imageprov.pki.ca import (
    CA_CERT,
    CA_KEY,
    CA_KEY_REFERENCE,
    CertificateAuthority,
    Curve,
    Subject,
    check_days,
    check_pair,
    load_ca,
    load_cert,
    load_key,
    write_atomic,
)
from imageprov.pki.chain import crl_problem
from imageprov.pki.registry import Reason, Registry, Status
from imageprov.pki.revocation import build_crl, crl_bytes, denylist

ca_app = typer.Typer(help="Create or import the fleet's certificate authority.", no_args_is_help=True)


def passphrase(file: Path | None, *, new: bool = False) -> bytes | None:
    """The CA key's passphrase: --passphrase-file, then $IMAGEPROV_CA_PASSPHRASE, then a prompt on a terminal."""
    if file is not None:
        text = read_secret(file, "--passphrase-file")
    elif os.environ.get(PASSPHRASE_ENV):
        text = os.environ[PASSPHRASE_ENV]
    elif sys.stdin.isatty():
        text = getpass.getpass("CA key passphrase: ")
        if new and getpass.getpass("again: ") != text:
            raise UsageError("the passphrases differ")
    else:
        return None
    if new and len(text) < 8:
        raise UsageError("the CA passphrase must be at least 8 characters")
    return text.encode()


def open_ca(pki: Path, passphrase_file: Path | None, pin_file: Path | None = None) -> CertificateAuthority:
    """Load the CA of ``pki``, asking for the passphrase only if its key is encrypted, or the PIN if on a token."""
    if pin_file is not None and pki.is_dir() and not (pki / CA_KEY_REFERENCE).exists():
        # Never read, it would be ignored: a mistake (the wrong PKI?) said now, as ca init says it.
        raise UsageError(
            f"--pin-file is for a CA key on a PKCS#11 token, and the key of {pki} is a file",
            hint=f"drop --pin-file; the key file's passphrase comes from --passphrase-file or ${PASSPHRASE_ENV}",
        )
    ca = load_ca(pki, lambda: passphrase(passphrase_file), pin=token_pin(pin_file))
    _close_with_command(ca.key)
    return ca


def _close_with_command(key: object) -> None:
    """A token session (and its login) ends when the command does, error or not."""
    close = getattr(key, "close", None)  # a TokenKey's; a key from a file has nothing to close
    if callable(close):
        atexit.register(close)


def _require_passphrase(value: bytes | None, no_passphrase: bool) -> bytes | None:
    if no_passphrase:
        return None
    if value is None:
        raise UsageError(
            "the CA key needs a passphrase",
            hint=f"set ${PASSPHRASE_ENV}, pass --passphrase-file, run on a terminal, or --no-passphrase",
        )
    return value


@ca_app.command("init")
def ca_init(
    pki: Annotated[Path, typer.Argument(help="Directory to create the PKI in.")],
    cn: Annotated[Optional[str], typer.Option("--cn", help="CA common name.")] = None,
    org: Annotated[Optional[str], typer.Option("--org")] = None,
    ou: Annotated[Optional[str], typer.Option("--ou")] = None,
    email: Annotated[Optional[str], typer.Option("--email")] = None,
    country: Annotated[Optional[str], typer.Option("--country", help="Two-letter code.")] = None,
    locality: Annotated[Optional[str], typer.Option("--locality")] = None,
    state: Annotated[Optional[str], typer.Option("--state")] = None,
    subject_file: Annotated[
        Optional[Path], typer.Option("--subject-file", help="openssl req config with a req_distinguished_name section.")
    ] = None,
    curve: CurveOpt = Curve.P256,
    days: CaDays = 3650,
    passphrase_file: PassFile = None,
    no_passphrase: Annotated[bool, typer.Option("--no-passphrase", help="Store the CA key unencrypted.")] = False,
    pkcs11_uri: Pkcs11Opt = None,
    module: ModuleOpt = None,
    pin_file: PinFile = None,
) -> None:
    """Create a CA: PKI/ca-cert.pem and PKI/ca-private.key (encrypted PKCS#8, 0600).

    With --pkcs11, the key is generated on the token (sensitive, never
    extractable) and PKI/ca-key.pkcs11.json records only where it is.

    Example: IMAGEPROV_CA_PASSPHRASE=... imageprov ca init pki --cn "Fleet CA" --org "ACME" --country NO

    Example: IMAGEPROV_PKCS11_PIN=... imageprov ca init pki --cn "Fleet CA"
    --pkcs11 'pkcs11:token=Fleet;object=fleet-ca' --module /usr/lib/softhsm/libsofthsm2.so
    """
    _refuse_existing_ca(pki)
    check_days(days)  # before a passphrase is asked for
    if subject_file is not None:
        subject = Subject.from_req_config(subject_file)
    elif cn:
        subject = Subject(cn, org, ou, email, country, locality, state)
    else:
        raise UsageError("the CA needs a name", hint="pass --cn NAME or --subject-file ca-cert.conf")
    if pkcs11_uri is not None:
        refuse_file_key_options(passphrase_file, no_passphrase)
        ca = init_on_token(pki, subject, pkcs11_uri, module, pin_file, curve, days)
        typer.echo(f"created CA {ca.cert.subject.rfc4514_string()} in {pki}, its key on the token", err=True)
        return
    refuse_token_options(module, pin_file)
    secret = _require_passphrase(passphrase(passphrase_file, new=True), no_passphrase)
    ca = CertificateAuthority.create(subject, curve=curve, days=days)
    ca.write_to(pki, secret)
    with Registry(pki, create=True):
        pass  # creates the registry now, so that a PKI never lacks one
    typer.echo(f"created CA {ca.cert.subject.rfc4514_string()} in {pki}", err=True)


def _refuse_existing_ca(pki: Path) -> None:
    if any((pki / name).exists() for name in (CA_KEY, CA_CERT, CA_KEY_REFERENCE)):
        raise UsageError(f"{pki} already holds a CA", hint="choose another directory; a CA is never overwritten")


@ca_app.command("import")
def ca_import(
    pki: Annotated[Path, typer.Argument(help="Directory to create the PKI in.")],
    cert: Annotated[Path, typer.Option("--cert", help="The CA certificate (PEM).")],
    key: Annotated[Optional[Path], typer.Option("--key", help="The CA private key (PEM; encrypted or not).")] = None,
    key_passphrase_file: Annotated[
        Optional[Path], typer.Option("--key-passphrase-file", help="Passphrase of the key being imported.")
    ] = None,
    passphrase_file: PassFile = None,
    no_passphrase: Annotated[bool, typer.Option("--no-passphrase", help="Store the CA key unencrypted.")] = False,
    pkcs11_uri: Pkcs11Opt = None,
    module: ModuleOpt = None,
    pin_file: PinFile = None,
) -> None:
    """Import a CA made elsewhere (e.g. with the manual recipe's openssl commands); the key is re-encrypted.

    With --pkcs11 instead of --key, adopt a key already on a token: it must be
    the private key of --cert, and it stays on the token.
    """
    _refuse_existing_ca(pki)
    if pkcs11_uri is not None:
        if key is not None or key_passphrase_file is not None:
            raise UsageError("--key and --pkcs11 are two places for the one CA key: give one")
        refuse_file_key_options(passphrase_file, no_passphrase)
        import_from_token(pki, load_cert(cert), pkcs11_uri, module, pin_file)
        return
    if key is None:
        raise UsageError("which key? pass --key FILE, or --pkcs11 URI for a key on a token")
    refuse_token_options(module, pin_file)
    old = read_secret(key_passphrase_file, "--key-passphrase-file").encode() if key_passphrase_file else None
    ca = check_pair(load_cert(cert), load_key(key, old), key)
    ca.check_usable()
    no_crls = crl_problem(ca.cert)
    if no_crls:
        typer.echo(f"note: nginx would refuse this CA's CRLs ({no_crls}): revoke with a denylist", err=True)
    if stat.S_IMODE(key.stat().st_mode) & 0o077:
        typer.echo(f"note: {key} is readable by others; delete it once the import is done", err=True)
    secret = _require_passphrase(passphrase(passphrase_file, new=True), no_passphrase)
    ca.write_to(pki, secret)
    with Registry(pki, create=True):
        pass  # creates the registry now, so that a PKI never lacks one
    typer.echo(f"imported CA {ca.cert.subject.rfc4514_string()} into {pki}", err=True)


def server_cert(
    pki: Pki,
    out: Annotated[Path, typer.Option("--out", help="Directory for server-cert.pem and server-private.key.")],
    host: Annotated[Optional[list[str]], typer.Option("--host", help="DNS name of the edge (repeat).")] = None,
    ip: Annotated[Optional[list[str]], typer.Option("--ip", help="IP address of the edge (repeat).")] = None,
    days: ServerDays = 730,
    curve: CurveOpt = Curve.P256,
    passphrase_file: PassFile = None,
    pin_file: PinFile = None,
    registry_url: RegistryOpt = None,
) -> None:
    """Issue the mTLS edge's server certificate, with every --host and --ip in subjectAltName."""
    check_days(days)  # before a passphrase is asked for
    ca = open_ca(pki, passphrase_file, pin_file)
    issued = ca.issue_server(host or [], ips=ip or [], days=days, curve=curve)
    with Registry(pki, registry_url) as registry:
        registry.record(issued, kind="server", delivered_to=str(out))
    try:
        cert_path, key_path = issued.write_to(out, "server-cert.pem", "server-private.key")
    except UsageError as exc:
        # Recorded already: it is in the registry (and revocable) even though it never reached the edge.
        raise UsageError(exc.message, hint=f"certificate {issued.serial_hex} is recorded, never used: "
                         f"'imageprov revoke --pki {pki} --serial {issued.serial_hex}'") from exc  # fmt: skip
    typer.echo(f"wrote {cert_path} and {key_path} (serial {issued.serial_hex})", err=True)


def device_cert(
    pki: Pki,
    device_id: Annotated[str, typer.Option("--device-id", help="The device's id: the certificate's CN.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for mender-cert.pem and mender-cert-private.pem.")],
    days: DeviceDays = 3650,
    curve: CurveOpt = Curve.P256,
    reissue: Annotated[bool, typer.Option("--reissue", help="Revoke the device's live certificate first.")] = False,
    passphrase_file: PassFile = None,
    pin_file: PinFile = None,
    json_out: Json = False,
    registry_url: RegistryOpt = None,
) -> None:
    """Issue one device's key and certificate into a directory (stamp does this for images)."""
    from imageprov.pki.devices import check_device_ids

    check_device_ids([device_id])
    ca = open_ca(pki, passphrase_file, pin_file)
    issued = ca.issue_device(device_id, days=days, curve=curve)
    with Registry(pki, registry_url) as registry:
        # Pending until the files are written, so that a failure leaves no
        # certificate live that no device will ever hold.
        registry.record(issued, status=Status.PENDING, reissue=reissue)
        try:
            cert_path, key_path = issued.write_to(out, "mender-cert.pem", "mender-cert-private.pem")
        except (OSError, UsageError) as exc:
            registry.revoke(serial=issued.serial_hex, reason=Reason.CESSATION_OF_OPERATION)
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"cannot write to {out}: {exc.strerror}") from exc
        registry.deliver(issued.serial_hex, str(out))
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "device_id": device_id,
                    "serial": issued.serial_hex,
                    "fingerprint": issued.fingerprint,
                    "cert": str(cert_path),
                    "key": str(key_path),
                }
            )
        )
    else:
        typer.echo(f"wrote {cert_path} and {key_path} (serial {issued.serial_hex})", err=True)


def revoke(
    pki: Pki,
    device_id: Annotated[Optional[str], typer.Argument(help="Device whose live certificates to revoke.")] = None,
    serial: Annotated[Optional[str], typer.Option("--serial", help="Revoke one certificate by serial (hex).")] = None,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale",
            help="Revoke every pending certificate whose station is gone (killed after writing a card or image): "
            "never confirmed delivered, refused by the edge. 'registry check' lists them.",
        ),
    ] = False,
    reason: Annotated[
        Optional[Reason],
        typer.Option("--reason", help="The CRL reason [default: unspecified; with --stale, cessation-of-operation]."),
    ] = None,
    registry_url: RegistryOpt = None,
) -> None:
    """Revoke a device's certificate; then publish a new CRL (imageprov crl) or denylist to the edge.

    Example: imageprov revoke --pki pki --stale
    """
    if stale and (device_id is not None or serial is not None):
        raise UsageError("--stale revokes what no station will deliver: name no device and no --serial with it")
    with Registry(pki, registry_url) as registry:
        if stale:
            done = registry.revoke_stale(reason or Reason.CESSATION_OF_OPERATION)
        else:
            done = registry.revoke(device_id=device_id, serial=serial, reason=reason or Reason.UNSPECIFIED)
    if stale and not done:
        typer.echo("no stale pending certificates", err=True)
    for record in done:
        said = record.reason.value if record.reason else ""
        typer.echo(f"revoked {record.device_id} serial {record.serial} ({said})", err=True)


def crl(
    pki: Pki,
    out: Annotated[Path, typer.Option("--out", help="Where to write the CRL.")],
    days: CrlDays = 30,
    der: Annotated[bool, typer.Option("--der", help="DER instead of PEM.")] = False,
    passphrase_file: PassFile = None,
    pin_file: PinFile = None,
    registry_url: RegistryOpt = None,
) -> None:
    """Write a CRL signed by the CA, listing every revoked certificate, for the edge (nginx ssl_crl)."""
    check_days(days)  # before a passphrase is asked for
    ca = open_ca(pki, passphrase_file, pin_file)
    with Registry(pki, registry_url) as registry:
        revoked = registry.revocations()
        number = registry.next_crl_number()
    write_atomic(out, crl_bytes(build_crl(ca, revoked, number=number, days=days), der=der), 0o644)
    typer.echo(f"wrote {out}: CRL number {number}, {len(revoked)} revoked", err=True)


def denylist_cmd(
    pki: Pki,
    out: Annotated[Path, typer.Option("--out", help="Where to write the denylist.")],
    registry_url: RegistryOpt = None,
) -> None:
    """Write the revoked serials in hex, one per line (Mender Gateway's MTLS_BLACKLIST_PATH)."""
    with Registry(pki, registry_url) as registry:
        revoked = registry.revocations()
    write_atomic(out, denylist(revoked), 0o644)
    typer.echo(f"wrote {out}: {len(revoked)} revoked serials", err=True)


def devices(pki: Pki, json_out: Json = False, registry_url: RegistryOpt = None) -> None:
    """List every certificate the CA issued, with its status, in the order issued.

    Rows are read and printed a page at a time, so a fleet of any size lists in
    flat memory; --json prints one JSON array with an object per line.
    """
    with Registry(pki, registry_url) as registry:
        first = True
        for r in registry.each():
            if json_out:
                sys.stdout.write(("[\n" if first else ",\n") + json.dumps(r.to_dict()))
            else:
                sys.stdout.write(
                    f"{r.device_id:<24} {r.kind:<9} {r.status.value:<8} {r.serial:<40} until {r.not_after[:10]}"
                    + (f"  revoked {r.revoked_at} ({r.reason.value if r.reason else ''})" if r.revoked_at else "")
                    + "\n"
                )
            first = False
        if json_out:
            sys.stdout.write("[]\n" if first else "\n]\n")


def register(app: typer.Typer) -> None:
    """Add the PKI commands to the main app."""
    app.add_typer(ca_app, name="ca")
    app.command("server-cert")(server_cert)
    app.command("device-cert")(device_cert)
    app.command("revoke")(revoke)
    app.command("crl")(crl)
    app.command("denylist")(denylist_cmd)
    app.command("devices")(devices)
