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
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from imageprov.errors import PkiError, UsageError

CONFIG = "imageprov.toml"
DEFAULT_SQLITE = "registry.sqlite"
DEFAULT_TIMEOUT = 15.0


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
            parts = urlsplit(url)
            secret = parts.password is not None or any(k == "password" for k, _ in parse_qsl(parts.query))
            if secret:
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
            hint="use sqlite:///PATH, sqlite:RELATIVE-PATH or postgresql://HOST/DATABASE",
        )


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if parts.password is None and all(k != "password" for k, _ in pairs):
            return url
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = "&".join(f"{k}=***" if k == "password" else f"{k}={v}" for k, v in pairs)
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "<unparsable URL>"


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
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
    section = data.get("registry", {})
    if not isinstance(section, dict) or not set(section) <= {"url", "timeout"}:
        raise UsageError(f"{path}: [registry] takes only url and timeout")
    url = registry or section.get("url") or f"sqlite:{DEFAULT_SQLITE}"
    timeout = section.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(url, str) or not isinstance(timeout, int | float) or timeout <= 0:
        raise UsageError(f"{path}: [registry] url must be a string and timeout a positive number of seconds")
    return PkiConfig(RegistryUrl.parse(url, base=pki_dir), float(timeout))
