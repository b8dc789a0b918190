"""The CA key on a PKCS#11 token, as the ca commands take it: the options, the PIN, init and import on a token.

Also the one reader of secrets from files (passphrases and PINs), so that a
missing, unreadable or empty file is one clear line wherever it is given.
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.errors import UsageError
from imageprov.pki.ca import CertificateAuthority, Curve, Subject, check_days, check_pair
from imageprov.pki.pkcs11 import PIN_ENV, KeyReference, PinSource, Pkcs11Uri, find_module
from imageprov.pki.registry import Registry
from imageprov.pki.secret_file import read_secret_file

PinFile = Annotated[
    Optional[Path],
    typer.Option("--pin-file", help=f"File holding the token's user PIN (else ${PIN_ENV}, else a prompt)."),
]
Pkcs11Opt = Annotated[
    Optional[str],
    typer.Option("--pkcs11", metavar="URI", help="The CA key on a PKCS#11 token, e.g. 'pkcs11:token=Fleet;object=ca'."),
]
ModuleOpt = Annotated[
    Optional[Path],
    typer.Option("--module", help="The token's PKCS#11 module (.so); default: p11-kit's proxy."),
]


def read_secret(file: Path, option: str) -> str:
    """A passphrase or PIN from a file: one clear line if the file is missing, a directory, empty or no secret."""
    return read_secret_file(file, option)


def token_pin(file: Path | None) -> PinSource:
    """Where the token's PIN comes from: --pin-file, then $IMAGEPROV_PKCS11_PIN, then a prompt; never argv."""

    def pin(label: str) -> str | None:
        if file is not None:
            return read_secret(file, "--pin-file")
        if os.environ.get(PIN_ENV):
            return os.environ[PIN_ENV]
        if sys.stdin.isatty():
            return getpass.getpass(f"user PIN of token {label!r}: ")
        return None

    return pin


def refuse_file_key_options(passphrase_file: Path | None, no_passphrase: bool) -> None:
    if passphrase_file is not None or no_passphrase:
        raise UsageError(
            "--passphrase-file and --no-passphrase are for a key file, not a token",
            hint=f"the token asks for its PIN: --pin-file or ${PIN_ENV}",
        )


def refuse_token_options(module: Path | None, pin_file: Path | None) -> None:
    if module is not None or pin_file is not None:
        raise UsageError("--module and --pin-file go with --pkcs11 URI")


def init_on_token(
    pki: Path, subject: Subject, uri_text: str, module: Path | None, pin_file: Path | None, curve: Curve, days: int
) -> CertificateAuthority:
    if curve not in (Curve.P256, Curve.P384):
        raise UsageError("a CA key on a token is P-256 or P-384", hint="tokens and smart cards rarely do P-521")
    check_days(days)
    subject.to_name()  # a bad subject is refused before anything is made on the token
    from imageprov.pki.token import destroy, generate

    uri = Pkcs11Uri.parse(uri_text)
    key, reference = generate(KeyReference(uri, find_module(module, uri)), curve.ec_curve, token_pin(pin_file))
    try:
        ca = CertificateAuthority.create(subject, days=days, key=key)
        ca.write_with_reference(pki, reference)
        with Registry(pki, create=True):
            pass  # creates the registry now, so that a PKI never lacks one
    except BaseException:
        # A key pair no CA certificate names would only block the next try.
        destroy(key)
        raise
    finally:
        key.close()
    return ca


def import_from_token(
    pki: Path, cert: x509.Certificate, uri_text: str, module: Path | None, pin_file: Path | None
) -> None:
    from imageprov.pki.token import open_key as open_token_key

    uri = Pkcs11Uri.parse(uri_text)
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise UsageError("the CA certificate's key is not EC", hint="imageprov's CA keys are EC (P-256 or P-384)")
    key = open_token_key(KeyReference(uri, find_module(module, uri)), public, token_pin(pin_file))
    try:
        ca = check_pair(cert, key, Path(str(uri)))
        ca.check_usable()
        reference = KeyReference(replace(uri, id=key.key_id, module_path=None), find_module(module, uri))
        ca.write_with_reference(pki, reference)
        with Registry(pki, create=True):
            pass  # creates the registry now, so that a PKI never lacks one
        protection = key.attributes()
    finally:
        key.close()
    if protection["extractable"] is True or protection["sensitive"] is False:
        typer.echo(f"note: the token lets this key be extracted ({reference.uri})", err=True)
    elif protection["never_extractable"] is False or protection["always_sensitive"] is False:
        # Made elsewhere and written to the token: copies may exist.
        typer.echo(
            f"note: this key has not always been on the token ({reference.uri}); "
            "one made with 'imageprov ca init --pkcs11' has",
            err=True,
        )
    typer.echo(f"imported CA {ca.cert.subject.rfc4514_string()} into {pki}, its key on the token", err=True)
