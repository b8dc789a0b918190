"""A real PostgreSQL for tests: initdb in a temporary directory, run as ``nobody``, on a Unix socket only.

Never the system's cluster: the server listens on no TCP port, and its data,
socket and log live in a directory made for it and removed afterwards. Clients
authenticate with SCRAM and find the password in ``PGPASSFILE``, as stations
on a line would: the password is never in a URL or an argv.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI

USER = "imageprov"  # the database role
PASSWORD = "pg test password 7"
OS_USER = "nobody"  # initdb refuses root


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def need_postgres() -> Path:
    """Skip (fail in CI) unless Debian's postgresql and runuser are installed and we are root."""
    found = pg_bin()
    problem = None
    if found is None:
        problem = "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin (apt install postgresql)"
    elif os.geteuid() != 0 or shutil.which("runuser") is None:
        problem = "starting PostgreSQL as an unprivileged user needs root and runuser"
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    assert found is not None
    return found


class Postgres:
    """One PostgreSQL cluster in its own temporary directory."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = need_postgres()
        # Not under pytest's tmp_path: its 0700 parents keep nobody out.
        self.root = Path(tempfile.mkdtemp(prefix="imageprov-pg-"))
        self.data = self.root / "data"
        self.socket = self.root / "run"
        self.passfile = self.root / "pgpass"
        self.log = self.root / "server.log"
        self.socket.mkdir()
        nobody = pwd.getpwnam(OS_USER)
        os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        os.chown(self.socket, nobody.pw_uid, nobody.pw_gid)
        pwfile = self.root / "initdb-password"
        pwfile.write_text(PASSWORD + "\n")
        os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        self._as_nobody(
            "initdb", "-D", self.data, "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync",
            "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        pwfile.unlink()
        settings = [f"unix_socket_directories = '{self.socket}'", "listen_addresses = ''", "max_connections = 40"]
        if not durable:  # tests only: nothing here must survive a crash of the machine
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(settings) + "\n")
        # Clients (root, the stations) read the password from here, as libpq does on a line.
        self.passfile.write_text(f"*:*:*:{USER}:{PASSWORD}\n")
        self.passfile.chmod(0o600)
        self.start()

    def _as_nobody(self, program: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        argv = ["runuser", "-u", OS_USER, "--", str(self.bin / program), *map(str, args)]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(f"{program} failed: {proc.stdout}{proc.stderr}{log}")
        return proc

    def start(self) -> None:
        self._as_nobody("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_nobody("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "120", "stop")

    def env(self) -> dict[str, str]:
        """What a station's environment needs to log in: the password file, nothing in the URL."""
        return {"PGPASSFILE": str(self.passfile)}

    def url(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.socket}&user={USER}"

    def create_database(self, name: str) -> str:
        """A new empty database; return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, passfile=str(self.passfile)) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple[object, ...]]:
        """Rows from ``sql``, read with psycopg directly (not through imageprov)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, passfile=str(self.passfile)) as conn:
            cursor = conn.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(*, durable: bool = False) -> Iterator[Postgres]:
    """A cluster for the duration of the block, with PGPASSFILE pointing at its password for the CLI too."""
    server = Postgres(durable=durable)
    saved = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(server.passfile)
    try:
        yield server
    finally:
        if saved is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = saved
        server.remove()


@dataclass(frozen=True)
class Db:
    """The registry a test runs against: SQLite in the PKI, or a fresh database on a test cluster."""

    kind: str  # "sqlite" or "postgresql"
    server: Postgres | None = None
    database: str = ""

    @classmethod
    def make(cls, kind: str, server: Postgres | None) -> Db:
        if kind == "sqlite":
            return cls(kind)
        assert server is not None
        name = f"t_{uuid.uuid4().hex[:12]}"
        server.create_database(name)
        return cls(kind, server, name)

    def url(self, pki: Path) -> str:
        return f"sqlite://{pki / 'registry.sqlite'}" if self.server is None else self.server.url(self.database)

    def configure(self, pki: Path, *, timeout: float | None = None) -> None:
        """Write PKI/imageprov.toml so that every command finds this registry."""
        lines = ["[registry]", f'url = "{self.url(pki)}"']
        if timeout is not None:
            lines.append(f"timeout = {timeout}")
        (pki / "imageprov.toml").write_text("\n".join(lines) + "\n")

    def rows(self, pki: Path, sql: str) -> list[tuple[object, ...]]:
        """Query the registry directly (sqlite3, psycopg), not through imageprov."""
        if self.server is None:
            with contextlib.closing(sqlite3.connect(pki / "registry.sqlite")) as db:
                return list(db.execute(sql).fetchall())
        return self.server.query(self.database, sql)

    def execute(self, pki: Path, sql: str) -> None:
        """Change the registry behind imageprov's back (to plant what a check must find)."""
        if self.server is None:
            with contextlib.closing(sqlite3.connect(pki / "registry.sqlite")) as db:
                db.executescript(sql)
        else:
            self.server.query(self.database, sql)
