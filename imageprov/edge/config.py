"""The accept service's settings, from command-line flags, the environment and files.

A flag wins over the environment. The environment names are Mender Gateway's
(``UPSTREAM_SERVER_URL``, ``MTLS_CA_CERTIFICATE``, ``MTLS_MENDER_USERNAME``,
``MTLS_MENDER_PASSWORD``, ``MTLS_BLACKLIST_PATH``) so that a Gateway setup ports
over; the older mtls-ambassador's (``MTLS_MENDER_BACKEND``, ``MTLS_MENDER_USER``,
``MTLS_MENDER_PASS``) are read when those are not set. Secrets come from files
or the environment, never from argv, and are held in ``Secret`` so that no repr
or log line shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import CA_CERT, load_cert
from imageprov.pki.config import Scheme, load_config

ENV_UPSTREAM = "UPSTREAM_SERVER_URL"
ENV_CA = "MTLS_CA_CERTIFICATE"
ENV_USERNAME = "MTLS_MENDER_USERNAME"
ENV_PASSWORD = "MTLS_MENDER_PASSWORD"  # the variable's name, not a password
ENV_DENYLIST = "MTLS_BLACKLIST_PATH"
ENV_TOKEN = "IMAGEPROV_EDGE_TOKEN"
# The mtls-ambassador's names for the same settings, read when Mender Gateway's are not set.
AMBASSADOR = {
    ENV_UPSTREAM: "MTLS_MENDER_BACKEND",
    ENV_USERNAME: "MTLS_MENDER_USER",
    ENV_PASSWORD: "MTLS_MENDER_PASS",
}  # a personal access token instead of a login

BODY_LIMIT = 64 * 1024  # an auth request is well under 4 KiB; 64 KiB leaves room for RSA-4096 and big identities


class Secret:
    """A password or token: its value only through ``reveal()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class Login:
    """A Mender user logged in with HTTP Basic; the JWT it gets is renewed on 401."""

    username: str
    password: Secret


@dataclass(frozen=True)
class Token:
    """A personal access token, sent as it is."""

    token: Secret


@dataclass(frozen=True)
class Flags:
    """What the command line gave (None: not given)."""

    pki: Path | None = None
    ca: Path | None = None
    upstream: str | None = None
    listen: str = "127.0.0.1:9080"
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    crl: Path | None = None
    denylist: Path | None = None
    registry: bool = True
    upstream_ca: Path | None = None
    timeout: float = 10.0
    retry_after: int = 5
    cache_size: int = 100_000


@dataclass(frozen=True)
class ServeSettings:
    host: str
    port: int
    ca_path: Path
    ca_cert: x509.Certificate
    upstream: str
    credentials: Login | Token
    registry_dir: Path | None
    crl: Path | None
    denylist: Path | None
    upstream_ca: Path | None
    timeout: float
    retry_after: int
    cache_size: int

    @classmethod
    def from_sources(cls, flags: Flags, env: Mapping[str, str]) -> ServeSettings:
        """Settle every setting, or raise ``UsageError`` naming the flag and variable to set."""
        env = {**{name: env[old] for name, old in AMBASSADOR.items() if env.get(old)}, **env}
        host, port = parse_listen(flags.listen)
        ca_path = flags.ca or (flags.pki / CA_CERT if flags.pki else None) or _path(env.get(ENV_CA))
        if ca_path is None:
            raise UsageError("no fleet CA", hint=f"pass --pki PKI or --ca FILE, or set {ENV_CA}")
        upstream = flags.upstream or env.get(ENV_UPSTREAM)
        if not upstream:
            raise UsageError("no Mender server", hint=f"pass --upstream URL or set {ENV_UPSTREAM}")
        denylist = flags.denylist or _path(env.get(ENV_DENYLIST))
        for what, path in (("--crl", flags.crl), ("--denylist", denylist), ("--upstream-ca", flags.upstream_ca)):
            if path is not None and not path.is_file():
                raise UsageError(f"{what} {path} does not exist")
        if flags.timeout <= 0 or flags.retry_after < 1 or flags.cache_size < 0:
            raise UsageError("--upstream-timeout and --retry-after must be positive, --cache-size at least 0")
        registry_dir = flags.pki if flags.registry and flags.pki and _has_registry(flags.pki) else None
        return cls(
            host=host,
            port=port,
            ca_path=ca_path,
            ca_cert=load_ca_cert(ca_path),
            upstream=parse_upstream(upstream),
            credentials=credentials(flags, env),
            registry_dir=registry_dir,
            crl=flags.crl,
            denylist=denylist,
            upstream_ca=flags.upstream_ca,
            timeout=flags.timeout,
            retry_after=flags.retry_after,
            cache_size=flags.cache_size,
        )


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _read_secret(path: Path, what: str) -> Secret:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if not text:
        raise UsageError(f"the {what} file {path} is empty")
    return Secret(text)


def credentials(flags: Flags, env: Mapping[str, str]) -> Login | Token:
    """A login (user and password) or a personal access token; exactly one."""
    username = flags.username or env.get(ENV_USERNAME)
    if flags.token_file is not None or (env.get(ENV_TOKEN) and username is None):
        if flags.username or flags.password_file:
            raise UsageError("give either --token-file or --username/--password-file, not both")
        token = _read_secret(flags.token_file, "token") if flags.token_file else Secret(env[ENV_TOKEN])
        return Token(token)
    if username is None:
        raise UsageError(
            "no Mender credentials",
            hint=f"pass --username and --password-file (or set {ENV_USERNAME}/{ENV_PASSWORD}), "
            f"or --token-file (or {ENV_TOKEN}) with a personal access token",
        )
    if flags.password_file is not None:
        return Login(username, _read_secret(flags.password_file, "password"))
    if env.get(ENV_PASSWORD):
        return Login(username, Secret(env[ENV_PASSWORD]))
    raise UsageError(f"no password for {username}", hint=f"pass --password-file FILE or set {ENV_PASSWORD}")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r} is not ADDR:PORT", hint="e.g. 127.0.0.1:9080")
    return host.strip("[]"), int(port)


def parse_upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"upstream {url!r} is not an http(s) URL", hint="e.g. https://hosted.mender.io")
    return url.rstrip("/")


def load_ca_cert(path: Path) -> x509.Certificate:
    try:
        return load_cert(path)
    except PkiError as exc:
        # A setting of the service, so a usage error: the message already names the file.
        raise UsageError(exc.message, hint=exc.hint) from exc


def _has_registry(pki_dir: Path) -> bool:
    """Whether the PKI has a registry to ask: PostgreSQL as its imageprov.toml says, or its SQLite file."""
    url = load_config(pki_dir).registry
    return url.scheme is not Scheme.SQLITE or url.path.is_file()
