"""The mTLS edge's commands: nginx's configuration, and the service that accepts devices."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from imageprov.cli.ca_token import PinFile
from imageprov.cli.options import PassFile, Pki
from imageprov.edge.config import (
    AMBASSADOR,
    ENV_CA,
    ENV_DENYLIST,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_UPSTREAM,
    ENV_USERNAME,
    Flags,
    IdentityRule,
    ServeSettings,
    upstream_url,
)
from imageprov.edge.nginx import EdgeConfig, render_nginx
from imageprov.errors import ImageprovError, UsageError
from imageprov.pki.ca import CA_CERT, MAX_DAYS

if TYPE_CHECKING:
    from imageprov.edge.artifacts import ArtifactSettings
    from imageprov.edge.est import EstSettings

edge_app = typer.Typer(help="The mTLS edge in front of the Mender server.", no_args_is_help=True)


@edge_app.command("nginx")
def edge_nginx(
    pki: Pki,
    server_cert: Annotated[
        Path, typer.Option("--server-cert", help="Directory with server-cert.pem and server-private.key.")
    ],
    upstream: Annotated[
        Optional[str],
        typer.Option(
            "--upstream",
            help=f"The Mender server, e.g. https://hosted.mender.io (else ${ENV_UPSTREAM}, or "
            f"${AMBASSADOR[ENV_UPSTREAM]}).",
        ),
    ] = None,
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT to listen on.")] = "0.0.0.0:443",
    crl_file: Annotated[Optional[Path], typer.Option("--crl", help="CRL to refuse revoked devices with.")] = None,
    accept: Annotated[
        Optional[str],
        typer.Option(
            "--accept",
            help="'imageprov edge serve' at unix:/PATH (a socket nginx's worker user can write) or http://ADDR:PORT: "
            "it gets the auth requests, and checks every other device request first.",
        ),
    ] = None,
    routes: Annotated[
        Optional[list[str]],
        typer.Option(
            "--route",
            metavar="PREFIX",
            help="Also pass this path prefix to the Mender server (repeatable), e.g. /api/management/v1/useradm/; "
            "with --accept, checked like the device API.",
        ),
    ] = None,
    retry_after: Annotated[
        int, typer.Option("--retry-after", min=0, help="Seconds a device waits after a 503 (the check failed).")
    ] = 5,
    upstream_ca: Annotated[
        Optional[Path],
        typer.Option(
            "--upstream-ca",
            help="CA bundle that verifies an https Mender server, e.g. an on-premises one's private CA "
            "(else Debian's bundle).",
        ),
    ] = None,
    resolvers: Annotated[
        Optional[list[str]],
        typer.Option(
            "--resolver",
            metavar="ADDR[:PORT]",
            help="DNS server nginx asks for the Mender server's name at request time (repeatable; else the "
            "nameservers of /etc/resolv.conf).",
        ),
    ] = None,
    resolve_at_start: Annotated[
        bool,
        typer.Option(
            "--resolve-at-start",
            help="Resolve the Mender server's name once, when nginx starts or reloads: its connections are then "
            "kept alive (nginx 1.22 keeps none to a name resolved per request), but nginx will not start while "
            "DNS is down, and a move needs a reload. An address is always so.",
        ),
    ] = False,
    health_listen: Annotated[
        Optional[str],
        typer.Option(
            "--health-listen",
            help="ADDR:PORT of a plain-HTTP listener, no client certificate, that answers edge serve's /healthz "
            "(readiness) and /livez and nothing else, for a load balancer (needs --accept).",
        ),
    ] = None,
    artifacts: Annotated[
        bool,
        typer.Option(
            "--artifacts",
            help="Send deployments/next and artifact downloads to edge serve, which points artifact links at "
            "the edge (edge serve --artifact-host; needs --accept).",
        ),
    ] = False,
    est: Annotated[
        bool,
        typer.Option(
            "--est",
            help="Send EST's /.well-known/est/cacerts, simpleenroll and simplereenroll to edge serve --est, "
            "where devices enroll with a bootstrap certificate and renew (needs --accept).",
        ),
    ] = False,
) -> None:
    """Print an nginx.conf for the mTLS edge (run it with: nginx -p DIR -c FILE).

    Only the device API (/api/devices/) and the --route prefixes reach the
    Mender server; every other path (the UI, the management API) is 404.
    Without --accept, a device with a good certificate reaches the Mender
    server and waits there, pending, for someone to accept it. With --accept,
    its auth request goes through 'imageprov edge serve', which preauthorizes
    it, so it is accepted at once; and every other request of the device is
    checked by the service first (nginx's auth_request), so that a revoked
    device is cut off at once, without reloading nginx.

    The Mender server's name is resolved at request time (--resolver, else
    /etc/resolv.conf), so nginx starts while DNS is down; an address, or
    --resolve-at-start, gets a pool of kept-alive connections instead.
    Requests to the server carry X-Forwarded-Host and X-Forwarded-Proto.

    Example: imageprov edge nginx --pki pki --server-cert edge --upstream https://hosted.mender.io \
    --accept unix:/run/imageprov/edge.sock --health-listen 0.0.0.0:8081
    """
    config = EdgeConfig(
        ca_cert=pki / CA_CERT,
        server_cert=server_cert / "server-cert.pem",
        server_key=server_cert / "server-private.key",
        upstream=upstream_url(upstream, os.environ),
        listen=listen,
        crl=crl_file,
        accept=accept,
        routes=tuple(routes or ()),
        retry_after=retry_after,
        upstream_ca=upstream_ca,
        resolvers=tuple(resolvers or ()),
        resolve_at_start=resolve_at_start,
        health_listen=health_listen,
        artifacts=artifacts,
        est=est,
    )
    typer.echo(render_nginx(config), nl=False)


@edge_app.command("serve")
def edge_serve(
    pki: Annotated[
        Optional[Path], typer.Option("--pki", help="The PKI directory: its CA, and its registry for revocations.")
    ] = None,
    upstream: Annotated[
        Optional[str], typer.Option("--upstream", help=f"The Mender server (else ${ENV_UPSTREAM}).")
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="Where nginx reaches the service: unix:/run/imageprov/edge.sock, or ADDR:PORT on loopback.",
        ),
    ] = "127.0.0.1:9080",
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a --listen address other hosts can reach. Dangerous: the service believes the "
            "certificate header, so only nginx may reach it (a firewall, a private network).",
        ),
    ] = False,
    identity_rule: Annotated[
        str,
        typer.Option(
            "--identity",
            help="Bind the identity to the certificate: 'pin' (the first identity a certificate presents is "
            "recorded in the registry; afterwards each holds only the other), 'attribute:NAME' (id_data[NAME] "
            "must be the CN), or 'none' (any identity; Mender Gateway's behaviour).",
        ),
    ] = "pin",
    username: Annotated[
        Optional[str], typer.Option("--username", help=f"Mender user that preauthorizes (else ${ENV_USERNAME}).")
    ] = None,
    password_file: Annotated[
        Optional[Path], typer.Option("--password-file", help=f"File holding its password (else ${ENV_PASSWORD}).")
    ] = None,
    token_file: Annotated[
        Optional[Path],
        typer.Option("--token-file", help=f"File holding a personal access token instead (else ${ENV_TOKEN})."),
    ] = None,
    ca: Annotated[
        Optional[Path], typer.Option("--ca", help=f"The fleet CA certificate, without --pki (else ${ENV_CA}).")
    ] = None,
    crl: Annotated[Optional[Path], typer.Option("--crl", help="A CRL of the fleet CA; reread when it changes.")] = None,
    denylist: Annotated[
        Optional[Path],
        typer.Option(
            "--denylist", help=f"Revoked serials in hex, one a line (else ${ENV_DENYLIST}); reread on change."
        ),
    ] = None,
    no_registry: Annotated[
        bool, typer.Option("--no-registry", help="Do not ask the PKI's registry about revocations.")
    ] = False,
    no_revocation: Annotated[
        bool,
        typer.Option(
            "--no-revocation",
            help="Run with no revocation source at all (refused otherwise): a revoked device is accepted.",
        ),
    ] = False,
    recheck: Annotated[
        float,
        typer.Option(
            "--recheck",
            help="Seconds a certificate found in good standing is not asked about again on device routes: "
            "the longest a revocation takes to cut a device off (0: ask every time).",
        ),
    ] = 2.0,
    upstream_ca: Annotated[
        Optional[Path], typer.Option("--upstream-ca", help="CA bundle for an https Mender server (else the system's).")
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--upstream-timeout",
            help="Seconds the Mender server may take to connect or answer; 3x that for a whole request.",
        ),
    ] = 10.0,
    retry_after: Annotated[int, typer.Option("--retry-after", help="Seconds a device waits after a 503.")] = 5,
    cache_size: Annotated[
        int, typer.Option("--cache-size", help="Devices remembered as preauthorized (0: preauthorize every time).")
    ] = 100_000,
    artifact_hosts: Annotated[
        Optional[list[str]],
        typer.Option(
            "--artifact-host",
            metavar="HOST[:PORT]",
            help="Serve artifacts through the edge from this storage host (repeatable; *.DOMAIN for its "
            "subdomains): deployments/next links point at the edge; a link to another host is refused (502).",
        ),
    ] = None,
    artifact_key_file: Annotated[
        Optional[Path],
        typer.Option(
            "--artifact-key-file",
            help="File holding the key that signs artifact links, made (0600) if missing: give every instance "
            "the same file. Without it, a key for this process only.",
        ),
    ] = None,
    artifact_max_age: Annotated[
        # A week at most: a link is a capability; Mender's own storage links live far less.
        float,
        typer.Option("--artifact-max-age", min=1, max=7 * 24 * 3600, help="Seconds an artifact link lives at most."),
    ] = 24 * 3600.0,
    artifact_cache: Annotated[
        Optional[Path],
        typer.Option("--artifact-cache", help="Directory of a disk cache of artifacts shared by devices."),
    ] = None,
    artifact_cache_size: Annotated[
        int, typer.Option("--artifact-cache-size", min=0, help="Bytes the artifact cache holds at most.")
    ] = 10 * 1024**3,
    est: Annotated[
        bool,
        typer.Option(
            "--est",
            help="Enroll devices (EST, RFC 7030, under /.well-known/est/): a bootstrap certificate gets one device "
            "certificate for a key the device made (its TPM's), signed by the PKI's CA (its key file or token), "
            "and a device renews its certificate. Needs --pki and its registry.",
        ),
    ] = False,
    est_days: Annotated[
        int,
        typer.Option(
            "--est-days",
            min=1,
            max=MAX_DAYS,
            help="Validity of the certificates EST issues, in days: a device renews (simplereenroll) before then.",
        ),
    ] = 365,
    passphrase_file: PassFile = None,
    pin_file: PinFile = None,
) -> None:
    """Accept devices with good certificates in the Mender server: the open Mender Gateway.

    For each auth request nginx sends here: the body is Mender's AuthRequest;
    the client certificate chains to the fleet CA, is valid, allows clientAuth
    and is not revoked (registry, --crl, --denylist); the request's pubkey is
    the certificate's key and X-MEN-Signature verifies. Then the device is
    preauthorized upstream and the request passed on unchanged; the server's
    answer (the device's token) goes back as it is. A Mender server that is
    down or slow gives the device 503 and Retry-After. One JSON log line per
    decision on stderr; GET /healthz and /metrics (Prometheus).

    Secrets never go on the command line: --password-file / --token-file, or
    the environment. Mender Gateway's variables work as they are.

    With --est, devices stamped with a bootstrap certificate enroll at first
    boot (EST, RFC 7030, under /.well-known/est/; 'edge nginx --est' routes
    it): the CA of --pki signs a device certificate for the key the device
    made, once per bootstrap certificate, and a device renews its certificate
    (simplereenroll). The CA key's passphrase comes from --passphrase-file or
    $IMAGEPROV_CA_PASSPHRASE; a token's PIN from --pin-file or
    $IMAGEPROV_PKCS11_PIN.

    Example: imageprov edge serve --pki pki --upstream https://hosted.mender.io --username edge@example.com \
    --password-file /etc/imageprov/edge-password
    """
    flags = Flags(
        pki=pki, ca=ca, upstream=upstream, listen=listen, username=username, password_file=password_file,
        token_file=token_file, crl=crl, denylist=denylist, registry=not no_registry, upstream_ca=upstream_ca,
        timeout=timeout, retry_after=retry_after, cache_size=cache_size, identity=identity_rule,
        no_revocation=no_revocation, allow_remote=allow_remote, recheck=recheck,
    )  # fmt: skip
    settings = ServeSettings.from_sources(flags, os.environ)
    artifacts = None
    if artifact_hosts:
        from imageprov.edge.artifacts import ArtifactSettings, load_key, parse_hosts

        artifacts = ArtifactSettings(
            hosts=parse_hosts(artifact_hosts), key=load_key(artifact_key_file), max_age=artifact_max_age,
            cache_dir=artifact_cache, cache_size=artifact_cache_size if artifact_cache else 0,
            key_file=artifact_key_file,
        )  # fmt: skip
    elif artifact_cache or artifact_key_file:
        raise UsageError("--artifact-cache and --artifact-key-file need --artifact-host")
    enrollment = None
    if est:
        if pki is None or no_registry:
            raise UsageError("--est signs with the PKI's CA and records in its registry", hint="pass --pki PKI")
        from imageprov.cli.pki import open_ca
        from imageprov.edge.est import EstSettings

        enrollment = EstSettings(ca=open_ca(pki, passphrase_file, pin_file), days=est_days)
    elif passphrase_file or pin_file:
        raise UsageError("--passphrase-file and --pin-file open the CA's key, which only --est uses")
    run_edge(settings, artifacts, enrollment)


def run_edge(
    settings: ServeSettings, artifacts: ArtifactSettings | None = None, est: EstSettings | None = None
) -> None:
    """Serve until stopped; a start-up failure (the port taken, the registry missing) is one ImageprovError."""
    # Imported here: aiohttp and prometheus_client are for this command only.
    from aiohttp import web

    from imageprov.edge.http import JsonFormatter, make_app

    app = make_app(settings)
    if artifacts is not None:
        from imageprov.edge.artifacts import install

        install(app, artifacts)  # deployments' artifact links rewritten to the edge, their downloads served
    if est is not None:
        from imageprov.edge import est as enrollment

        enrollment.install(app, est)  # EST: bootstrap certificates enroll, devices renew
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("imageprov.edge")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.info(f"listening on {settings.listen}, Mender server {settings.upstream}, identity {settings.identity}")
    if not settings.revocation_checked:
        logger.warning("no revocation source (--no-revocation): a revoked device is accepted")
    if settings.identity.rule is IdentityRule.NONE:
        logger.warning("--identity none: one device's key can enroll any identity and lock real devices out")
    if est is not None:
        logger.info(f"EST enrollment under /.well-known/est/, certificates of {est.days} days")
    if artifacts is not None:
        logger.info(f"artifacts served through the edge from {', '.join(artifacts.hosts)}")
        if artifacts.key_file is None:
            logger.warning("no --artifact-key-file: artifact links signed here work on this instance only")
    if not settings.listen.loopback:
        logger.warning(f"listening on {settings.listen}, reachable from other hosts (--allow-remote)")
    try:
        if settings.listen.path is not None:
            with unix_socket(settings.listen.path) as sock:
                web.run_app(app, sock=sock, print=None, access_log=None, backlog=4096)
        else:
            # nginx may open a connection per request in a burst: a deep accept queue.
            web.run_app(app, host=settings.listen.host, port=settings.listen.port, print=None, access_log=None,
                        backlog=4096)  # fmt: skip
    except OSError as exc:
        raise ImageprovError(f"edge serve cannot listen on {settings.listen}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def unix_socket(path: Path) -> Iterator[socket.socket]:
    """A listening Unix socket at ``path`` (a stale one from a killed service replaced), removed after.

    Mode 0666: nginx's workers run as another user (nobody, www-data) and must connect. The
    directory guards it: keep it where only nginx's user can search (systemd: RuntimeDirectory
    with RuntimeDirectoryMode=0750 and nginx's group), since whoever connects is believed about
    the certificate."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        if path.is_socket():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # nobody listens there: left by a service that was killed
            else:
                raise ImageprovError(f"another service already listens on unix:{path}")
            finally:
                probe.close()
        sock.bind(str(path))
        bound = True
        os.chmod(path, 0o666)
        sock.listen(4096)
        yield sock
    finally:
        sock.close()
        if bound:
            path.unlink(missing_ok=True)


def register(app: typer.Typer) -> None:
    app.add_typer(edge_app, name="edge")
