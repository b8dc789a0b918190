"""The mTLS edge's commands: nginx's configuration, and the service that accepts devices."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from imageprov.cli.options import Pki
from imageprov.edge.config import (
    ENV_CA,
    ENV_DENYLIST,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_UPSTREAM,
    ENV_USERNAME,
    Flags,
    ServeSettings,
)
from imageprov.edge.nginx import EdgeConfig, render_nginx
from imageprov.pki.ca import CA_CERT

edge_app = typer.Typer(help="The mTLS edge in front of the Mender server.", no_args_is_help=True)


@edge_app.command("nginx")
def edge_nginx(
    pki: Pki,
    server_cert: Annotated[
        Path, typer.Option("--server-cert", help="Directory with server-cert.pem and server-private.key.")
    ],
    upstream: Annotated[str, typer.Option("--upstream", help="The Mender server, e.g. https://hosted.mender.io.")],
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT to listen on.")] = "0.0.0.0:443",
    crl_file: Annotated[Optional[Path], typer.Option("--crl", help="CRL to refuse revoked devices with.")] = None,
    accept: Annotated[
        Optional[str],
        typer.Option("--accept", help="Send auth requests to 'imageprov edge serve' at this URL (http://ADDR:PORT)."),
    ] = None,
) -> None:
    """Print an nginx.conf for the mTLS edge (run it with: nginx -p DIR -c FILE).

    Without --accept, a device with a good certificate reaches the Mender
    server and waits there, pending, for someone to accept it. With --accept,
    its auth request goes through 'imageprov edge serve', which preauthorizes
    it, so it is accepted at once.

    Example: imageprov edge nginx --pki pki --server-cert edge --upstream https://hosted.mender.io --accept http://127.0.0.1:9080
    """
    config = EdgeConfig(
        ca_cert=pki / CA_CERT,
        server_cert=server_cert / "server-cert.pem",
        server_key=server_cert / "server-private.key",
        upstream=upstream,
        listen=listen,
        crl=crl_file,
        accept=accept,
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
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT for nginx to send auth requests to.")] = (
        "127.0.0.1:9080"
    ),
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

    Example: imageprov edge serve --pki pki --upstream https://hosted.mender.io --username edge@example.com \
    --password-file /etc/imageprov/edge-password
    """
    flags = Flags(
        pki=pki, ca=ca, upstream=upstream, listen=listen, username=username, password_file=password_file,
        token_file=token_file, crl=crl, denylist=denylist, registry=not no_registry, upstream_ca=upstream_ca,
        timeout=timeout, retry_after=retry_after, cache_size=cache_size,
    )  # fmt: skip
    settings = ServeSettings.from_sources(flags, os.environ)
    # Imported here: aiohttp and prometheus_client are for this command only.
    from aiohttp import web

    from imageprov.edge.http import JsonFormatter, make_app

    app = make_app(settings)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("imageprov.edge")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.info(f"listening on {settings.host}:{settings.port}, Mender server {settings.upstream}")
    # nginx may open a connection per request in a burst: a deep accept queue.
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None, backlog=4096)


def register(app: typer.Typer) -> None:
    app.add_typer(edge_app, name="edge")
