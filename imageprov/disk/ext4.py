"""ext2/3/4 filesystems inside an image, in place, through debugfs.

debugfs opens ``IMAGE?offset=BYTES`` directly, so nothing is copied out and
nothing needs root. Its exit status is 0 even when a command fails ("write:
Ext2 file already exists", "Could not allocate block"), so every run's stderr
is read, and everything written is read back and compared.

Commands go to debugfs as a script file whose paths are validated and quoted
here: debugfs splits its command lines on spaces and honours double quotes,
so a name may hold spaces but never a quote, a newline or a control character.

A filesystem whose journal was never replayed (a ``dd`` of a mounted one) is
never written to: the kernel would replay the journal over our writes at the
first mount. ``replay_journal`` replays it, on a private copy of an image.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imageprov.disk.copy import copy_range, stage
from imageprov.errors import FilesystemError, UsageError
from imageprov.run import run

S_IFREG = 0o100000
S_IFDIR = 0o040000
_BANNER = re.compile(r"^debugfs \d[\w.\-]* \(.*\)$")
_ECHO = "debugfs: "
_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')
_EXT_MAGIC = 0xEF53
# The superblock's "journal needs recovery" flag (EXT3_FEATURE_INCOMPAT_RECOVER):
# set while mounted, and left set by a dd of a running device.
_INCOMPAT_RECOVER = 0x4
_RO_COMPAT_QUOTA = 0x100


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


@contextmanager
def private_dir() -> Iterator[Path]:
    """A private (0700) temporary directory; a full or unwritable TMPDIR is named in the error."""
    try:
        with tempfile.TemporaryDirectory(prefix="imageprov-") as tmp:
            yield Path(tmp)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise FilesystemError(
            f"cannot write temporary files in {tempfile.gettempdir()}: {exc.strerror}",
            hint="free space there, or point TMPDIR at a directory with room",
        ) from exc


def tool_name(image: Path, offset: int, tmp: Path) -> str:
    """The name under which debugfs and e2fsck open the filesystem at ``offset`` of ``image``.

    They split ``NAME?offset=N`` at the first '?' and take a leading '-' for an
    option: a link in our private directory names the image whatever its own name.
    """
    link = tmp / "image"
    if not link.is_symlink():
        link.symlink_to(image.absolute())
    return f"{link}?offset={offset}"


@dataclass(frozen=True)
class Inode:
    path: PurePosixPath
    kind: str  # "regular", "directory", "symlink", ...
    mode: int  # permission bits only, e.g. 0o600
    uid: int
    gid: int
    size: int
    link: str = ""  # a fast symlink's target


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

    def _debugfs(self, commands: Sequence[str], *, write: bool = False) -> tuple[str, list[str]]:
        """Run a debugfs script; return stdout and the error lines of stderr."""
        if write:
            self.check_writable()
        with private_dir() as tmp:
            script = Path(tmp, "script")
            script.write_text("\n".join(commands) + "\n")
            argv = ["debugfs", *(["-w"] if write else []), "-f", str(script), tool_name(self.image, self.offset, tmp)]
            done = run(argv, env={"DEBUGFS_PAGER": "__none__", "PAGER": "__none__"})
        errors = [ln for ln in done.stderr.splitlines() if ln.strip() and not _BANNER.match(ln.strip())]
        return done.stdout.decode("utf-8", "replace"), errors

    def _superblock(self) -> bytes:
        with open(self.image, "rb") as handle:
            sb = os.pread(handle.fileno(), 1024, self.offset + 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
            raise FilesystemError(f"{self.name} holds no ext superblock")
        return sb

    def check_writable(self) -> None:
        """Refuse a filesystem that debugfs's writes would leave wrong."""
        sb = self._superblock()
        if struct.unpack_from("<I", sb, 96)[0] & _INCOMPAT_RECOVER:
            # The kernel replays the journal at the first mount, over whatever we wrote.
            raise FilesystemError(
                f"{self.name} has a journal that was never replayed; refusing to write behind it",
                hint="replay it in the golden image first: e2fsck -E journal_only on the partition",
            )
        if struct.unpack_from("<I", sb, 100)[0] & _RO_COMPAT_QUOTA:
            raise FilesystemError(
                f"{self.name} has the quota feature, which debugfs does not keep up to date: "
                "e2fsck would find the quota of every written file wrong",
                hint="turn it off in the golden image: tune2fs -O ^quota on the partition",
            )

    def needs_recovery(self) -> bool:
        """Whether the journal holds transactions never written to the filesystem (a dd of a mounted one)."""
        return bool(struct.unpack_from("<I", self._superblock(), 96)[0] & _INCOMPAT_RECOVER)

    def replay_journal(self) -> None:
        """Replay the journal into the filesystem, in place: do it on a private copy of an image only.

        e2fsck -E journal_only does the replay, but e2fsprogs 1.47 cannot reopen
        ``IMAGE?offset=N`` after it (the offset is lost: "Bad magic number"), and
        neither can debugfs's journal_run: the filesystem is replayed in a
        sparse copy of its own and copied back, data ranges only.
        """
        sb = self._superblock()
        blocks = struct.unpack_from("<I", sb, 4)[0]
        if struct.unpack_from("<I", sb, 96)[0] & 0x80:  # 64bit: the high half of the block count
            blocks |= struct.unpack_from("<I", sb, 336)[0] << 32
        size = blocks * (1024 << struct.unpack_from("<I", sb, 24)[0])
        alone = stage(self.image.with_name(f"journal{self.image.suffix}"))
        try:
            with open(self.image, "r+b") as image, open(alone, "r+b") as copy:
                copy_range(image.fileno(), self.offset, copy.fileno(), 0, size)
                with private_dir() as tmp:
                    done = run(["e2fsck", "-E", "journal_only", "-y", tool_name(alone, 0, tmp)], check=False)
                replayed = Ext4(alone, 0, self.name)
                if done.returncode not in (0, 1) or replayed.needs_recovery():
                    found = _findings(done.stdout.decode("utf-8", "replace") + done.stderr)
                    raise FilesystemError(f"cannot replay the journal of {self.name}: {found}",
                                          hint="repair the golden image with e2fsck -f")  # fmt: skip
                copy_range(copy.fileno(), 0, image.fileno(), self.offset, size)
                os.fsync(image.fileno())
        finally:
            alone.unlink(missing_ok=True)
        if self.needs_recovery():
            raise FilesystemError(f"the journal of {self.name} still needs recovery after replaying it")

    def _check(self, errors: list[str], doing: str) -> None:
        if errors:
            first = errors[0].strip()
            hint = next((h for needle, h in _HINTS.items() if needle in first), "")
            if "No space left on device" in first:
                # debugfs names no path: reads fill the temporary directory, writes the image's filesystem.
                if doing == "reading":
                    first += f" (in {tempfile.gettempdir()}, the temporary directory)"
                    hint = "free space there, or point TMPDIR at a directory with room"
                else:
                    first += f" (on the filesystem holding {self.image.parent})"  # the image, not a copy's name
                    hint = "free space there"
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
            if content is None and inode.kind == "symlink":
                raise FilesystemError(
                    f"{path} on {self.name} is a symbolic link{f' to {inode.link}' if inode.link else ''}, "
                    "not a file: imageprov reads and writes the files themselves, never through links",
                    hint="replace the link with the file it points to in the golden image",
                )
            if content is None:
                raise FilesystemError(f"{path} on {self.name} is a {inode.kind}, not a regular file")
            out[path] = content
        return out

    def fetch(self, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, tuple[Inode | None, bytes | None]]:
        """Stat and read several paths in one debugfs run: (inode or None, content of a regular file or None)."""
        wanted = list(dict.fromkeys(paths))
        with private_dir() as tmp:
            # Dumped files may hold private keys: the directory is private (0700).
            outs = {p: Path(tmp, f"f{i}") for i, p in enumerate(wanted)}
            commands = [f"stat {_q(p)}" for p in wanted] + [f"dump {_q(p)} {_q(outs[p])}" for p in wanted]
            out, errors = self._debugfs(commands)
            inodes = self._parse_stats(wanted, out, len(commands))
            errors = [e for e in errors if not _is_not_found(e)]
            files = [p for p in wanted if (found := inodes[p]) is not None and found.kind == "regular"]
            if errors and len(files) < len([p for p in wanted if inodes[p] is not None]):
                # dump of a symlink or a directory fails with "short read", which
                # names no path: the regular files are dumped again on their own.
                for dumped in outs.values():
                    dumped.unlink(missing_ok=True)
                _, errors = self._debugfs([f"dump {_q(p)} {_q(outs[p])}" for p in files]) if files else ("", [])
            self._check(errors, "reading")
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
                raise FilesystemError(
                    f"{parent} on {self.name} is a {_kind(inode.kind)}, not a directory",
                    hint="fix the golden image: make it a directory",
                )
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
        with private_dir() as tmp:
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


_FSCK_NOISE = re.compile(r"^(e2fsck \d|Pass \d|\S+: \d+/\d+ files|\s*Using EXT2FS)")


def _findings(output: str) -> str:
    """What e2fsck found, without its banner and progress lines."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not _FSCK_NOISE.match(ln.strip())]
    return "; ".join(lines[:3]) + (f" (and {len(lines) - 3} more lines)" if len(lines) > 3 else "") or "no output"


def fsck(image: Path, offset: int) -> tuple[bool, str]:
    """``e2fsck -fn`` on the filesystem at ``offset``: (clean, what it found)."""
    with private_dir() as tmp:
        done = run(["e2fsck", "-fn", tool_name(image, offset, tmp)], check=False)
    output = done.stdout.decode("utf-8", "replace") + done.stderr
    if done.returncode == 0:
        return True, ""
    if done.returncode < 0 or done.returncode & 32:
        return False, f"e2fsck was interrupted (exit status {done.returncode})"
    return False, _findings(output)


def _kind(kind: str) -> str:
    return {"regular": "regular file", "symlink": "symbolic link"}.get(kind, kind)


def _is_not_found(line: str) -> bool:
    # A path under a file ("/mender/x" with /mender a file) does not exist either.
    return "File not found by ext2_lookup" in line or "Ext2 inode is not a directory" in line


_STAT_TYPE = re.compile(r"Type:\s+(\S+)\s+Mode:\s+([0-7]+)")
_STAT_OWNER = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+)")
_STAT_SIZE = re.compile(r"\bSize:\s+(\d+)")
_STAT_LINK = re.compile(r'Fast link dest: "(.*)"')


def _parse_stat(path: PurePosixPath, chunk: str) -> Inode | None:
    kind, owner, size = _STAT_TYPE.search(chunk), _STAT_OWNER.search(chunk), _STAT_SIZE.search(chunk)
    if kind is None:
        return None
    if owner is None or size is None:
        raise FilesystemError(f"cannot read debugfs's stat of {path}")
    link = _STAT_LINK.search(chunk)
    return Inode(
        path, kind.group(1), int(kind.group(2), 8), int(owner.group(1)), int(owner.group(2)), int(size.group(1)),
        link.group(1) if link else "",
    )  # fmt: skip
