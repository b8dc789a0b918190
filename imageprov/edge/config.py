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

import enum
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from imageprov.edge.nginx import check_ca_bundle, masked, parse_upstream
from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import CA_CERT, load_cert
from imageprov.pki.chain import ca_problems
from imageprov.pki.secret_file import read_secret_file

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


class IdentityRule(enum.Enum):
    """How an auth request's identity is bound to the certificate it comes with (``--identity``)."""

    # The first identity a certificate presents is recorded in the registry; afterwards the
    # certificate may present only that identity, and only that certificate may present it.
    PIN = "pin"
    # id_data[NAME] must equal the certificate's CN.
    ATTRIBUTE = "attribute"
    # Any identity: Mender Gateway's behaviour, where one stolen key can enroll any device.
    NONE = "none"


@dataclass(frozen=True)
class IdentityPolicy:
    rule: IdentityRule
    attribute: str | None = None

    @classmethod
    def parse(cls, text: str) -> IdentityPolicy:
        """``pin``, ``attribute:NAME`` or ``none``."""
        name, sep, attribute = text.partition(":")
        if name == IdentityRule.ATTRIBUTE.value and sep and attribute.strip():
            return cls(IdentityRule.ATTRIBUTE, attribute.strip())
        if name in (IdentityRule.PIN.value, IdentityRule.NONE.value) and not sep:
            return cls(IdentityRule(name))
        raise UsageError(f"--identity {text!r} is not pin, attribute:NAME or none", hint="e.g. --identity pin")

    def __str__(self) -> str:
        return f"attribute:{self.attribute}" if self.rule is IdentityRule.ATTRIBUTE else self.rule.value


@dataclass(frozen=True)
class Listen:
    """Where the service listens: a TCP address, or a Unix socket (``unix:/run/imageprov/edge.sock``)."""

    host: str | None = None
    port: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.path is not None:
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return self.host == "localhost"


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
    identity: str = IdentityRule.PIN.value
    no_revocation: bool = False
    allow_remote: bool = False
    # Seconds a certificate found delivered and unrevoked is not asked about again on
    # device routes: the longest a revocation can take to cut a device off there.
    recheck: float = 2.0


@dataclass(frozen=True)
class ServeSettings:
    listen: Listen
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
    identity: IdentityPolicy
    recheck: float

    @property
    def revocation_checked(self) -> bool:
        return self.registry_dir is not None or self.crl is not None or self.denylist is not None

    @classmethod
    def from_sources(cls, flags: Flags, env: Mapping[str, str]) -> ServeSettings:
        """Settle every setting, or raise ``UsageError`` naming the flag and variable to set."""
        env = {**{name: env[old] for name, old in AMBASSADOR.items() if env.get(old)}, **env}
        listen = parse_listen(flags.listen)
        if not listen.loopback and not flags.allow_remote:
            raise UsageError(
                f"--listen {flags.listen}: the service trusts the client certificate that nginx puts in a header; "
                "anyone who can reach this address can claim any device's certificate",
                hint="listen on loopback or a Unix socket (unix:/run/imageprov/edge.sock), or pass --allow-remote "
                "if only nginx can reach it",
            )
        identity = IdentityPolicy.parse(flags.identity)
        ca_path = flags.ca or (flags.pki / CA_CERT if flags.pki else None) or _path(env.get(ENV_CA))
        if ca_path is None:
            raise UsageError("no fleet CA", hint=f"pass --pki PKI or --ca FILE, or set {ENV_CA}")
        upstream = upstream_url(flags.upstream, env)
        denylist = flags.denylist or _path(env.get(ENV_DENYLIST))
        for what, path in (("--crl", flags.crl), ("--denylist", denylist), ("--upstream-ca", flags.upstream_ca)):
            if path is not None and not path.is_file():
                raise UsageError(f"{what} {path} does not exist")
        if not (0 < flags.timeout <= 3600) or not (1 <= flags.retry_after <= 3600) or flags.cache_size < 0:
            raise UsageError("--upstream-timeout and --retry-after must be 1 to 3600 s, --cache-size at least 0")
        if not (0 <= flags.recheck <= 60) or math.isnan(flags.recheck):
            raise UsageError("--recheck must be 0 to 60 s")
        if flags.upstream_ca is not None:
            check_ca_bundle(flags.upstream_ca)
        # With a PKI, its registry is the revocation source, and it must open: a
        # typo in imageprov.toml or a missing file is an error, never "no check".
        registry_dir = flags.pki if flags.registry and flags.pki else None
        settings = cls(
            listen=listen,
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
            identity=identity,
            recheck=flags.recheck,
        )
        if not settings.revocation_checked and not flags.no_revocation:
            raise UsageError(
                "no revocation source: a revoked device would be accepted",
                hint="pass --pki PKI (its registry), --crl FILE or --denylist FILE; --no-revocation to run without",
            )
        if identity.rule is IdentityRule.PIN and registry_dir is None:
            raise UsageError(
                "--identity pin keeps each certificate's identity in the PKI's registry, and there is none",
                hint="pass --pki PKI, or --identity attribute:NAME (id_data[NAME] must be the CN) or --identity none",
            )
        return settings


def upstream_url(flag: str | None, env: Mapping[str, str]) -> str:
    """The Mender server: the flag, else Mender Gateway's variable, else mtls-ambassador's."""
    upstream = flag or env.get(ENV_UPSTREAM) or env.get(AMBASSADOR[ENV_UPSTREAM])
    if not upstream:
        raise UsageError(
            "no Mender server", hint=f"pass --upstream URL or set {ENV_UPSTREAM} (or {AMBASSADOR[ENV_UPSTREAM]})"
        )
    return upstream


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _read_secret(path: Path, what: str) -> Secret:
    text = read_secret_file(path, f"the {what} file").strip()
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


def parse_listen(text: str) -> Listen:
    """``ADDR:PORT`` (an IP address or localhost) or ``unix:/absolute/path``."""
    if text.startswith("unix:"):
        path = Path(text.removeprefix("unix:"))
        if not path.is_absolute() or not path.name:
            raise UsageError(f"--listen {text!r}: a Unix socket needs an absolute path", hint="e.g. unix:/run/e.sock")
        return Listen(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {masked(text)!r} is not ADDR:PORT or unix:PATH", hint="e.g. 127.0.0.1:9080")
    bare = host.removeprefix("[").removesuffix("]")
    if bare != "localhost":
        try:
            ipaddress.ip_address(bare)
        except ValueError as exc:
            raise UsageError(
                f"--listen {masked(text)!r}: {masked(host)!r} is not an IP address", hint="e.g. 127.0.0.1:9080"
            ) from exc
    return Listen(host=bare, port=int(port))


def load_ca_cert(path: Path) -> x509.Certificate:
    try:
        cert = load_cert(path)
    except PkiError as exc:
        # A setting of the service, so a usage error: the message already names the file.
        raise UsageError(exc.message, hint=exc.hint) from exc
    problems = ca_problems(cert)
    if problems:
        # Every device would be refused, one 401 at a time: say so once, at start.
        raise UsageError(
            f"--ca {path} cannot vouch for device certificates: {'; '.join(problems)}",
            hint="pass the fleet CA's certificate (PKI/ca-cert.pem)",
        )
    return cert
