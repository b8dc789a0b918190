"""The PKI's settings file, ``PKI/imageprov.toml``, and registry URLs.

Every station and every command that opens a PKI reads the same file, so that
the registry is chosen once for a line::

    [registry]
    url = "postgresql://registry.factory.lan/imageprov?sslmode=verify-full"
    timeout = 15    # seconds to wait for a lock another process holds

``url`` is ``sqlite:///ABSOLUTE/PATH``, ``sqlite:RELATIVE/PATH`` (relative to
the PKI directory), or a libpq URL ``postgresql://...``. Without the file the
registry is ``PKI/registry.sqlite``. Passwords are never taken from a URL
(it ends up in shell histories, process lists and logs): libpq finds them in
``PGPASSFILE`` (default ``~/.pgpass``), ``PGPASSWORD`` or a service file.
"""

from __future__ import annotations

import enum
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from imageprov.errors import PkiError, UsageError

CONFIG = "imageprov.toml"
DEFAULT_SQLITE = "registry.sqlite"
DEFAULT_TIMEOUT = 15.0
# The longest [registry] timeout taken: an hour. Any longer and a station stuck on a server that stopped
# answering looks hung; PostgreSQL's statement_timeout (milliseconds, a 32-bit int) holds it with room.
MAX_TIMEOUT = 3600.0


class Scheme(enum.Enum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True)
class RegistryUrl:
    """Where a registry lives. ``display`` is safe to print."""

    scheme: Scheme
    target: str  # the SQLite file's path, or the libpq URL

    @property
    def path(self) -> Path:
        return Path(self.target)

    @property
    def display(self) -> str:
        return f"sqlite://{self.target}" if self.scheme is Scheme.SQLITE else mask_password(self.target)

    @classmethod
    def parse(cls, url: str, *, base: Path) -> RegistryUrl:
        """Parse ``url``; a relative SQLite path is taken relative to ``base`` (the PKI directory)."""
        scheme, sep, rest = url.partition(":")
        if scheme in ("postgresql", "postgres"):
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
                query = parse_qsl(parts.query, keep_blank_values=True)
            except ValueError:
                # Never the exception's text: for "postgresql://u:p[w]@h" it quotes part of the password.
                raise UsageError(
                    f"the registry URL {mask_password(url)!r} is not a valid URL (an unclosed '[', a bad port?)",
                    hint="e.g. postgresql://registry.factory.lan/imageprov, or postgresql://[::1]/imageprov",
                ) from None
            if parts.password is not None or any(_is_secret(key) for key, _ in query):
                raise UsageError(
                    f"the registry URL {mask_password(url)} holds a password",
                    hint="leave it out of the URL: libpq reads it from PGPASSFILE (~/.pgpass), PGPASSWORD "
                    "or a service file (PGSERVICEFILE)",
                )
            return cls(Scheme.POSTGRESQL, url)
        if scheme == "sqlite" and sep and rest:
            path = rest[2:] if rest.startswith("//") else rest  # sqlite:///abs -> /abs; sqlite:rel -> rel
            if not path:
                raise UsageError(f"the registry URL {url!r} names no file")
            return cls(Scheme.SQLITE, str(base / path if not path.startswith("/") else Path(path)))
        raise UsageError(
            f"unknown registry URL {mask_password(url)!r}",
            hint="use sqlite:///PATH, sqlite:RELATIVE-PATH or postgresql://HOST/DATABASE; libpq key=value strings "
            "are not taken",
        )


# Connection settings that are secrets: libpq's password, and sslpassword (the client key's passphrase).
_SECRET_KEY = re.compile(r"(?:ssl)?password", re.IGNORECASE)
# key=value as libpq's connection strings write it: a quoted value may hold spaces and escaped quotes.
_KEYWORD_VALUE = re.compile(r"([\w%]+)(\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")


def _is_secret(key: str) -> bool:
    return _SECRET_KEY.fullmatch(unquote(key).strip()) is not None


def mask_password(url: str) -> str:
    """``url`` with every password replaced by ``***``, for messages and logs.

    Works on the text alone, so that what ``urlsplit`` refuses (an unclosed ``[``), a libpq
    ``key=value`` string (``host=h password=...``) or any other mistake never shows a secret.
    """
    scheme, sep, rest = url.partition("://")
    scheme = _KEYWORD_VALUE.sub(_masked_keyword, scheme)  # without "://", all of it: libpq's key=value form or else
    if not sep:
        return scheme
    # The userinfo ends at the last "@" before the query: a password may hold "/" or "@" itself.
    end = min((i for i in (rest.find(c) for c in "?#") if i >= 0), default=len(rest))
    head, tail = rest[:end], rest[end:]
    if "@" in head:
        userinfo, _, hostpath = head.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        head = f"{user}:***@{hostpath}" if colon else head
    question, query = tail[:1], tail[1:]
    if question == "?":
        query, hash_, fragment = query.partition("#")
        pairs = [pair.partition("=") for pair in query.split("&")]
        query = "&".join(f"{k}{eq}***" if eq and _is_secret(k) else f"{k}{eq}{v}" for k, eq, v in pairs)
        tail = f"?{query}{hash_}{fragment}"
    return f"{scheme}://{head}{tail}"


def _masked_keyword(match: re.Match[str]) -> str:
    return f"{match[1]}{match[2]}***" if _is_secret(match[1]) else match[0]


@dataclass(frozen=True)
class PkiConfig:
    registry: RegistryUrl
    timeout: float = DEFAULT_TIMEOUT


def load_config(pki_dir: Path, registry: str | None = None) -> PkiConfig:
    """Read ``PKI/imageprov.toml`` (if any); ``registry`` (from --registry) overrides its URL."""
    if not pki_dir.is_dir():
        raise PkiError(f"no PKI at {pki_dir}", hint=f"create one with 'imageprov ca init {pki_dir}'")
    path = pki_dir / CONFIG
    data: dict[str, object] = {}
    if path.exists():
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
                hint="a TOML file is UTF-8: save it again as such",
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path} is not valid TOML: {exc}") from None
    section = data.get("registry", {})
    if not isinstance(section, dict) or not set(section) <= {"url", "timeout"}:
        raise UsageError(f"{path}: [registry] takes only url and timeout")
    url = registry or section.get("url") or f"sqlite:{DEFAULT_SQLITE}"
    timeout = section.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(url, str):
        raise UsageError(f"{path}: [registry] url must be a string")
    # A bool is an int to Python, and 1e400 (inf) and nan are floats to TOML: none is a number of seconds.
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT:
        raise UsageError(
            f"{path}: [registry] timeout must be a number of seconds, more than 0 and at most {MAX_TIMEOUT:g}",
            hint=f"e.g. timeout = {DEFAULT_TIMEOUT:g}",
        )
    return PkiConfig(RegistryUrl.parse(url, base=pki_dir), float(timeout))
