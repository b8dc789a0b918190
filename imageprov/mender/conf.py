"""Merging the client-certificate block into ``mender.conf``, with the client's own rules for keys.

Every other key and its order are kept; the output uses a 2-space indent
like the files Mender's recipes install. The manual recipe's snippet pointed
``Key`` at the certificate (a documentation bug fixed later upstream); we
always point it at the private key.

``Security.AuthPrivateKey`` points at the same key by default: the client then
signs its auth requests with the certificate's key, which is what an accepting
edge (imageprov edge serve, Mender Gateway) checks.

Keys are matched as the client matches them, without regard to ASCII case.
The Go client (3.x) decodes each file with encoding/json into one struct
(conf/config.go, ``readConfigFile``): a key takes the field of the same name
in any case, and U+017F (long s) and U+212A (Kelvin sign) stand for ``s`` and
``k`` too. The C++ client (4.x, 5.x) keeps every JSON object in a map ordered
by lower-cased bytes (src/common/json.hpp, ``CaseInsensitiveMap``), so only
ASCII case folds. Both load the fallback, then /etc/mender/mender.conf over
it, field by field. Where they part is a key written twice in one file: the Go
client merges the two objects field by field, the C++ client keeps the last
one whole (nlohmann's parser replaces the value). So such a file is refused,
as is a key only the Go client would read (with a long s or a Kelvin sign) and
a value of a type one client refuses and the other skips. A merge writes each
key it sets in Mender's own spelling, in place of the spelling that was there.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imageprov.errors import ImageprovError
from imageprov.mender.server_ca import SERVER_CERT, ServerCa

CLIENT_CERT = "/data/mender/mender-cert.pem"
CLIENT_KEY = "/data/mender/mender-cert-private.pem"
ROOTFS_CONF = "/etc/mender/mender.conf"
# The fallback configuration the client merges under /etc/mender/mender.conf
# (/var/lib/mender is a link to /data/mender on Mender images).
DATA_CONF = "/data/mender/mender.conf"

# The keys imageprov reads or writes, in Mender's spelling, with the fields of
# the blocks among them. Spellings are checked in these objects: the top level,
# HttpsClient and Security.
SCHEMA: dict[str, dict[str, Any]] = {
    "ServerURL": {},
    "ServerCertificate": {},
    "TenantToken": {},
    "Servers": {},
    "HttpsClient": {"Certificate": {}, "Key": {}, "SSLEngine": {}},
    "Security": {"AuthPrivateKey": {}, "SSLEngine": {}},
}
BLOCKS = ("HttpsClient", "Security")
# Values both clients read only as strings: the Go client refuses the whole
# file for another type, the C++ client skips the key (config_parser.cpp).
STRINGS = ("ServerURL", "ServerCertificate", "TenantToken", "HttpsClient.Certificate", "HttpsClient.Key",
           "HttpsClient.SSLEngine", "Security.AuthPrivateKey", "Security.SSLEngine")  # fmt: skip
# Characters Go's case folding takes for ASCII letters (long s for s, the Kelvin sign for k) and C++'s does not.
_GO_ONLY_FOLDS = {"\u017f": "s", "\u212a": "k"}


class MenderConfError(ImageprovError):
    """mender.conf is not a JSON object we can merge into, or the clients would read it differently."""


class AuthKey(enum.Enum):
    """Which key the client signs its auth requests with."""

    CERT = "cert"  # the certificate's key: what an accepting edge requires
    DEVICE = "device"  # the key the client generates on first boot (Security.AuthPrivateKey untouched)


@dataclass(frozen=True)
class Settings:
    """What goes into mender.conf: the HttpsClient block, the auth key, and optionally the server."""

    certificate: str = CLIENT_CERT
    key: str = CLIENT_KEY
    server_url: str | None = None
    tenant_token: str | None = None
    auth_key: AuthKey = AuthKey.CERT
    # The edge's certificate or CA: installed at SERVER_CERT, which ServerCertificate then names.
    server_ca: ServerCa | None = None
    # The OpenSSL engine that loads ``key`` (a ``pkcs11:`` URI): set as HttpsClient.SSLEngine, and as
    # Security.SSLEngine with the auth key. None: ``key`` is a file.
    ssl_engine: str | None = None

    @property
    def server_certificate(self) -> str | None:
        """The ServerCertificate to set, or None to leave it as it is."""
        return SERVER_CERT if self.server_ca is not None else None

    @property
    def https_client(self) -> dict[str, str]:
        engine = {"SSLEngine": self.ssl_engine} if self.ssl_engine is not None else {}
        return {"Certificate": self.certificate, "Key": self.key, **engine}

    @property
    def auth_private_key(self) -> str | None:
        """The Security.AuthPrivateKey to set, or None to leave Security as it is."""
        return self.key if self.auth_key is AuthKey.CERT else None


@dataclass(frozen=True)
class Merge:
    text: bytes
    changed: bool
    # The HttpsClient block that was there before and differed from ours.
    replaced: dict[str, Any] | None
    # The Security.AuthPrivateKey that was there before and differed from ours.
    replaced_auth_key: str | None = None


def fold(key: str) -> str:
    """``key`` as both clients compare it: ASCII letters in lower case, every other character as it is."""
    return "".join(chr(ord(c) | 0x20) if "A" <= c <= "Z" else c for c in key)


def spelling(config: dict[str, Any], name: str) -> str | None:
    """The key of ``config`` that the client takes for ``name``, as the file spells it; None if there is none."""
    wanted = fold(name)
    # parse() refuses two spellings of a key we look up: the first is the only one.
    return next((key for key in config if fold(key) == wanted), None)


def lookup(config: dict[str, Any], name: str) -> Any:
    """The value the client reads for ``name`` in one parsed file (``None`` if unset)."""
    key = spelling(config, name)
    return config[key] if key is not None else None


def lookup_path(config: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` such as ``HttpsClient.Key`` (``None`` if unset)."""
    value: Any = config
    for name in path.split("."):
        if not isinstance(value, dict):
            return None
        value = lookup(value, name)
    return value


def parse(text: bytes, where: str) -> dict[str, Any]:
    """Parse mender.conf; refuse what is not an object, or what the clients would read apart or not at all."""
    try:
        value = json.loads(text.decode("utf-8"), parse_constant=_non_standard, parse_float=_finite,
                           object_pairs_hook=_unique)  # fmt: skip
        # A lone surrogate escape ("\ud83d") parses, but is no character: it cannot be written back.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except _Duplicate as exc:
        raise MenderConfError(
            f"{where} holds the key {json.dumps(exc.key, ensure_ascii=False)} twice: the Mender clients "
            "read such a file differently (3.x merges the two, 4.x and later keep the last)",
            hint="keep one of them in the golden image's mender.conf",
        ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError, _NonStandard) as exc:
        raise MenderConfError(f"{where} is not valid JSON: {exc}", hint="fix the golden image's mender.conf") from exc
    except UnicodeEncodeError as exc:
        raise MenderConfError(
            f"{where} holds a lone UTF-16 surrogate escape, which is no character",
            hint="fix the golden image's mender.conf: escape the whole pair, e.g. \\ud83d\\ude00",
        ) from exc
    if not isinstance(value, dict):
        raise MenderConfError(f"{where} is a JSON {type(value).__name__}, not an object")
    _check_spellings(value, where, "")
    for name in BLOCKS:
        block = lookup(value, name)
        if block is not None and not isinstance(block, dict):
            raise MenderConfError(f"{where} has a {name} that is not an object")
        if block is not None:
            _check_spellings(block, where, f"{name}.")
    for path in STRINGS:
        found = lookup_path(value, path)
        if found is not None and not isinstance(found, str):
            raise MenderConfError(
                f"{where} has a {path} that is a JSON {type(found).__name__}, not a string: "
                "the Mender client 3.x then loads no configuration at all, 4.x and later skip the key",
                hint="fix the golden image's mender.conf",
            )
    return value


def _check_spellings(config: dict[str, Any], where: str, prefix: str) -> None:
    """Refuse two spellings of one key, and a key that only the Go client would take for one of ours."""
    seen: dict[str, str] = {}
    for key in config:
        if any(c in _GO_ONLY_FOLDS for c in key):
            as_go = "".join(_GO_ONLY_FOLDS.get(c, c) for c in key)
            raise MenderConfError(
                f"{where} has the key {json.dumps(prefix + key)}, which the Mender client 3.x reads as "
                f"{json.dumps(prefix + as_go)} and 4.x and later do not",
                hint=f"spell it {as_go} in the golden image's mender.conf, or remove it",
            )
        other = seen.setdefault(fold(key), key)
        if other != key:
            raise MenderConfError(
                f"{where} holds {json.dumps(prefix + other)} and {json.dumps(prefix + key)}, one key to the "
                "Mender client, which matches keys without regard to case: 3.x merges the two, 4.x and "
                "later keep the last",
                hint="keep one spelling in the golden image's mender.conf",
            )


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A plain dict would keep the last of two equal keys without a word, and
    # a merge would then write back a file the clients read otherwise.
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Duplicate(key)
        found[key] = value
    return found


def auth_private_key(config: dict[str, Any]) -> str | None:
    """Security.AuthPrivateKey of a parsed mender.conf, if set."""
    found = lookup_path(config, "Security.AuthPrivateKey")
    return found if isinstance(found, str) and found else None


class _NonStandard(ValueError):
    """JSON that Python reads but standard JSON (RFC 8259) and the Mender client do not."""


def _non_standard(name: str) -> Any:
    raise _NonStandard(f"{name} is not a JSON number (RFC 8259)")


def _finite(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise _NonStandard(f"{text} is out of range for a number (it would be written back as Infinity)")
    return number


def render(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _put(config: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    """``config`` with ``name`` set to ``value``, spelled ``name`` where the file had any spelling of it, else last.

    Mender's spelling is written because tools that read the file besides the
    client (jq in meta-mender's scripts, a site's own) may well match keys exactly.
    """
    key = spelling(config, name)
    if key is None:
        return {**config, name: value}
    return {(name if k == key else k): (value if k == key else v) for k, v in config.items()}


def merge(text: bytes | None, settings: Settings, where: str) -> Merge:
    """Merge ``settings`` into the mender.conf ``text`` (None: start from an empty object)."""
    config = parse(text, where) if text is not None else {}
    before = dict(config)
    old = lookup(config, "HttpsClient")
    replaced = old if old is not None and _overlay([old], SCHEMA["HttpsClient"]) != settings.https_client else None
    if settings.server_url is not None:
        config = _put(config, "ServerURL", settings.server_url)
    if settings.tenant_token is not None:
        config = _put(config, "TenantToken", settings.tenant_token)
    if settings.server_certificate is not None:
        config = _put(config, "ServerCertificate", settings.server_certificate)
    config = _put(config, "HttpsClient", settings.https_client)
    replaced_auth_key = None
    wanted = settings.auth_private_key
    if wanted is not None:
        old_key = auth_private_key(config)
        replaced_auth_key = old_key if old_key is not None and old_key != wanted else None
        # Other Security keys are kept; SSLEngine is the engine that loads this key: ours, or none for a file
        # (one left from a token's conf would be asked to load a file path, and fail).
        security = _put(lookup(config, "Security") or {}, "AuthPrivateKey", wanted)
        if settings.ssl_engine is not None:
            security = _put(security, "SSLEngine", settings.ssl_engine)
        else:
            security = {k: v for k, v in security.items() if fold(k) != fold("SSLEngine")}
        config = _put(config, "Security", security)
    rendered = render(config)
    return Merge(rendered, config != before or rendered != text, replaced, replaced_auth_key)


def effective(main: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """The configuration the client uses: ``fallback`` first, ``main`` (/etc/mender/mender.conf) over it.

    Key by key, matched as the client matches them (:func:`fold`), and inside
    an object field by field: mender 3.x decodes both files into one struct
    (Go's json.Unmarshal keeps what the second file does not name), and 4.x's
    parser sets each field it finds. So an HttpsClient in the rootfs naming only
    a Certificate keeps the fallback's Key. A null changes nothing in either
    client. Our keys come out in Mender's spelling (:data:`SCHEMA`), others
    as the first file to set them spells them.
    """
    return _overlay([fallback, main], SCHEMA)


def _overlay(layers: Sequence[dict[str, Any]], schema: dict[str, Any]) -> dict[str, Any]:
    names = {fold(name): name for name in schema}
    merged: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            folded = fold(key)
            name = spelled.setdefault(folded, names.get(folded, key))
            below = merged.get(name)
            if isinstance(value, dict):
                inner = schema.get(name, {})
                value = _overlay([below, value] if isinstance(below, dict) else [value], inner)
            merged[name] = value
    return merged


def conflicts(main: dict[str, Any], settings: Settings) -> list[str]:
    """The settings that ``main`` overrides when they are written to the fallback config, as ``Key: value``."""
    # Every key the merge writes, whatever settings come to hold.
    wanted: dict[str, Any] = json.loads(merge(None, settings, "the fallback").text)
    used = effective(main, wanted)
    found = []
    for name in wanted:
        if used.get(name) != wanted[name]:
            key = spelling(main, name) or name
            found.append(f"{key}: {json.dumps(main.get(key), ensure_ascii=False)}")
    if settings.server_url is not None and lookup(main, "Servers") is not None:
        # The client refuses ServerURL beside Servers, wherever each is set.
        found.append("Servers (the client refuses ServerURL beside it)")
    return found
