"""Reading a disk image's partition table: pick the MBR or the GPT reader.

Pure Python over ``os.pread``: nothing here needs root, a loop device or a
tool, so it runs the same on a build host and on a flashing station. The
model lives in :mod:`imageprov.disk.table`, which both readers import; this
module sits above them so that no import goes round in a loop.
"""

from __future__ import annotations

import os

from imageprov.disk import gpt, mbr
from imageprov.disk.table import PartitionTable, check_bounds
from imageprov.errors import TableError


def read_table(path: str | os.PathLike[str]) -> PartitionTable:
    """Read the partition table of the disk image at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise TableError(f"cannot open {os.fspath(path)}: {exc.strerror}") from exc
    try:
        # A block device's st_size is 0: its end is where seeking to the end lands.
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < 512:
            raise TableError(f"{os.fspath(path)} is {size} bytes, too small to be a disk image")
        table = gpt.read(fd, size) if mbr.is_protective(fd) else mbr.read(fd, size)
    finally:
        os.close(fd)
    check_bounds(table.partitions, size)
    return table
