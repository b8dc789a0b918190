"""Merging the client-certificate block into ``mender.conf``.

Every other key and its order are kept; the output uses a 2-space indent
like the files Mender's recipes install. The manual recipe's snippet pointed
``Key`` at the certificate (a documentation bug fixed later upstream); we
always point it at the private key.

``Security.AuthPrivateKey`` points at the same key by default: the client then
signs its auth requests with the certificate's key, which is what an accepting
edge (imageprov edge serve, Mender Gateway) checks.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from imageprov.errors import ImageprovError

CLIENT_CERT = "/data/mender/mender-cert.pem"
CLIENT_KEY = "/data/mender/mender-cert-private.pem"
ROOTFS_CONF = "/etc/mender/mender.conf"
# The fallback configuration the client merges under /etc/mender/mender.conf
# (/var/lib/mender is a link to /data/mender on Mender images).
DATA_CONF = "/data/mender/mender.conf"


class MenderConfError(ImageprovError):
    """mender.conf is not a JSON object we can merge into."""


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

    @property
    def https_client(self) -> dict[str, str]:
        return {"Certificate": self.certificate, "Key": self.key}

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


def parse(text: bytes, where: str) -> dict[str, Any]:
    """Parse mender.conf; refuse anything but a JSON object with an object (or no) HttpsClient."""
    try:
        value = json.loads(text.decode("utf-8"), parse_constant=_non_standard, parse_float=_finite)
        # A lone surrogate escape ("\ud83d") parses, but is no character: it cannot be written back.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError, _NonStandard) as exc:
        raise MenderConfError(f"{where} is not valid JSON: {exc}", hint="fix the golden image's mender.conf") from exc
    except UnicodeEncodeError as exc:
        raise MenderConfError(
            f"{where} holds a lone UTF-16 surrogate escape, which is no character",
            hint="fix the golden image's mender.conf: escape the whole pair, e.g. \\ud83d\\ude00",
        ) from exc
    if not isinstance(value, dict):
        raise MenderConfError(f"{where} is a JSON {type(value).__name__}, not an object")
    for name in ("HttpsClient", "Security"):
        block = value.get(name)
        if block is not None and not isinstance(block, dict):
            raise MenderConfError(f"{where} has a {name} that is not an object")
    return value


def auth_private_key(config: dict[str, Any]) -> str | None:
    """Security.AuthPrivateKey of a parsed mender.conf, if set."""
    found = (config.get("Security") or {}).get("AuthPrivateKey")
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


def merge(text: bytes | None, settings: Settings, where: str) -> Merge:
    """Merge ``settings`` into the mender.conf ``text`` (None: start from an empty object)."""
    config = parse(text, where) if text is not None else {}
    before = dict(config)
    old = config.get("HttpsClient")
    replaced = old if old is not None and old != settings.https_client else None
    if settings.server_url is not None:
        config["ServerURL"] = settings.server_url
    if settings.tenant_token is not None:
        config["TenantToken"] = settings.tenant_token
    config["HttpsClient"] = settings.https_client
    replaced_auth_key = None
    wanted = settings.auth_private_key
    if wanted is not None:
        old_key = auth_private_key(config)
        replaced_auth_key = old_key if old_key is not None and old_key != wanted else None
        # Other Security keys (SSLEngine, an HSM's AuthPrivateKey engine settings) are kept.
        config["Security"] = {**(config.get("Security") or {}), "AuthPrivateKey": wanted}
    rendered = render(config)
    return Merge(rendered, config != before or rendered != text, replaced, replaced_auth_key)


def effective(main: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """The configuration the client uses: ``fallback`` first, ``main`` (/etc/mender/mender.conf) over it.

    Key by key, and inside an object field by field: mender 3.x decodes both
    files into one struct (Go's json.Unmarshal keeps what the second file does
    not name), and 4.x's parser sets each field it finds. So an HttpsClient in
    the rootfs naming only a Certificate keeps the fallback's Key. A null
    changes nothing in either client.
    """
    merged = dict(fallback)
    for key, value in main.items():
        if value is None:
            continue
        below = merged.get(key)
        merged[key] = effective(value, below) if isinstance(value, dict) and isinstance(below, dict) else value
    return merged


def conflicts(main: dict[str, Any], settings: Settings) -> list[str]:
    """The settings that ``main`` overrides when they are written to the fallback config, as ``Key: value``."""
    # Every key the merge writes, whatever settings come to hold.
    wanted: dict[str, Any] = json.loads(merge(None, settings, "the fallback").text)
    used = effective(main, wanted)
    found = [f"{key}: {json.dumps(main[key])}" for key in wanted if used.get(key) != wanted[key]]
    if settings.server_url is not None and main.get("Servers") is not None:
        # The client refuses ServerURL beside Servers, wherever each is set.
        found.append("Servers (the client refuses ServerURL beside it)")
    return found
