"""The documentation cannot drift from the CLI: its runnable blocks run, and every option it shows exists.

docs/README.md ("Writing these docs") is the writers' side of this file: a fenced
block whose info string is ``sh runnable`` runs here with ``bash -euo pipefail`` in
a temporary directory holding a fresh sample (a golden image, ids, a PKI); every
``imageprov`` command line in any fenced block, and in inline code, names a command
whose ``--help`` runs and shows each long option the line uses. Relative links
and their anchors resolve in every Markdown file of the repository.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageprov.disk.golden import DEFAULT_MENDER_CONF, GoldenSpec, RootfsB, Scheme, build_golden
from tests.conftest import IMAGEPROV_ARGV, SBIN, cli_env, need

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# The pages whose commands are run and checked.
DOC_PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
# The readers' pages: each shows at least one block that runs.
READER_PAGES = ("operator.md", "build-engineer.md", "fleet-admin.md")

RUNNABLE, NO_PKI = "runnable", "no-pki"
MARKS = frozenset({RUNNABLE, NO_PKI})
SHELLS = frozenset({"sh", "bash", "shell"})
BLOCK_TIMEOUT = 600  # seconds; a block that takes longer is not documentation

SAMPLE_IDS = ("SN-0001", "SN-0002", "SN-0003")
SAMPLE_SERVER_URL = "https://edge.acme.com"
SAMPLE_CA = ("--cn", "ACME Fleet CA", "--org", "ACME", "--country", "NO")

# The bare word imageprov as a command (not /etc/imageprov, imageprov.toml, imageprov-edge, $imageprov).
BARE_IMAGEPROV = re.compile(r"(?<![\w./$-])imageprov(?![\w./-])")
LONG_OPTION = re.compile(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)")
# Tokens that end one command of a shell line; after "|", an option continues a synopsis ("ID | --serial HEX").
SEPARATORS = frozenset({"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>"})
# Words that are not tools to look for on PATH.
SHELL_WORDS = frozenset({
    "!", "[", "[[", "{", "}", "case", "cd", "do", "done", "echo", "elif", "else", "esac", "exec", "export",
    "false", "fi", "for", "if", "in", "local", "printf", "read", "set", "test", "then", "true", "unset",
    "until", "while", "imageprov",
})  # fmt: skip


def checkout_env(**extra: str) -> dict[str, str]:
    """tests/conftest.py's environment (the test CA's passphrase), importing imageprov from this checkout
    whatever the directory a command runs in (a block's own, where ``-m imageprov`` would find an install)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path, **extra)


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, from 1
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def marks(self) -> frozenset[str]:
        return frozenset(self.info.split()[1:])

    @property
    def runnable(self) -> bool:
        return RUNNABLE in self.marks


_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def _blocks_and_prose(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``path`` (CommonMark's rules: a fence closes with its own kind, at least as long),
    and its lines with every block's lines blanked (so that line numbers stay)."""
    lines = path.read_text().splitlines()
    blocks, prose = [], list(lines)
    opened: tuple[int, str, str, int] | None = None  # line index, fence, info, indent
    body: list[str] = []
    for index, line in enumerate(lines):
        if opened is None:
            match = _FENCE.match(line)
            if match:
                opened = (index, match["fence"], match["info"].strip(), len(match["indent"]))
                body = []
                prose[index] = ""
            continue
        prose[index] = ""
        start, fence, info, indent = opened
        stripped = line.strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            blocks.append(Block(path, start + 1, info, "\n".join(body) + "\n"))
            opened = None
            continue
        # Content indented like its fence (a block inside a list item) loses that indent.
        body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
    assert opened is None, f"{path.relative_to(REPO)}:{opened[0] + 1}: a fenced block is never closed"
    return blocks, prose


def blocks_of(path: Path) -> list[Block]:
    return _blocks_and_prose(path)[0]


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each inline code span outside fenced blocks that starts with ``imageprov ``."""
    prose = "\n".join(_blocks_and_prose(path)[1])
    found = []
    for match in re.finditer(r"(?<!`)`(imageprov [^`]+)`(?!`)", prose):
        found.append((prose.count("\n", 0, match.start()) + 1, match[1].replace("\n", " ")))
    return found


def all_blocks() -> list[Block]:
    return [block for page in DOC_PAGES for block in blocks_of(page)]


def runnable_blocks() -> list[Block]:
    return [block for block in all_blocks() if block.runnable]


# --- Command lines in the docs ---------------------------------------------------------------------------


def logical_lines(text: str, first_line: int = 1) -> list[tuple[int, str]]:
    """(line number, line) with backslash continuations joined."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, line in enumerate(text.splitlines()):
        number = first_line + offset
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.lstrip()
            pending = None
        if line.endswith("\\"):
            pending = (number, line[:-1])
            continue
        joined.append((number, line))
    if pending is not None:
        joined.append(pending)
    return joined


def _without_comment(line: str) -> str:
    """The line up to a shell comment: a ``#`` that starts a word outside quotes (not ``PKCS#11``)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def _tokens(line: str) -> list[str]:
    """A shell line's words, comments dropped; a line shlex cannot read (a quote in prose) is split plainly."""
    code = _without_comment(line)
    try:
        return shlex.split(code)
    except ValueError:
        return code.split()


def _is_imageprov(token: str) -> bool:
    """``imageprov`` as a command word: bare, installed (``/usr/local/bin/imageprov``), or ``ExecStart=...``."""
    key, _, value = token.partition("=") if re.match(r"^[A-Za-z_]\w*=", token) else ("", "", token)
    substituted = value.startswith(("$(", "`"))  # serial=$(imageprov ...)
    value = value.lstrip("$(`")
    if key and not key.startswith("Exec") and not substituted:
        return False  # Description=imageprov edge serve: ... is prose
    return value == "imageprov" or value.endswith("/bin/imageprov")


def invocations(line: str) -> list[list[str]]:
    """The arguments of each ``imageprov`` command on a shell line."""
    tokens = _tokens(line)
    found = []
    for index, token in enumerate(tokens):
        if not _is_imageprov(token):
            continue
        args: list[str] = []
        rest = tokens[index + 1 :]
        for position, word in enumerate(rest):
            if word in SEPARATORS or word.startswith((">", "2>")):
                if word == "|" and position + 1 < len(rest) and rest[position + 1].lstrip("[").startswith("--"):
                    continue  # a synopsis's alternative: "ID | --serial HEX"
                break
            end = word.endswith((";", ")")) and not word.startswith("(")
            args.append(word.rstrip(";)") if end else word)
            if end:
                break
        found.append(args)
    return found


# --- The CLI's own --help --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Help:
    ok: bool
    text: str
    options: frozenset[str]
    commands: frozenset[str]


def _panel_rows(text: str, title: str) -> list[str]:
    """The rows of one of rich's boxed panels ("Options", "Commands") in typer's help, without the frame."""
    rows, inside = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("╭"):
            inside = stripped.startswith(f"╭─ {title} ")
            continue
        if stripped.startswith("╰"):
            inside = False
            continue
        if inside and stripped.startswith("│"):
            rows.append(stripped.strip("│").rstrip())
    return rows


def parse_help(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """(long options, subcommands) of one command's ``--help``, from the names column of its panels only:
    an option merely mentioned in a description does not count."""
    options: set[str] = set()
    for row in _panel_rows(text, "Options"):
        if not re.match(r"^ {0,6}(\* +)?-", row):
            continue  # a description wrapped onto the next row
        fields = re.split(r" {2,}", row.strip())
        for field in fields[1:] if fields[0] == "*" else fields:  # "*": a required option
            if not re.fullmatch(r"--?[\w-]+(?:[ ,/]+--?[\w-]+)*", field):
                break  # the metavar column: the names are over
            options.update(LONG_OPTION.findall(field))
    commands = {
        m[1] for row in _panel_rows(text, "Commands") if (m := re.match(r"^ {0,3}([a-z][\w-]*)(?: {2,}|$)", row))
    }
    return frozenset(options), frozenset(commands)


@functools.cache
def cli_help(*path: str) -> Help:
    """``imageprov PATH... --help``, run as a user would, wide enough that no option name wraps."""
    env = checkout_env(COLUMNS="250", NO_COLOR="1", TERM="dumb")
    proc = subprocess.run([sys.executable, "-m", "imageprov", *path, "--help"], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
    options, commands = parse_help(proc.stdout)
    return Help(proc.returncode == 0, proc.stdout + proc.stderr, options, commands)


def check_invocation(args: list[str]) -> list[str]:
    """What is wrong with ``imageprov ARGS`` as far as the CLI's ``--help`` tells: a missing command or option."""
    path: list[str] = []
    words = [w.strip("[]") for w in args]
    index = 0
    while True:
        shown = " ".join(["imageprov", *path])
        helped = cli_help(*path)
        if not helped.ok:
            return [f"'{shown} --help' fails: {helped.text.strip()[-300:]}"]
        if not helped.options:
            return [f"'{shown} --help' shows no options: cannot read it ({helped.text.strip()[:200]!r})"]
        if not helped.commands:
            break  # a command: the rest are its arguments and options
        while index < len(words) and words[index].startswith("-"):
            option = words[index].split("=", 1)[0]
            if option.startswith("--") and option not in helped.options:
                return [f"{shown}: no option {option}"]
            index += 1
        if index >= len(words) or words[index] in ("", "..."):
            return []  # the group alone ("imageprov ca")
        name = words[index]
        if name not in helped.commands:
            return [f"{shown}: no command {name!r} (it has: {', '.join(sorted(helped.commands))})"]
        path.append(name)
        index += 1
    shown = " ".join(["imageprov", *path])
    problems = []
    for word in words[index:]:
        for option in LONG_OPTION.findall(word.split("=", 1)[0] if word.startswith("--") else word):
            if option not in helped.options:
                problems.append(f"{shown}: no option {option} (not in '{shown} --help')")
    return problems


def command_lines(page: Path) -> list[tuple[str, list[str]]]:
    """(where, args) of every ``imageprov`` command shown on ``page``: fenced blocks and inline code."""
    found = []
    for block in blocks_of(page):
        for number, line in logical_lines(block.text, block.line + 1):
            found += [(f"{page.relative_to(REPO)}:{number}", args) for args in invocations(line)]
    for number, text in inline_commands(page):
        found += [(f"{page.relative_to(REPO)}:{number}", args) for args in invocations(text)]
    return found


# --- Running a block -------------------------------------------------------------------------------------


def tools_of(block: Block) -> list[str]:
    """The external commands a block runs (the first word of each command), for need()."""
    tools: list[str] = []
    for _, line in logical_lines(block.text):
        tokens = _tokens(line)
        starts = [0] + [i + 1 for i, t in enumerate(tokens) if t in SEPARATORS - {">", ">>", "<", "2>", "2>&1", "&>"}]
        for start in starts:
            words = [t for t in tokens[start:] if not re.match(r"^[A-Za-z_]\w*=", t)]
            if not words:
                continue
            word = words[0]
            if word not in SHELL_WORDS and "/" not in word and "$" not in word and word not in tools:
                tools.append(word)
    return tools


def make_sample(work: Path, *, with_pki: bool) -> None:
    """The sample every runnable block starts from (docs/README.md lists it)."""
    need("sfdisk", "mkfs.vfat", "mke2fs")
    conf = {**DEFAULT_MENDER_CONF, "ServerURL": SAMPLE_SERVER_URL}
    spec = GoldenSpec(scheme=Scheme.MBR, boot_fs="ext4", rootfs_b=RootfsB.EMPTY_EXT4, split_conf=True,
                      mender_conf=json.dumps(conf, indent=2) + "\n")  # fmt: skip
    build_golden(work / "golden.sdimg", spec)
    (work / "serials.txt").write_text("".join(f"{i}\n" for i in SAMPLE_IDS))
    (work / "serials.csv").write_text("device_id,batch\n" + "".join(f"{i},1\n" for i in SAMPLE_IDS))
    if with_pki:
        proc = subprocess.run([*IMAGEPROV_ARGV, "ca", "init", "pki", *SAMPLE_CA], cwd=work,
                              capture_output=True, text=True, env=checkout_env(), stdin=subprocess.DEVNULL)  # fmt: skip
        assert proc.returncode == 0, proc.stderr


def shell_script(block: Block) -> str:
    """The block as bash runs it: the bare word imageprov is this interpreter's imageprov."""
    return BARE_IMAGEPROV.sub(f"{shlex.quote(sys.executable)} -m imageprov", block.text)


def block_env(tmp_path: Path) -> dict[str, str]:
    """The CA passphrase as tests/conftest.py gives it; PATH first finds a guard against a bare imageprov."""
    guard = tmp_path / "guard"
    guard.mkdir()
    shim = guard / "imageprov"
    shim.write_text("#!/bin/sh\necho 'docs test: a bare imageprov reached PATH (not replaced in the block)' >&2\n"
                    "exit 127\n")  # fmt: skip
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = checkout_env(PATH=os.pathsep.join([str(guard), os.environ.get("PATH", ""), SBIN]), TMPDIR=str(scratch),
                  LANG="C.UTF-8")  # fmt: skip
    # A token a block sets up is its own: nothing of the caller's reaches it.
    for name in ("IMAGEPROV_PKCS11_PIN", "IMAGEPROV_PKCS11_MODULE", "SOFTHSM2_CONF"):
        env.pop(name, None)
    return env


# --- The tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.where)
def test_runnable_block_runs(block: Block, tmp_path: Path) -> None:
    need("bash", *tools_of(block))
    work = tmp_path / "work"
    work.mkdir()
    make_sample(work, with_pki=NO_PKI not in block.marks)
    script = shell_script(block)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=block_env(tmp_path),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=BLOCK_TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, (
        f"{block.where}: the block failed (exit {proc.returncode}):\n{script}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_and_option_shown_exists(page: Path) -> None:
    problems = [f"{where}: {problem}" for where, args in command_lines(page) for problem in check_invocation(args)]
    assert not problems, "\n".join(problems)


def test_the_docs_show_commands_to_check() -> None:
    """The extraction itself works: the pages show many imageprov commands, and the CLI's groups are found."""
    shown = [args for page in DOC_PAGES for _, args in command_lines(page)]
    assert len(shown) > 50, len(shown)
    assert {"ca", "edge", "registry", "stamp", "flash"} <= cli_help().commands
    assert "--pki" in cli_help("stamp").options and "--wait-for" in cli_help("flash").options


def test_block_marks_are_known() -> None:
    """A misspelt mark ("runable") would leave a block unrun: only a language, runnable and no-pki are taken."""
    problems = []
    for block in all_blocks():
        unknown = block.marks - MARKS
        if unknown:
            problems.append(f"{block.where}: unknown mark(s) {sorted(unknown)} in {block.info!r}")
        if NO_PKI in block.marks and not block.runnable:
            problems.append(f"{block.where}: {NO_PKI} without {RUNNABLE}")
        if block.runnable and block.language not in SHELLS:
            problems.append(f"{block.where}: a runnable block is a shell block (sh), not {block.language!r}")
        if block.runnable and ("..." in block.text or re.search(r"\[--", block.text)):
            problems.append(f"{block.where}: a runnable block shows no '...' or '[--optional]' (a synopsis is not)")
    assert not problems, "\n".join(problems)


def test_each_readers_page_runs_something_and_is_indexed() -> None:
    index = (DOCS / "README.md").read_text()
    for name in READER_PAGES:
        assert any(b.runnable for b in blocks_of(DOCS / name)), f"docs/{name} has no runnable block"
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link to {page.name}"


def test_readme_starts_with_the_two_setup_commands() -> None:
    """The README stays short, and its first block is the two commands that set everything up."""
    readme = REPO / "README.md"
    first = blocks_of(readme)[0]
    commands = [line.split()[0] for line in first.text.splitlines() if line.strip()]
    assert commands == ["scripts/demo", "scripts/test"], first.text
    for command in commands:
        assert os.access(REPO / command, os.X_OK), f"{command} is not an executable script"
    lines = len(readme.read_text().splitlines())
    assert lines <= 150, f"README.md has {lines} lines: what is for one reader goes to their page in docs/"


def test_scripts_named_in_blocks_exist() -> None:
    missing = [f"{block.where}: {name}" for block in all_blocks()
               for name in re.findall(r"(?<![\w/.-])(scripts/[\w.-]+)", block.text)
               if not (REPO / name).is_file()]  # fmt: skip
    assert not missing, "\n".join(missing)


# --- Links -----------------------------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository (not in hidden, build or environment directories)."""
    skip = {"build", "node_modules", "__pycache__", "demo"}
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip and not d.endswith(".egg-info")]
        found += [Path(root) / f for f in files if f.endswith(".md")]
    return sorted(found)


def github_slug(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _blocks_and_prose(path)[1]:
        match = re.match(r"^ {0,3}#{1,6} +(.*?)(?: +#+)? *$", line)
        if match:
            slug = github_slug(match[1])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", line))
    return frozenset(found)


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page: Path) -> None:
    prose = "\n".join(_blocks_and_prose(page)[1])
    prose = re.sub(r"`[^`\n]*`", "", prose)  # code spans hold no links
    broken = []
    for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?: +\"[^\"]*\")?\)", prose):
        target = match[1]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        line = prose.count("\n", 0, match.start()) + 1
        if not dest.exists():
            broken.append(f"{page.relative_to(REPO)}:{line}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.relative_to(REPO)}:{line}: {target}: no such anchor in {dest.name}")
    assert not broken, "\n".join(broken)


HELP_SAMPLE = """
 Usage: python -m imageprov thing [OPTIONS] COMMAND [ARGS]...

 Does a thing; --quiet is named here, in the description, and is no option.

╭─ Options ──────────────────────────────────────────────────────────────╮
│ *  --pki                <path>   The PKI directory (see --registry).   │
│    --wait               <bool>   Wait, with --device-ids               │
│                                  --wait-for and --also-not.            │
│    --color --no-color   <bool>   Colours.                              │
│    --help       -h      <bool>   Show this message and exit.           │
╰────────────────────────────────────────────────────────────────────────╯
╭─ Commands ─────────────────────────────────────────────────────────────╮
│ init     Create a CA.                                                  │
│ import   Take over a CA made                                           │
│          elsewhere.                                                    │
╰────────────────────────────────────────────────────────────────────────╯
"""


def test_help_parser_reads_the_names_column_only() -> None:
    """An option or command mentioned in a description, or on a wrapped row, is not one."""
    options, commands = parse_help(HELP_SAMPLE)
    assert options == {"--pki", "--wait", "--color", "--no-color", "--help"}
    assert commands == {"init", "import"}


def test_invocations_are_read_as_the_shell_and_a_synopsis_mean_them() -> None:
    line = "imageprov revoke --pki PKI ID [--reason key-compromise] | --serial HEX   # --not-this, a comment"
    assert invocations(line) == [["revoke", "--pki", "PKI", "ID", "[--reason", "key-compromise]", "--serial", "HEX"]]
    assert invocations("imageprov edge nginx --pki pki > /etc/x.conf && nginx -t") == [
        ["edge", "nginx", "--pki", "pki"]
    ]
    assert invocations("ExecStart=/usr/local/bin/imageprov edge serve --pki /etc/imageprov/pki") == [
        ["edge", "serve", "--pki", "/etc/imageprov/pki"]
    ]
    assert invocations("install -d /etc/imageprov/pki && cp pki/imageprov.toml x") == []
    assert invocations("Description=imageprov edge serve: accepts devices") == []
    assert invocations("serial=$(imageprov devices --pki pki --json | jq -r .) # --not-this") == [
        ["devices", "--pki", "pki", "--json"]
    ]
    assert invocations("imageprov ca init pki --pkcs11 'pkcs11:token=PKCS#11' --curve P-384") == [
        ["ca", "init", "pki", "--pkcs11", "pkcs11:token=PKCS#11", "--curve", "P-384"]
    ]
    assert check_invocation(["stamp", "g.sdimg", "--pki", "p", "[--json]", "--no-such-option"]) == [
        "imageprov stamp: no option --no-such-option (not in 'imageprov stamp --help')"
    ]
    assert check_invocation(["ca", "nosuch"])[0].startswith("imageprov ca: no command 'nosuch'")
    assert check_invocation(["--debug", "ca", "init", "pki", "--cn", "X", "--curve", "P-384"]) == []
