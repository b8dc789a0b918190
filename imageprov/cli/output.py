"""What the CLI prints: human tables and the JSON forms of the same data."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from imageprov.disk.copy import Progress
from imageprov.disk.layout import Layout


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Progress]:
    """A bar on stderr for long work (a ``Meter``), drawn only on a terminal, as stamp's is."""
    with typer.progressbar(length=total, label=label, file=sys.stderr, hidden=not sys.stderr.isatty()) as bar:
        yield bar.update


def layout_dict(layout: Layout) -> dict[str, Any]:
    """The ``inspect --json`` document."""
    table = layout.table
    return {
        "table": table.type.name.lower(),
        "disk_id": table.disk_id,
        "sector_size": table.sector_size,
        "from_backup_gpt": table.from_backup,
        "warnings": list(table.warnings),
        "partitions": [
            {
                "number": v.partition.number,
                "start": v.partition.offset,
                "start_sector": v.partition.start_sector,
                "size": v.partition.size,
                "size_sectors": v.partition.size_sectors,
                "type": v.partition.type,
                "name": v.partition.name,
                "uuid": v.partition.uuid,
                "bootable": v.partition.bootable,
                "filesystem": v.filesystem.value,
                "label": v.label,
                "role": v.role.value,
            }
            for v in layout.volumes
        ],
    }


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def layout_text(layout: Layout) -> str:
    """The human ``inspect`` table."""
    table = layout.table
    if layout.is_bare:
        lines = ["table: none (a bare filesystem image)"]
    else:
        lines = [f"table: {table.type.name} (disk id {table.disk_id}, {table.sector_size}-byte sectors)"]
    lines += [f"warning: {w}" for w in table.warnings]
    header = ("#", "start", "size", "type", "filesystem", "label", "role")
    rows = [header]
    for v in layout.volumes:
        part = v.partition
        kind = part.type if table.type.name == "MBR" else (part.name or part.type)
        rows.append(
            (
                str(part.number),
                str(part.start_sector),
                human_size(part.size),
                kind,
                "-" if part.is_extended else v.filesystem.value,
                v.label or "-",
                v.role.value,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
