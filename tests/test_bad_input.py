"""Every option that takes a number, a URL, a file or a secret, on every command, fed the values that broke it.

The options are not listed here: each command's ``--help`` lists them, and the
test reads it. Each option's type (``<int>``, ``<float>``, ``<path>``, or a
text option this file names as a URL) says which bad values it gets:

- numbers: ``99999999`` (past every date a certificate or a CRL can carry), ``-1``,
  ``1e400``, ``nan`` and ``inf``;
- URLs: an unclosed ``[`` (``postgresql://u@[::1/x``, ``https://[::1``, ``http://[x``), and
  URLs with a password in them, in URL and in libpq's ``key=value`` form;
- files: missing, a directory, empty, not UTF-8; directories: missing, a file, an
  empty one; outputs: a file under a missing directory or where a directory is, a
  directory where a file is (a missing one is made);
- secrets (the files holding passphrases, PINs, passwords): the same, a
  wrong one, and one far too large (/dev/zero read by mistake).

Each run starts from an invocation of the command that succeeds, with the one
option changed, and must end in one line on stderr (``imageprov: error: ...``),
exit status 2 (usage) or 1 (runtime), no traceback, and none of the secrets
used anywhere in its output.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imageprov.disk.golden import GoldenSpec, Scheme, build_golden
from tests.conftest import IMAGEPROV_ARGV, PASSPHRASE, cli_env, imageprov_pki, need
from tests.flashdev import Loops, need_root

# Every secret a case puts anywhere: none may come back in any output.
SECRETS = ("SECRET-URL-1", "SECRET-URL-2", "SECRET-URL-3", "SECRET-FILE-4", "SECRET-URL-5", PASSPHRASE)

NUMBERS = ("99999999", "-1", "1e400", "nan", "inf")
URLS = (
    "postgresql://u@[::1/x",
    "https://[::1",
    "http://[x",
    "host=h password=SECRET-URL-1",
    "postgresql://u:SECRET-URL-2@db.test/imageprov",
    "https://u:SECRET-URL-3@mender.test",
    "postgresql://db.test/imageprov?sslmode=require&password=SECRET-URL-5",
)

# Text options that are URLs (or an address, or a URI): they get URLS. Every other text option must be named
# in TEXT, so that a new option is classified, not forgotten.
URL_OPTIONS = {
    "--registry", "--to", "--upstream", "--accept", "--listen", "--server-url", "--pkcs11", "--health-listen",
    "--resolver", "--enroll",
}  # fmt: skip
TEXT = {
    "--device-id", "--target", "--wait-for", "--tenant-token", "--rootfs-parts", "--mode", "--owner", "--boot-fs",
    "--cn", "--org", "--ou", "--email", "--country", "--locality", "--state", "--serial", "--host", "--ip",
    "--username", "--identity", "--route", "--artifact-host",
}  # fmt: skip
# Files holding a secret: they also get a wrong secret and a huge file.
SECRET_FILES = {"--passphrase-file", "--key-passphrase-file", "--pin-file", "--password-file", "--token-file"}
# Where no secret is wrong: a Mender password is tried at the first device, a PIN only by a token, and ca init and
# ca import take --passphrase-file as the new key's passphrase.
NO_WRONG_SECRET = {
    ("edge serve", "--password-file"), ("edge serve", "--token-file"), ("ca init", "--passphrase-file"),
    ("ca import", "--passphrase-file"), ("ca init", "--pin-file"), ("ca import", "--pin-file"),
}  # fmt: skip
# Paths written, not read: they get other bad values.
OUTPUT_FILES = {("crl", "--out"), ("denylist", "--out"), ("flash", "--log")}
OUTPUT_DIRS = {("stamp", "--out"), ("server-cert", "--out"), ("device-cert", "--out"), ("flash", "--scratch")}
INPUT_DIRS = {"--pki", "--server-cert"}

# A bad value that is a good one for this option: a large cache is a setting, not a mistake.
ACCEPTED = {("edge serve", "--cache-size", "99999999"), ("edge serve", "--artifact-cache-size", "99999999")}
# An empty file that is a good one: a denylist before anything was revoked.
EMPTY_IS_GOOD = {("edge serve", "--denylist")}

_ROW = re.compile(r"^│\s+(?:\*\s+)?(?P<name>--[a-z0-9-]+)(?:\s+-[a-z])?\s+(?P<type><[^>]*>|[A-Z]+)")


def options_of(command: str) -> dict[str, str]:
    """Every option ``command --help`` lists, with the type it shows (``<int>``, ``<path>``, ``URL`` ...)."""
    proc = subprocess.run(
        [*IMAGEPROV_ARGV, *command.split(), "--help"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400", "TERM": "dumb"}, check=True,
    )  # fmt: skip
    found = {m["name"]: m["type"] for m in map(_ROW.match, proc.stdout.splitlines()) if m}
    found.pop("--help", None)
    assert found, f"no options read from {command} --help:\n{proc.stdout}"
    return found


def commands() -> list[str]:
    """Every command ``imageprov --help`` lists, subcommands of groups included."""
    names = []
    for group in ("", "ca", "registry", "edge"):
        proc = subprocess.run(
            [*IMAGEPROV_ARGV, *group.split(), "--help"],
            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", "TERM": "dumb"}, check=True,
        )  # fmt: skip
        section = proc.stdout.split("Commands")[1]
        names += [f"{group} {m}".strip() for m in re.findall(r"^│ ([a-z][a-z-]*)\s", section, re.MULTILINE)]
    return [n for n in names if n not in ("ca", "registry", "edge")]


@dataclass
class World:
    """What every command's good invocation needs, made once: a PKI, a golden image, a stamped one, files."""

    root: Path
    pki: Path = field(init=False)
    golden: Path = field(init=False)
    stamped: Path = field(init=False)
    server: Path = field(init=False)
    local: Path = field(init=False)
    passphrase: Path = field(init=False)
    password: Path = field(init=False)
    card: Path | None = None
    _count: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.pki = self.root / "pki"
        imageprov_pki("ca", "init", self.pki, "--cn", "Bad Input CA")
        self.golden = build_golden(self.root / "golden.sdimg", GoldenSpec(Scheme.MBR, rootfs_mib=16, data_mib=16))
        imageprov_pki("stamp", self.golden, "--pki", self.pki, "--out", self.root / "stamped", "--device-id", "S-1")
        self.stamped = self.root / "stamped" / "S-1.sdimg"
        imageprov_pki("server-cert", "--pki", self.pki, "--host", "edge.test", "--out", self.root / "server")
        self.server = self.root / "server"
        self.local = self.root / "local.txt"
        self.local.write_text("hello\n")
        self.passphrase = self.root / "passphrase"
        self.passphrase.write_text(PASSPHRASE + "\n")
        self.password = self.root / "password"
        self.password.write_text("mender password\n")

    def fresh(self) -> Path:
        """A new empty directory."""
        path = self.root / f"run-{next(self._count)}"
        path.mkdir()
        return path

    def unique(self) -> str:
        return f"B-{next(self._count)}"

    def copy_of_golden(self) -> Path:
        copy = self.fresh() / "copy.sdimg"
        subprocess.run(["cp", "--sparse=always", self.golden, copy], check=True)
        return copy

    def base(self, command: str) -> list[str | Path]:
        """An invocation of ``command`` that succeeds (``edge serve``: that starts)."""
        pki, ca = self.pki, self.pki / "ca-cert.pem"
        out = self.fresh()
        bases: dict[str, Callable[[], list[str | Path]]] = {
            "inspect": lambda: [self.golden],
            "ls": lambda: [f"{self.golden}:/data"],
            "cat": lambda: [f"{self.golden}:/etc/mender/mender.conf"],
            "cp": lambda: [self.local, f"{self.copy_of_golden()}:/data/hello.txt"],
            "golden": lambda: [out / "g.sdimg", "--rootfs-mib", "16", "--data-mib", "16"],
            "prepare": lambda: [self.copy_of_golden()],
            "stamp": lambda: [self.golden, "--pki", pki, "--out", out, "--device-id", self.unique()],
            "verify": lambda: [self.stamped, "--ca", ca, "--device-id", "S-1"],
            "server-cert": lambda: ["--pki", pki, "--host", "edge.test", "--out", out],
            "device-cert": lambda: ["--pki", pki, "--device-id", self.unique(), "--out", out],
            "revoke": lambda: ["--pki", pki, "--stale"],
            "crl": lambda: ["--pki", pki, "--out", out / "crl.pem"],
            "denylist": lambda: ["--pki", pki, "--out", out / "denylist.txt"],
            "devices": lambda: ["--pki", pki],
            "flash": lambda: [self.golden, "--pki", pki, "--target", f"{self.need_card()}={self.unique()}"],
            "ca init": lambda: [out / "pki", "--cn", "Another CA"],
            "ca import": lambda: [
                out / "pki",
                "--cert",
                ca,
                "--key",
                pki / "ca-private.key",
                "--key-passphrase-file",
                self.passphrase,
            ],
            "registry check": lambda: ["--pki", pki],
            "registry migrate": lambda: ["--pki", pki, "--to", f"sqlite://{out}/copy.sqlite"],
            "edge nginx": lambda: ["--pki", pki, "--server-cert", self.server, "--upstream", "https://mender.test"],
            "edge serve": lambda: [
                "--pki",
                pki,
                "--upstream",
                "https://mender.test",
                "--listen",
                f"unix:{out}/edge.sock",
                "--username",
                "edge",
                "--password-file",
                self.password,
            ],
        }
        return bases[command]()

    def need_card(self) -> Path:
        if self.card is None:
            need_root()
            raise AssertionError("flash's cases need the world's card")
        return self.card


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    need("sfdisk", "mkfs.vfat", "mke2fs", "debugfs", "e2fsck")
    made = World(tmp_path_factory.mktemp("bad-input"))
    loops = Loops(made.root)
    try:
        if os.geteuid() == 0 and shutil.which("losetup"):
            made.card = loops.card(made.golden.stat().st_size)
        yield made
    finally:
        loops.close()


@dataclass(frozen=True)
class BadFiles:
    missing: Path
    directory: Path
    empty: Path
    not_utf8: Path
    wrong_secret: Path
    huge: Path
    a_file: Path


def bad_files(root: Path) -> BadFiles:
    """Made anew for each case: a case that wrongly succeeds must not change what the next one is fed."""
    (root / "a-directory").mkdir()
    (root / "empty").write_bytes(b"")
    (root / "not-utf8").write_bytes(b"\xff\xfe\x00[registry]\n\xc3\x28 url = \x80\n")
    (root / "wrong-secret").write_text("SECRET-FILE-4\n")
    (root / "huge").write_bytes(b"A" * (70 * 1024))
    (root / "a-file").write_text("not a directory\n")
    return BadFiles(root / "missing", root / "a-directory", root / "empty", root / "not-utf8",
                    root / "wrong-secret", root / "huge", root / "a-file")  # fmt: skip


def bad_values(command: str, option: str, kind: str, files: BadFiles) -> list[str]:
    """The values ``option`` of ``command`` is fed, by what it takes."""
    if kind in ("<int>", "<float>") or kind.startswith(("<int range>", "<float range>")):
        return [v for v in NUMBERS if (command, option, v) not in ACCEPTED]
    if kind == "<path>":
        if (command, option) in OUTPUT_FILES:
            return [str(files.missing / "out"), str(files.directory)]
        if (command, option) in OUTPUT_DIRS:  # made if missing, parents too: only a file is in the way
            return [str(files.a_file)]
        if option in INPUT_DIRS:
            return [str(files.missing), str(files.a_file), str(files.directory)]
        values = [files.missing, files.directory, files.not_utf8]
        values += [] if (command, option) in EMPTY_IS_GOOD else [files.empty]
        if option in SECRET_FILES:
            values += [files.huge] + ([] if (command, option) in NO_WRONG_SECRET else [files.wrong_secret])
        return [str(v) for v in values]
    if kind in ("<str>", "URL", "URI"):
        assert option in URL_OPTIONS | TEXT, f"{command} {option}: a new text option; is it a URL? (URL_OPTIONS)"
        return list(URLS) if option in URL_OPTIONS else []
    return []  # flags and choices: click checks those


def with_option(argv: list[str | Path], option: str, value: str) -> list[str | Path]:
    """``argv`` with ``option`` set to ``value``: in place of its value if it has one, else added."""
    if option in argv:
        at = argv.index(option)
        return [*argv[: at + 1], value, *argv[at + 2 :]]
    return [*argv, option, value]


def run(command: str, argv: list[str | Path], *, serve: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, the CA's passphrase in the environment; ``edge serve`` under a bound."""
    try:
        return subprocess.run(
            [*IMAGEPROV_ARGV, *command.split(), *map(str, argv)],
            capture_output=True, text=True, env=cli_env(), stdin=subprocess.DEVNULL, timeout=60 if serve else 600,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{command} {argv} took the bad value and kept running") from exc


def check_one_line(command: str, argv: list[str | Path], proc: subprocess.CompletedProcess[str]) -> None:
    said = f"imageprov {command} {' '.join(map(str, argv))}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode in (1, 2), said
    assert "Traceback" not in proc.stderr + proc.stdout, said
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imageprov: error: "), said
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr, f"{secret} shown:\n{said}"


def check_base_works(world: World, command: str) -> None:
    argv = world.base(command)
    if command != "edge serve":
        proc = run(command, argv)
        assert proc.returncode == 0, f"imageprov {command} {argv}: {proc.stderr}"
        return
    # It runs until stopped: started is what "works" means here, its socket made.
    socket = Path(str(argv[argv.index("--listen") + 1]).removeprefix("unix:"))
    server = subprocess.Popen([*IMAGEPROV_ARGV, "edge", "serve", *map(str, argv)], env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not socket.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "edge serve did not start"
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(60)


def test_every_command_is_covered() -> None:
    """The commands this file knows how to start are the ones imageprov has: a new one needs a good invocation."""
    assert sorted(commands()) == sorted(COMMANDS)


COMMANDS = [
    "inspect", "ls", "cat", "cp", "golden", "prepare", "stamp", "verify", "server-cert", "device-cert", "revoke",
    "crl", "denylist", "devices", "flash", "ca init", "ca import", "registry check", "registry migrate",
    "edge nginx", "edge serve",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_bad_number_url_file_and_secret_is_one_line(world: World, command: str) -> None:
    if command == "flash" and world.card is None:
        need_root()  # skips here, fails in CI
    check_base_works(world, command)
    # The same names in every case's own directory: (option, index of the value).
    template = bad_files(world.fresh())
    cases = [
        (option, kind, index)
        for option, kind in options_of(command).items()
        for index, _ in enumerate(bad_values(command, option, kind, template))
    ]
    assert cases, command
    failures = []
    for option, kind, index in cases:
        value = bad_values(command, option, kind, bad_files(world.fresh()))[index]
        argv = with_option(world.base(command), option, value)
        try:
            check_one_line(command, argv, run(command, argv, serve=command == "edge serve"))
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n\n" + "\n\n".join(failures)
