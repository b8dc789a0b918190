"""Copying disk images: reflink where the filesystem can, sparse where it cannot.

A golden image is mostly holes (unused filesystem space). Copying it byte by
byte allocates all of it and costs the full size in I/O; FICLONE shares the
extents outright (btrfs, XFS), and SEEK_DATA/SEEK_HOLE with copy_file_range
copies only the data and keeps the holes elsewhere. Outputs appear under
their final name only once complete (``staged``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageprov.errors import ImageprovError
from imageprov.locks import held, hold

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_CHUNK = 64 << 20
# Errors that mean "this filesystem cannot clone", not "the copy failed".
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}

Progress = Callable[[int], None]


class CopyError(ImageprovError):
    """An image could not be copied."""


@dataclass(frozen=True)
class CopyResult:
    method: str  # "reflink" or "sparse"
    bytes_copied: int


def data_ranges(fd: int, size: int, begin: int = 0) -> Iterator[tuple[int, int]]:
    """(start, end) of every data region of the open file ``fd`` from ``begin``, holes left out."""
    pos = begin
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def copy_fd(src: int, dst: int, *, progress: Progress | None = None) -> CopyResult:
    """Copy the open file ``src`` into the empty open file ``dst``."""
    size = os.fstat(src).st_size
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return CopyResult("reflink", 0)
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
    copied, in_kernel = _copy_data(src, 0, dst, 0, size, progress)
    os.ftruncate(dst, size)
    return CopyResult("sparse" if in_kernel else "sparse (read/write)", copied)


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> int:
    """Copy ``length`` bytes of ``src`` at ``src_offset`` into ``dst`` at ``dst_offset``; holes are skipped.

    A hole in ``src`` leaves ``dst`` as it was there: copy into a new file, or
    back over the range a copy came from. Returns the bytes copied.
    """
    copied, _ = _copy_data(src, src_offset, dst, dst_offset, length, None)
    if os.fstat(dst).st_size < dst_offset + length:
        os.ftruncate(dst, dst_offset + length)
    return copied


def _copy_data(
    src: int, src_offset: int, dst: int, dst_offset: int, length: int, progress: Progress | None
) -> tuple[int, bool]:
    """Copy the data regions of a range (holes skipped); (bytes copied, whether the kernel copied them)."""
    end = src_offset + length
    copied = 0
    in_kernel = True
    for start, stop in data_ranges(src, end, src_offset):
        offset, stop = max(start, src_offset), min(stop, end)
        while offset < stop:
            count, at = min(_CHUNK, stop - offset), offset - src_offset + dst_offset
            if in_kernel:
                try:
                    # Explicit offsets: neither file position matters.
                    n = os.copy_file_range(src, dst, count, offset, at)
                except OSError as exc:
                    # Across filesystems (EXDEV since Linux 5.19) or where unsupported.
                    if exc.errno not in _NO_CLONE:
                        raise
                    in_kernel = False
                    continue
            else:
                n = os.pwrite(dst, os.pread(src, count, offset), at)
            if n == 0:
                raise CopyError("a file shrank while it was being copied")
            offset += n
            copied += n
            if progress:
                progress(n)
    return copied, in_kernel


def stage(final: Path) -> Path:
    """A new empty hidden file beside ``final`` to build it in.

    A crash or an error leaves at most a hidden ``.NAME.*.partial.SUFFIX``
    file, never a half-written file under the final name. The suffix is kept
    because tools such as mender-artifact tell image types by it.
    """
    # The file stays locked while this process may still work on it: a later
    # run (on any host, in any PID namespace) removes it only once the lock is
    # gone (remove_stale). The pid in the name is for people.
    _release_gone()
    prefix = f".{final.stem}.{os.getpid()}."
    with _signals_deferred():
        # Locked under a name remove_stale ignores, then renamed: never seen
        # unlocked. Ctrl-C waits until the file is known to discard_staged.
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".new", dir=final.parent)
        partial = f"{name.removesuffix('.new')}.partial{final.suffix}"
        try:
            hold(fd)
            os.rename(name, partial)
        except BaseException:
            os.close(fd)
            Path(name).unlink(missing_ok=True)
            raise
        with _HELD_LOCK:
            _HELD[partial] = fd
    return Path(partial)


def discard_staged(final: Path) -> None:
    """Remove what this process staged for ``final`` and never published.

    An interruption can land between ``stage`` and the caller keeping its
    answer; the file is known here all the same.
    """
    prefix = f".{final.stem}.{os.getpid()}."
    with _HELD_LOCK:
        for name, fd in list(_HELD.items()):
            if not Path(name).name.startswith(prefix):
                continue
            try:
                if os.stat(name, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(name)
            except FileNotFoundError:
                pass
            os.close(_HELD.pop(name))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (main thread only: Python runs its handlers there) until the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# Partial file -> the open descriptor that holds its lock. Workers stage and
# publish at once: every use under the lock, so that no descriptor is closed twice.
_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


def _release_gone() -> None:
    """Close the locks of partial files that were published or removed since."""
    with _HELD_LOCK:
        for name, fd in list(_HELD.items()):
            try:
                current: int | None = os.stat(name, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(_HELD.pop(name))


_PARTIAL = re.compile(r"^\..*\.(\d+)\.[^.]+\.partial(\.[^.]*)?$")


def remove_stale(directory: Path) -> list[Path]:
    """Remove the partial files that processes no longer running left in ``directory``."""
    removed = []
    for path in directory.glob(".*.partial*"):
        if _PARTIAL.match(path.name) is None or held(path):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def publish(temp: Path, final: Path, *, replace: bool = False) -> None:
    """Give the complete file ``temp`` its final name, durably: data first, then the name.

    Unless ``replace``, an existing ``final`` is never overwritten (another
    process may have delivered it): link(2) fails rather than clobber.
    """
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    if replace:
        os.replace(temp, final)
    else:
        try:
            os.link(temp, final)
        except FileExistsError:
            raise
        except OSError as exc:
            # Filesystems without hard links: a plain rename, after checking.
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if final.exists():
                raise FileExistsError(errno.EEXIST, "File exists", str(final)) from exc
            os.rename(temp, final)
        else:
            temp.unlink()
    _release_gone()
    directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def staged(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; publish it as ``final`` only if no error is raised."""
    temp = stage(final)
    try:
        yield temp
        publish(temp, final, replace=replace)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def copy_image(src: Path, dst: Path, *, mode: int | None = None, progress: Progress | None = None) -> CopyResult:
    """Copy the image ``src`` to the new file ``dst`` (reflink or sparse), with ``src``'s mode unless given."""
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            result = copy_fd(s.fileno(), d.fileno(), progress=progress)
    except OSError as exc:
        hint = "the output filesystem is full" if exc.errno == errno.ENOSPC else ""
        raise CopyError(f"cannot copy {src} to {dst}: {exc.strerror}", hint=hint) from exc
    os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode) if mode is None else mode)
    return result


@contextmanager
def edit_in_place(image: Path) -> Iterator[Path]:
    """Yield a staged copy of ``image`` to change; it replaces ``image`` (a link's target) only if no error is raised.

    debugfs can fail halfway through a script and e2undo does not restore the
    superblock's counters byte for byte (measured with e2fsprogs 1.47), so an
    in-place edit goes to a reflink/sparse copy that is renamed over the image.
    """
    # A link (Yocto's IMAGE_LINK_NAME) is resolved once: its target is edited, the link stays.
    real = image.resolve(strict=True)
    with staged(real) as temp:
        copy_image(real, temp)
        yield temp
