"""The CA key on a PKCS#11 token (an HSM, a smart card, SoftHSM): made there, used there, never extracted.

python-pkcs11 talks to the token. ``TokenKey`` wraps the token's private key as
a ``cryptography`` ``EllipticCurvePrivateKey`` whose ``sign()`` runs on the
token (what cryptography's maintainers suggest for HSMs), so that every
certificate and CRL is still built by the one builder in ``pki.ca``.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from dataclasses import replace
from typing import Any, NoReturn, cast

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from imageprov.errors import PkiError, UsageError
from imageprov.pki.pkcs11 import MODULE_ENV, PIN_HINT, TOKEN_ATTRS, KeyReference, PinSource, Pkcs11Uri

# Tokens store the curve as DER ANSI X9.62 parameters (a named curve's OID).
CURVES: dict[bytes, ec.EllipticCurve] = {
    encode_named_curve_parameters("secp256r1"): ec.SECP256R1(),
    encode_named_curve_parameters("secp384r1"): ec.SECP384R1(),
}


class TokenKey(ec.EllipticCurvePrivateKey):
    """A private key on a token, usable wherever ``cryptography`` takes an EC private key.

    One session signs for every thread: a PKCS#11 session runs one operation at
    a time, and python-pkcs11 releases the GIL in C_Sign, so signatures are
    serialised by a lock.
    """

    def __init__(
        self,
        session: pkcs11.Session,
        key: SignMixin,
        curve: ec.EllipticCurve,
        public: ec.EllipticCurvePublicKey,
        where: str,
    ) -> None:
        self._session = session
        self._key = key
        self._curve = curve
        self._public = public
        self._lock = threading.Lock()
        self.where = where

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._curve

    @property
    def key_size(self) -> int:
        return self._curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """Hash here, sign the digest on the token (CKM_ECDSA), and DER-encode its raw r||s."""
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(bytes(data))
            digest = hasher.finalize()
        with self._lock:
            try:
                raw = self._key.sign(digest, mechanism=Mechanism.ECDSA)
            except p11.PKCS11Error as exc:
                raise PkiError(
                    f"the token refused to sign with {self.where}: {_name(exc)}",
                    hint="is the token still plugged in and logged in?",
                ) from exc
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise PkiError("the CA key on the token signs only")

    def private_numbers(self) -> NoReturn:
        raise PkiError(f"the CA key {self.where} is on a token and cannot be exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> NoReturn:
        raise PkiError(f"the CA key {self.where} is on a token and cannot be exported")

    def __copy__(self) -> TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenKey:
        return self

    @property
    def key_id(self) -> bytes:
        """The key's CKA_ID on the token."""
        with self._lock:
            return bytes(self._key[Attribute.ID])

    def attributes(self) -> dict[str, bool]:
        """What the token says about the key's protection (CKA_SENSITIVE, CKA_EXTRACTABLE, ...)."""
        names = (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE)
        with self._lock:
            return {a.name.lower(): bool(self._key[a]) for a in names}

    def close(self) -> None:
        """End the session (and with it the login)."""
        with self._lock, contextlib.suppress(p11.PKCS11Error):  # the token is gone already: nothing left to end
            self._session.close()


def generate(reference: KeyReference, curve: ec.EllipticCurve, pin: PinSource) -> tuple[TokenKey, KeyReference]:
    """Generate a key pair on the token: sensitive, never extractable, for signing only.

    Returns the key and the reference to store, with the key's CKA_ID in it.
    """
    session, token_label = _login(reference, pin, rw=True)
    try:
        uri = reference.uri
        if _find(session, uri, required=False) is not None:
            raise PkiError(
                f"token {token_label!r} already holds a private key {_describe(uri)}",
                hint="adopt it with 'imageprov ca import --pkcs11', or choose another object=",
            )
        key_id = uri.id if uri.id is not None else secrets.token_bytes(8)
        label = uri.object or ""
        params = next((der for der, known in CURVES.items() if known.name == curve.name), None)
        if params is None:
            raise UsageError(f"a token-held CA key is P-256 or P-384, not {curve.name}")
        try:
            public, private = session.generate_keypair(
                KeyType.EC,
                store=True,
                id=key_id,
                label=label,
                public_template={Attribute.EC_PARAMS: params, Attribute.VERIFY: True, Attribute.TOKEN: True},
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                },
            )
        except p11.PKCS11Error as exc:
            raise PkiError(
                f"token {token_label!r} cannot generate an EC {curve.name} key: {_name(exc)}",
                hint="check that the token supports CKM_EC_KEY_PAIR_GEN on this curve",
            ) from exc
        loaded = serialization.load_der_public_key(encode_ec_public_key(public))
        assert isinstance(loaded, ec.EllipticCurvePublicKey)
        stored = KeyReference(replace(uri, id=key_id, module_path=None), reference.module)
        return TokenKey(session, cast(SignMixin, private), curve, loaded, str(stored.uri)), stored
    except BaseException:
        session.close()
        raise


def destroy(key: TokenKey) -> None:
    """Remove a key pair just generated (when the CA could not be made with it)."""
    with key._lock:
        for kind in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for found in key._session.get_objects({Attribute.CLASS: kind, Attribute.ID: key._key[Attribute.ID]}):
                found.destroy()


def open_key(reference: KeyReference, public: ec.EllipticCurvePublicKey, pin: PinSource) -> TokenKey:
    """Log in and find the key; prove it is the private half of ``public`` by signing with it."""
    session, token_label = _login(reference, pin, rw=False)
    try:
        found = _find(session, reference.uri, required=True)
        assert found is not None
        params = bytes(found[Attribute.EC_PARAMS])
        if params not in CURVES:
            raise PkiError(f"the key {_describe(reference.uri)} on token {token_label!r} is not on P-256 or P-384")
        key = TokenKey(session, found, CURVES[params], public, str(reference.uri))
        challenge = secrets.token_bytes(32)
        try:
            public.verify(key.sign(challenge, ec.ECDSA(hashes.SHA256())), challenge, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as exc:
            raise PkiError(
                f"the key {_describe(reference.uri)} on token {token_label!r} does not match the CA certificate",
                hint="the URI names another key",
            ) from exc
        return key
    except BaseException:
        session.close()
        raise


def _login(reference: KeyReference, pin: PinSource, *, rw: bool) -> tuple[pkcs11.Session, str]:
    module = reference.module
    if not module.is_file():
        raise PkiError(
            f"PKCS#11 module {module} does not exist",
            hint=f"install the token's module, or pass --module / set ${MODULE_ENV}",
        )
    try:
        lib = pkcs11.lib(str(module))
    except p11.PKCS11Error as exc:
        if "while loading" not in str(exc):  # loaded, but C_Initialize failed
            raise PkiError(
                f"PKCS#11 module {module} cannot start: {_name(exc)}",
                hint="check its configuration: SoftHSM reads $SOFTHSM2_CONF, smart cards need pcscd running",
            ) from exc
        detail = str(exc).rpartition(": ")[2]
        raise PkiError(
            f"cannot load PKCS#11 module {module}: {detail}",
            hint="is it a PKCS#11 module (.so) for this machine's architecture?",
        ) from exc
    token = _token(lib, reference)
    label = token.label
    flags = token.flags
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise PkiError(_locked(label), hint="unlock it with the security officer's PIN (pkcs11-tool --init-pin)")
    try:
        if not flags & TokenFlag.LOGIN_REQUIRED:
            return token.open(rw=rw), label
        if flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH:
            return token.open(rw=rw, user_pin=pkcs11.PROTECTED_AUTH), label  # the reader's own PIN pad
        secret = pin(label)
        if not secret:
            raise PkiError(f"token {label!r} needs its user PIN", hint=PIN_HINT)
        return token.open(rw=rw, user_pin=secret), label
    except p11.PinIncorrect as exc:
        left = token.slot.get_token().flags
        warning = (
            "the next wrong PIN locks it"
            if left & TokenFlag.USER_PIN_FINAL_TRY
            else "check the PIN; a token locks after a few wrong tries"
        )
        raise PkiError(f"wrong PIN for token {label!r}", hint=warning) from exc
    except (p11.PinLocked, p11.PinExpired) as exc:
        raise PkiError(_locked(label), hint="unlock it with the security officer's PIN") from exc
    except (p11.PinLenRange, p11.PinInvalid) as exc:
        raise PkiError(f"wrong PIN for token {label!r}", hint="the token refuses a PIN of that length or kind") from exc
    except (p11.TokenNotPresent, p11.DeviceRemoved) as exc:
        raise PkiError(f"token {label!r} was removed", hint="plug it in again") from exc
    except p11.UserPinNotInitialized as exc:
        raise PkiError(f"token {label!r} has no user PIN yet", hint="set one with pkcs11-tool --init-pin") from exc
    except p11.PKCS11Error as exc:
        raise PkiError(f"cannot log in to token {label!r}: {_name(exc)}") from exc


def _locked(label: str) -> str:
    return f"token {label!r} is locked: its user PIN was entered wrong too often"


def _token(lib: Any, reference: KeyReference) -> pkcs11.Token:
    uri = reference.uri
    try:
        tokens = list(lib.get_tokens(token_label=uri.token))
    except p11.PKCS11Error as exc:
        raise PkiError(f"cannot list the tokens of {reference.module}: {_name(exc)}") from exc
    matching = [
        t
        for t in tokens
        if (uri.serial is None or _text(t.serial) == uri.serial)
        and (uri.manufacturer is None or t.manufacturer_id == uri.manufacturer)
        and (uri.model is None or t.model == uri.model)
    ]
    wanted = ", ".join(f"{k}={getattr(uri, k)}" for k in TOKEN_ATTRS if getattr(uri, k) is not None) or "any"
    if not matching:
        try:
            seen = ", ".join(repr(t.label) for t in lib.get_tokens() if t.flags & TokenFlag.TOKEN_INITIALIZED) or "none"
        except p11.PKCS11Error:
            seen = "unknown"
        raise PkiError(
            f"no PKCS#11 token with {wanted} in {reference.module}", hint=f"is it plugged in? tokens present: {seen}"
        )
    if len(matching) > 1:
        serials = ", ".join(_text(t.serial) for t in matching)
        raise PkiError(f"{len(matching)} tokens match {wanted}", hint=f"add serial= to the URI (serials: {serials})")
    found: pkcs11.Token = matching[0]
    return found


def _find(session: pkcs11.Session, uri: Pkcs11Uri, *, required: bool) -> SignMixin | None:
    attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if uri.object is not None:
        attrs[Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[Attribute.ID] = uri.id
    try:
        found = list(session.get_objects(attrs))
    except p11.PKCS11Error as exc:
        raise PkiError(f"cannot search the token for {_describe(uri)}: {_name(exc)}") from exc
    if not found:
        if not required:
            return None
        raise PkiError(
            f"no private key {_describe(uri)} on the token",
            hint="list the token's keys with: pkcs11-tool --module MODULE --login --list-objects",
        )
    if len(found) > 1:
        raise PkiError(f"{len(found)} private keys match {_describe(uri)}", hint="add id= to the URI")
    key = found[0]
    if key[Attribute.KEY_TYPE] != KeyType.EC:
        raise PkiError(f"the key {_describe(uri)} is not an EC key", hint="imageprov's CA keys are EC (P-256 or P-384)")
    return key  # type: ignore[return-value]


def _describe(uri: Pkcs11Uri) -> str:
    parts = [f"object={uri.object}"] if uri.object is not None else []
    if uri.id is not None:
        parts.append(f"id={uri.id.hex()}")
    return " ".join(parts)


def _text(value: bytes | str) -> str:
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else value).strip()


def _name(exc: Exception) -> str:
    """python-pkcs11's errors carry no text; their class names are the CKR_ codes, in words."""
    return str(exc) or type(exc).__name__
