"""Where a CA key on a PKCS#11 token is: an RFC 7512 URI and the module that reaches the token.

The PKI directory keeps only this reference (``ca-key.pkcs11.json``): never a
PIN, never key material. ``pki.token`` does the talking to the token; this
module does not load python-pkcs11, so that commands that never touch a token
do not pay for it.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageprov.errors import PkiError, UsageError
from imageprov.pki.config import mask_password

KEY_REFERENCE = "ca-key.pkcs11.json"
MODULE_ENV = "IMAGEPROV_PKCS11_MODULE"
PIN_ENV = "IMAGEPROV_PKCS11_PIN"
PIN_HINT = f"set ${PIN_ENV}, pass --pin-file, or run on a terminal to be asked"
# Where distributions put p11-kit's proxy, which loads every module registered
# on the system: the default when no module is named.
P11KIT_PROXY = (
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
)
# RFC 7512 path attributes we understand; an unknown one must not be ignored
# (the URI would then name something else than the user meant).
TOKEN_ATTRS = {"token": "token", "serial": "serial", "manufacturer": "manufacturer", "model": "model"}
_KNOWN = {*TOKEN_ATTRS, "object", "id", "type"}

PinSource = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 ``pkcs11:`` URI naming one private key on one token."""

    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    module_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse ``text``; a PIN in the URI is refused, since the URI is on the command line."""
        scheme, colon, rest = text.partition(":")
        if scheme.lower() != "pkcs11" or not colon:
            raise UsageError(f"{_shown(text)!r} is not a PKCS#11 URI", hint="e.g. 'pkcs11:token=Fleet;object=fleet-ca'")
        path, _, query = rest.partition("?")
        values: dict[str, Any] = {}
        for part in filter(None, path.split(";")):
            name, eq, raw = part.partition("=")
            if not eq or name not in _KNOWN:
                raise UsageError(
                    f"PKCS#11 URI attribute {name!r} is not supported",
                    hint="use token=, serial=, manufacturer=, model=, object=, id= and type=private",
                )
            if name in values:
                raise UsageError(f"PKCS#11 URI attribute {name!r} is given twice")
            values[name] = urllib.parse.unquote_to_bytes(raw) if name == "id" else urllib.parse.unquote(raw)
        for part in filter(None, query.split("&")):
            name, _, raw = part.partition("=")
            if name in ("pin-value", "pin-source"):
                raise UsageError(
                    "a PIN in the PKCS#11 URI would be visible to every user of this machine", hint=PIN_HINT
                )
            if name != "module-path":
                raise UsageError(f"PKCS#11 URI query attribute {name!r} is not supported", hint="use --module PATH")
            values["module_path"] = urllib.parse.unquote(raw)
        if values.pop("type", "private") != "private":
            raise UsageError("the PKCS#11 URI must name a private key (type=private)")
        uri = cls(**values)
        if uri.object is None and uri.id is None:
            raise UsageError(f"{_shown(text)!r} does not name a key", hint="add object=LABEL (or id=%01) to the URI")
        return uri

    def __str__(self) -> str:
        parts = [f"{name}={_quote(getattr(self, name))}" for name in TOKEN_ATTRS if getattr(self, name) is not None]
        if self.object is not None:
            parts.append(f"object={_quote(self.object)}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        return "pkcs11:" + ";".join([*parts, "type=private"])


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


@dataclass(frozen=True)
class KeyReference:
    """What the PKI directory keeps of a token-held CA key: where it is, not what it is."""

    uri: Pkcs11Uri
    module: Path

    def to_json(self) -> bytes:
        return (json.dumps({"uri": str(self.uri), "module": str(self.module)}, indent=2) + "\n").encode()

    @classmethod
    def read(cls, path: Path) -> KeyReference:
        try:
            data = json.loads(path.read_text())
            uri, module = Pkcs11Uri.parse(data["uri"]), Path(data["module"])
        except (OSError, ValueError, KeyError, TypeError, UsageError) as exc:
            raise PkiError(f"{path} is not a readable PKCS#11 key reference: {exc}") from exc
        # A line PC may keep the module elsewhere than the machine that made the CA.
        override = os.environ.get(MODULE_ENV)
        return cls(uri, Path(override) if override else module)


def find_module(given: Path | None, uri: Pkcs11Uri) -> Path:
    """The module to load: --module, then $IMAGEPROV_PKCS11_MODULE, then the URI's module-path, then p11-kit."""
    env = os.environ.get(MODULE_ENV)
    for candidate in (given, Path(env) if env else None, Path(uri.module_path) if uri.module_path else None):
        if candidate is not None:
            return candidate.absolute()
    for proxy in P11KIT_PROXY:
        if Path(proxy).is_file():
            return Path(proxy)
    raise UsageError(
        "no PKCS#11 module given", hint="pass --module with the path of the token vendor's PKCS#11 library (.so)"
    )


# A PIN in a URI (RFC 7512's pin-value), refused but never echoed.
_PIN = re.compile(r"(pin-(?:value|source)=)[^&;?#]*", re.IGNORECASE)


def _shown(text: str) -> str:
    """``text`` for a message: a PIN, or a password of some other kind of URL given by mistake, masked."""
    return mask_password(_PIN.sub(r"\1***", text))
