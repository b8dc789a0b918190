"""ext2/3/4 filesystems inside an image, in place, through debugfs.

debugfs opens ``IMAGE?offset=BYTES`` directly, so nothing is copied out and
nothing needs root. Its exit status is 0 even when a command fails ("write:
Ext2 file already exists", "Could not allocate block"), so every run's stderr
is read, and everything written is read back and compared.

Commands go to debugfs as a script file whose paths are validated and quoted
here: debugfs splits its command lines on spaces and honours double quotes,
so a name may hold spaces but never a quote, a newline or a control character.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imageprov.errors import FilesystemError, UsageError
from imageprov.run import run

S_IFREG = 0o100000
S_IFDIR = 0o040000
_BANNER = re.compile(r"^debugfs \d[\w.\-]* \(.*\)$")
_ECHO = "debugfs: "
_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')


def fs_path(path: str) -> PurePosixPath:
    """Validate an absolute path inside a filesystem and normalise it."""
    if not path.startswith("/"):
        raise UsageError(f"{path!r} is not an absolute path inside the filesystem")
    if _FORBIDDEN.search(path):
        raise UsageError(f"{path!r} holds a quote, a backslash or a control character", hint="rename it")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{path!r} holds '.' or '..'", hint="give the path without them")
    if any(len(p.encode()) > 255 for p in parts):
        raise UsageError(f"a name in {path!r} is longer than 255 bytes")
    return PurePosixPath("/", *parts)


def _q(path: PurePosixPath | Path) -> str:
    return f'"{path}"'


@dataclass(frozen=True)
class Inode:
    path: PurePosixPath
    kind: str  # "regular", "directory", "symlink", ...
    mode: int  # permission bits only, e.g. 0o600
    uid: int
    gid: int
    size: int


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    size: int

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == S_IFDIR


@dataclass(frozen=True)
class NewFile:
    """A file to put into the filesystem."""

    path: PurePosixPath
    content: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class PlannedFile:
    """Where a file goes; what it holds, its mode and its owner come from its NewFile when the plan is applied."""

    path: PurePosixPath
    replace: bool  # it exists and is removed first: debugfs's write never overwrites


@dataclass(frozen=True)
class WritePlan:
    """debugfs commands that write files into a filesystem in a known state."""

    mkdirs: tuple[PurePosixPath, ...]
    files: tuple[PlannedFile, ...]
    dir_mode: int = 0o755

    def commands(self, files: Sequence[NewFile], sources: dict[PurePosixPath, Path]) -> list[str]:
        """The script writing ``files`` (each one's content read from ``sources``), with their modes and owners."""
        by_path = {f.path: f for f in files}
        if len(by_path) != len(files) or set(by_path) != {p.path for p in self.files}:
            raise UsageError("the files to write are not the ones planned")
        commands = []
        for directory in self.mkdirs:
            commands += [
                f"mkdir {_q(directory)}",
                f"sif {_q(directory)} mode 0{S_IFDIR | self.dir_mode:o}",
                f"sif {_q(directory)} uid 0",
                f"sif {_q(directory)} gid 0",
            ]
        for planned in self.files:
            new, path = by_path[planned.path], _q(planned.path)
            if planned.replace:
                commands.append(f"rm {path}")
            commands += [
                f"write {_q(sources[planned.path])} {path}",
                f"sif {path} mode 0{S_IFREG | new.mode:o}",
                f"sif {path} uid {new.uid}",
                f"sif {path} gid {new.gid}",
            ]
        return commands


@dataclass(frozen=True)
class Ext4:
    """One ext filesystem at a byte offset of an image file."""

    image: Path
    offset: int
    name: str  # for messages, e.g. "partition 4 (data)"

    @property
    def target(self) -> str:
        return f"{self.image}?offset={self.offset}"

    def _debugfs(self, commands: Sequence[str], *, write: bool = False) -> tuple[str, list[str]]:
        """Run a debugfs script; return stdout and the error lines of stderr."""
        with tempfile.TemporaryDirectory(prefix="imageprov-") as tmp:
            script = Path(tmp, "script")
            script.write_text("\n".join(commands) + "\n")
            argv = ["debugfs", *(["-w"] if write else []), "-f", str(script), self.target]
            done = run(argv, env={"DEBUGFS_PAGER": "__none__", "PAGER": "__none__"})
        errors = [ln for ln in done.stderr.splitlines() if ln.strip() and not _BANNER.match(ln.strip())]
        return done.stdout.decode("utf-8", "replace"), errors

    def _check(self, errors: list[str], doing: str) -> None:
        if errors:
            first = errors[0].strip()
            hint = next((h for needle, h in _HINTS.items() if needle in first), "")
            raise FilesystemError(f"{doing} on {self.name} failed: {first}", hint=hint)

    def stat_many(self, paths: Iterable[PurePosixPath]) -> dict[PurePosixPath, Inode | None]:
        """Stat several paths in one debugfs run; None for a path that does not exist."""
        wanted = list(dict.fromkeys(paths))
        if not wanted:
            return {}
        out, errors = self._debugfs([f"stat {_q(p)}" for p in wanted])
        self._check([e for e in errors if not _is_not_found(e)], "stat")
        return self._parse_stats(wanted, out, len(wanted))

    def stat(self, path: PurePosixPath) -> Inode | None:
        """The inode at ``path``, or None."""
        return self.stat_many([path])[path]

    def read(self, path: PurePosixPath) -> bytes:
        """The content of the regular file at ``path``."""
        return self.read_many([path])[path]

    def read_many(self, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, bytes]:
        """The contents of several regular files, in one debugfs run."""
        found = self.fetch(paths)
        out = {}
        for path, (inode, content) in found.items():
            if inode is None:
                raise FilesystemError(f"{path} does not exist on {self.name}")
            if content is None:
                raise FilesystemError(f"{path} on {self.name} is a {inode.kind}, not a regular file")
            out[path] = content
        return out

    def fetch(self, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, tuple[Inode | None, bytes | None]]:
        """Stat and read several paths in one debugfs run: (inode or None, content of a regular file or None)."""
        wanted = list(dict.fromkeys(paths))
        with tempfile.TemporaryDirectory(prefix="imageprov-") as tmp:
            # Dumped files may hold private keys: the directory is private (0700).
            outs = {p: Path(tmp, f"f{i}") for i, p in enumerate(wanted)}
            commands = [f"stat {_q(p)}" for p in wanted] + [f"dump {_q(p)} {_q(outs[p])}" for p in wanted]
            out, errors = self._debugfs(commands)
            inodes = self._parse_stats(wanted, out, len(commands))
            self._check([e for e in errors if not _is_not_found(e)], "reading")
            result: dict[PurePosixPath, tuple[Inode | None, bytes | None]] = {}
            for path in wanted:
                inode = inodes[path]
                regular = inode is not None and inode.kind == "regular" and outs[path].exists()
                result[path] = (inode, outs[path].read_bytes() if regular else None)
            return result

    def _parse_stats(self, wanted: list[PurePosixPath], out: str, commands: int) -> dict[PurePosixPath, Inode | None]:
        # With -f, debugfs echoes each command as "debugfs: CMD" on stdout; a
        # missing path leaves that command's chunk empty (its error is on stderr).
        chunks = out.split("\n" + _ECHO)
        chunks[0] = chunks[0].removeprefix(_ECHO)
        if len(chunks) != commands:
            raise FilesystemError(f"unexpected debugfs output while reading {self.name}")
        return {path: _parse_stat(path, chunk) for path, chunk in zip(wanted, chunks)}

    def listdir(self, path: PurePosixPath) -> list[Entry]:
        """The entries of the directory at ``path`` ('.' and '..' left out)."""
        inode = self.stat(path)
        if inode is None:
            raise FilesystemError(f"{path} does not exist on {self.name}")
        if inode.kind != "directory":
            raise FilesystemError(f"{path} on {self.name} is not a directory")
        out, errors = self._debugfs([f"ls -p {_q(path)}"])
        self._check(errors, f"listing {path}")
        entries = []
        for line in out.splitlines():
            if not line.startswith("/"):
                continue
            # "/ino/mode/uid/gid/name/size/": a name cannot hold a "/".
            fields = line.split("/")
            if len(fields) < 8 or fields[5] in (".", ".."):
                continue
            entries.append(Entry(fields[5], int(fields[2], 8), int(fields[3]), int(fields[4]), int(fields[6] or 0)))
        return entries

    def write_files(
        self, files: Sequence[NewFile], *, dirs: Sequence[PurePosixPath] = (), dir_mode: int = 0o755
    ) -> None:
        """Create or replace ``files``, creating ``dirs`` and missing parent directories (root-owned).

        Existing files are removed and written anew (debugfs cannot overwrite),
        then mode, uid and gid are set, and everything is read back and compared.
        """
        self.apply(self.plan([f.path for f in files], dirs=dirs, dir_mode=dir_mode), files)
        if files:
            self._read_back(files)

    def plan(
        self, targets: Sequence[PurePosixPath], *, dirs: Sequence[PurePosixPath] = (), dir_mode: int = 0o755
    ) -> WritePlan:
        """Look at this filesystem once and decide how to write files at ``targets``: what to replace, what to make.

        The plan holds for every byte-identical copy of this filesystem, which is
        how stamp writes a thousand images with one look. It holds no content,
        mode or owner: those come from the files given to ``apply``, the one
        place a caller states them.
        """
        if len(set(targets)) != len(targets):
            raise UsageError("the same path is written twice")
        wanted = {a for t in targets for a in t.parents} | set(dirs) | {a for d in dirs for a in d.parents}
        parents = sorted(wanted - {PurePosixPath("/")}, key=lambda p: len(p.parts))
        found = self.stat_many([*parents, *targets])
        mkdirs = []
        for parent in parents:
            inode = found[parent]
            if inode is None:
                mkdirs.append(parent)
            elif inode.kind != "directory":
                raise FilesystemError(f"{parent} on {self.name} is a {inode.kind}, not a directory")
        planned = []
        for target in targets:
            existing = found[target]
            if existing is not None and existing.kind not in ("regular", "symlink"):
                raise FilesystemError(f"{target} on {self.name} is a {existing.kind}; not replacing it")
            planned.append(PlannedFile(target, replace=existing is not None))
        return WritePlan(tuple(mkdirs), tuple(planned), dir_mode)

    def apply(self, plan: WritePlan, files: Sequence[NewFile]) -> None:
        """Run ``plan`` with ``files``: their contents, modes and owners (one debugfs run; no read-back)."""
        if not plan.files and not plan.mkdirs and not files:
            return
        with tempfile.TemporaryDirectory(prefix="imageprov-") as tmp:
            sources = {}
            for i, new in enumerate(files):
                source = sources[new.path] = Path(tmp, f"f{i}")
                # The source may be a private key: created 0600 in a 0700 directory.
                fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(new.content)
            _, errors = self._debugfs(plan.commands(files, sources), write=True)
        self._check(errors, "writing")

    def _read_back(self, files: Sequence[NewFile]) -> None:
        found = self.fetch([f.path for f in files])
        for new in files:
            inode, content = found[new.path]
            if content != new.content or inode is None:
                raise FilesystemError(f"{new.path} on {self.name} does not read back as written")
            if (inode.mode, inode.uid, inode.gid) != (new.mode, new.uid, new.gid):
                raise FilesystemError(
                    f"{new.path} on {self.name} reads back as mode 0{inode.mode:o} "
                    f"{inode.uid}:{inode.gid}, not 0{new.mode:o} {new.uid}:{new.gid}"
                )


# What debugfs's messages mean for the user.
_HINTS = {
    "Could not allocate block": "the filesystem is full",
    "Could not allocate inode": "the filesystem has no free inodes",
    "Read-only file system": "the image file is read-only",
}


def _is_not_found(line: str) -> bool:
    return "File not found by ext2_lookup" in line


_STAT_TYPE = re.compile(r"Type:\s+(\S+)\s+Mode:\s+([0-7]+)")
_STAT_OWNER = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+)")
_STAT_SIZE = re.compile(r"\bSize:\s+(\d+)")


def _parse_stat(path: PurePosixPath, chunk: str) -> Inode | None:
    kind, owner, size = _STAT_TYPE.search(chunk), _STAT_OWNER.search(chunk), _STAT_SIZE.search(chunk)
    if kind is None:
        return None
    if owner is None or size is None:
        raise FilesystemError(f"cannot read debugfs's stat of {path}")
    return Inode(
        path, kind.group(1), int(kind.group(2), 8), int(owner.group(1)), int(owner.group(2)), int(size.group(1))
    )
