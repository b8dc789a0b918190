"""Registry commands: check its invariants, and move it from SQLite to PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from imageprov.cli.options import Json, Pki, RegistryOpt
from imageprov.errors import PkiError
from imageprov.pki.config import CONFIG, RegistryUrl
from imageprov.pki.registry import Registry
from imageprov.pki.registry_admin import check, migrate

registry_app = typer.Typer(
    help="The certificate registry: check it, or move it to PostgreSQL for stations on several hosts.",
    no_args_is_help=True,
)


@registry_app.command("check")
def check_cmd(pki: Pki, registry_url: RegistryOpt = None, json_out: Json = False) -> None:
    """Verify the registry's invariants: one live certificate per device, unique serials and fingerprints,
    consistent states, one certificate per identity pin, the storage itself. Exit 1 on any problem.

    Example: imageprov registry check --pki pki
    """
    with Registry(pki, registry_url) as opened:
        report = check(opened)
    if json_out:
        typer.echo(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, indent=2))
    else:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(report.by_status.items())) or "empty"
        typer.echo(
            f"{report.registry}: schema {report.schema_version}, {report.certificates} certificates ({counts}), "
            f"{report.pins} identity pins"
        )
        for note in report.notes:
            typer.echo(f"note: {note}")
        for problem in report.problems:
            typer.echo(f"problem: {problem}")
    if not report.ok:
        raise PkiError(f"the registry breaks {len(report.problems)} invariant(s)", hint="see the problems above")


@registry_app.command("migrate")
def migrate_cmd(
    pki: Pki,
    to: Annotated[str, typer.Option("--to", metavar="URL", help="The target, e.g. postgresql://db.lan/imageprov.")],
    registry_url: RegistryOpt = None,
    json_out: Json = False,
) -> None:
    """Copy the registry (certificates and identity pins) into another database, made there if it is new, and
    verify every certificate arrived (counts, fingerprints).

    Safe to run again: it copies what is new and moves forward what was delivered or revoked since. Stop
    every station and edge first. The password comes from PGPASSFILE, PGPASSWORD or a service file, never the URL.

    Example: PGPASSFILE=~/.pgpass imageprov registry migrate --pki pki --to postgresql://db.lan/imageprov
    """
    with Registry(pki, registry_url) as source:
        target_url = RegistryUrl.parse(to, base=pki)
        if target_url == source.config.registry:
            raise PkiError("--to names the registry being copied")
        with Registry.at(target_url, timeout=source.config.timeout, create=True) as target:
            report = migrate(source, target)
    if json_out:
        typer.echo(json.dumps(dataclasses.asdict(report), indent=2))
        return
    typer.echo(
        f"{report.target}: {report.copied} copied, {report.updated} moved forward, {report.unchanged} already there; "
        f"verified {report.verified} of {report.verified} certificates by fingerprint; CRL number {report.crl_number}; "
        f"identity pins: {report.pins_copied} copied, {report.pins_updated} moved forward, {report.pins_verified} "
        "verified",
        err=True,
    )
    typer.echo(f'to use it, put [registry] url = "{report.target}" in {pki / CONFIG}', err=True)


def register(app: typer.Typer) -> None:
    """Add the registry commands to the main app."""
    app.add_typer(registry_app, name="registry")
