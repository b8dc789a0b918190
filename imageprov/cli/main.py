"""The imageprov command line. The only place that prints, and that turns errors into exit codes."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from imageprov import __version__
from imageprov.cli import edge as cli_edge
from imageprov.cli import flash as cli_flash
from imageprov.cli import pki as cli_pki
from imageprov.cli import registry as cli_registry
from imageprov.cli import stamp as cli_stamp
from imageprov.cli.options import BootPart, DataPart, Json, RootfsParts, check_server_url
from imageprov.cli.output import layout_dict, layout_text, progress_bar
from imageprov.disk.compress import decompressed, editing
from imageprov.disk.copy import staged
from imageprov.disk.golden import DEFAULT_MENDER_CONF, GoldenSpec, RootfsB, Scheme, build_golden
from imageprov.disk.image import (
    EMPTY_ROOTFS_B_NOTE,
    Area,
    DiskImage,
    parse_mode,
    parse_owner,
    split_image_path,
    volume_name,
)
from imageprov.disk.layout import Overrides
from imageprov.errors import ImageprovError, UsageError
from imageprov.pki.registry import Record, Registry, report_stale_on_open

app = typer.Typer(
    help="Stamp per-device Mender client certificates into disk images, in place and fast.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
# The largest partition `golden` makes, in MiB: 64 GiB.
GOLDEN_MAX_MIB = 65536


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imageprov {__version__}")
        raise typer.Exit()


# The line's stations: at their start-up, pending certificates that a station killed after writing left are named.
LINE_COMMANDS = ("stamp", "flash")


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Log every command run, and show tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s", stream=sys.stderr)
    if ctx.invoked_subcommand in LINE_COMMANDS:
        report_stale_on_open(_warn_stale)


def _warn_stale(registry: Registry, stale: list[Record]) -> None:
    shown = ", ".join(f"{r.device_id} (serial {r.serial}, by {r.owner or 'an unknown station'})" for r in stale[:5])
    more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
    typer.echo(
        f"warning: {len(stale)} pending certificate(s) of stations that are gone, never confirmed delivered: "
        f"{shown}{more}; a card or image holding one verifies, but the edge refuses it: flash or stamp those "
        "devices again (which revokes them), or revoke them with 'imageprov revoke --pki PKI --stale'",
        err=True,
    )


def _open(
    image: Path, data_part: int | None, rootfs_parts: str | None, boot_part: int | None, *, shown: Path | None = None
) -> DiskImage:
    return DiskImage.open(image, Overrides.parse(data_part, rootfs_parts, boot_part), shown=shown)


@contextmanager
def _opened(image: Path, data_part: int | None, rootfs_parts: str | None, boot_part: int | None) -> Iterator[DiskImage]:
    """The image, to read: a compressed one through a private decompressed copy, removed after."""
    with decompressed(image, meter=progress_bar) as plain:
        yield _open(plain, data_part, rootfs_parts, boot_part)


def _reading(disk: DiskImage) -> DiskImage:
    # debugfs reads what is on disk, not what the journal holds: the device, which replays it, may see otherwise.
    try:
        unreplayed = disk.unreplayed()
    except ImageprovError:
        return disk  # the read itself says what is wrong, if it touches that partition
    for fs in unreplayed:
        typer.echo(f"warning: {fs.name} has a journal never replayed: the device may see other contents "
                   "(prepare or cp replays it)", err=True)  # fmt: skip
    return disk


@app.command()
def inspect(
    image: Annotated[Path, typer.Argument(help="Disk image (.sdimg, .uefiimg, .gptimg, ...).")],
    json_out: Json = False,
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
) -> None:
    """Show the partition table and which partition is boot, rootfs A/B and data.

    Takes a compressed image too (.gz, .xz, .bz2, .zst), as every command that reads one.

    Example: imageprov inspect golden.sdimg.bz2 --json
    """
    with _opened(image, data_part, rootfs_parts, boot_part) as disk:
        layout = disk.layout
    typer.echo(json.dumps(layout_dict(layout), indent=2) if json_out else layout_text(layout))


@app.command()
def ls(
    spec: Annotated[str, typer.Argument(metavar="IMAGE:/PATH", help="Directory in the image, e.g. img.sdimg:/data.")],
    json_out: Json = False,
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
) -> None:
    """List a directory inside the image.

    /data/... is the data partition, /uboot/... and /boot/efi/... the boot
    partition, anything else rootfs A.
    """
    image, path = split_image_path(spec)
    with _opened(image, data_part, rootfs_parts, boot_part) as disk:
        entries = _reading(disk).listdir(path)
    if json_out:
        typer.echo(json.dumps([{"name": n, "mode": m, "size": s} for n, m, s in entries], indent=2))
    else:
        for name, mode, size in entries:
            typer.echo(f"{mode}  {size:>10}  {name}")


@app.command()
def cat(
    spec: Annotated[str, typer.Argument(metavar="IMAGE:/PATH", help="File in the image.")],
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
) -> None:
    """Print a file from inside the image to stdout (rootfs paths are read from rootfs A)."""
    image, path = split_image_path(spec)
    with _opened(image, data_part, rootfs_parts, boot_part) as disk:
        data = _reading(disk).read(path)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@app.command()
def cp(
    src: Annotated[str, typer.Argument(metavar="SRC", help="A local file, or IMAGE:/PATH.")],
    dest: Annotated[str, typer.Argument(metavar="DEST", help="IMAGE:/PATH, or a local file.")],
    mode: Annotated[
        str, typer.Option("--mode", "-m", help="Octal mode in the image: 600 and 0600 are the same.")
    ] = "0644",
    owner: Annotated[str, typer.Option("--owner", help="UID:GID in the image.")] = "0:0",
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
) -> None:
    """Copy a file into the image (in place, atomically) or out of it.

    Into the image, a rootfs path is written to both rootfs A and B, and the
    image changes only if every write succeeds and reads back right. A
    compressed image (.gz, .xz, .bz2, .zst) is written back in its own compression.

    Example: imageprov cp device.key golden.sdimg:/data/mender/mender-cert-private.pem --mode 600
    """
    if _is_image_spec(dest):
        image, path = split_image_path(dest)
        content = _read_local(Path(src))
        perm, (uid, gid) = parse_mode(mode), parse_owner(owner)
        if path.area is Area.BOOT and (mode, owner) == ("0644", "0:0"):
            perm, uid, gid = 0o644, 0, 0
        with editing(image, meter=progress_bar) as (source, staging):
            # Messages name the user's image, not the hidden copy being written.
            disk = _open(source, data_part, rootfs_parts, boot_part, shown=image)
            replayed = disk.at(staging).replay_journals()
            written = disk.at(staging).write(path, content, mode=perm, uid=uid, gid=gid)
        for name in replayed:
            typer.echo(f"note: replayed the journal of {name} before writing", err=True)
        if image.is_symlink():
            typer.echo(f"note: {image} is a link: edited its target {image.resolve()}", err=True)
        where = ", ".join(volume_name(v) for v in written)
        typer.echo(f"wrote {path.device_path} ({len(content)} bytes, mode 0{perm:o}, {uid}:{gid}) to {where}", err=True)
        if path.area is Area.ROOTFS and disk.rootfs_b_empty:
            typer.echo(f"note: {EMPTY_ROOTFS_B_NOTE}", err=True)
    elif _is_image_spec(src):
        image, path = split_image_path(src)
        with _opened(image, data_part, rootfs_parts, boot_part) as disk:
            data = _reading(disk).read(path)
        target = Path(dest)
        if target.is_dir():
            target = target / path.device_path.name
        if not target.parent.is_dir():
            # As cp: the destination's directory is the user's to make.
            raise UsageError(f"cannot write {target}: {target.parent} is not a directory", hint="make it first")
        with staged(target) as temp:
            # What comes out may be a private key: never wider than 0600 until chmod by the user.
            temp.chmod(0o600)
            temp.write_bytes(data)
    else:
        raise UsageError(
            f"neither {src!r} nor {dest!r} is IMAGE:/PATH of an existing image",
            hint="e.g. imageprov cp mender.conf golden.sdimg:/etc/mender/mender.conf",
        )


def _is_image_spec(spec: str) -> bool:
    image, sep, _ = spec.partition(":/")
    return bool(sep) and Path(image).is_file()


def _read_local(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


@app.command("golden")
def golden(
    out: Annotated[Path, typer.Argument(help="Where to write the image (.sdimg or .uefiimg).")],
    layout: Annotated[Scheme, typer.Option("--layout", help="Partition table layout.")] = Scheme.MBR,
    # Bounded: a demo image, sparse, that the filesystem holding it can take (ext4 files stop at 16 TiB).
    rootfs_mib: Annotated[int, typer.Option(min=1, max=GOLDEN_MAX_MIB, help="Size of each rootfs partition.")] = 64,
    data_mib: Annotated[int, typer.Option(min=1, max=GOLDEN_MAX_MIB, help="Size of the data partition.")] = 32,
    payload_mib: Annotated[
        int, typer.Option(min=0, max=GOLDEN_MAX_MIB, help="Random payload in each rootfs, for benchmarks.")
    ] = 0,
    server_url: Annotated[
        Optional[str],
        typer.Option(
            "--server-url",
            callback=check_server_url,
            help="ServerURL in the rootfs conf (the build's MENDER_SERVER_URL).",
        ),
    ] = None,
    boot_fs: Annotated[str, typer.Option("--boot-fs", help="vfat or ext4 (MENDER_BOOT_PART_FSTYPE).")] = "vfat",
    rootfs_b: Annotated[
        RootfsB, typer.Option("--rootfs-b", help="copy of A, empty-ext4 (meta-mender's default) or unformatted.")
    ] = RootfsB.COPY,
    split_conf: Annotated[
        bool, typer.Option("--split-conf", help="RootfsPartA/B in /data/mender/mender.conf, as meta-mender splits it.")
    ] = False,
) -> None:
    """Build a demo Mender golden image with real tools (sfdisk, mkfs.vfat, mke2fs -d).

    Example: imageprov golden demo/golden.sdimg --layout mbr-extended
    Like a meta-mender build: imageprov golden real.sdimg --boot-fs ext4 --rootfs-b empty-ext4 --split-conf
    """
    if boot_fs not in ("vfat", "ext4"):
        raise UsageError(f"--boot-fs {boot_fs!r} is neither vfat nor ext4")
    conf = {**DEFAULT_MENDER_CONF, **({"ServerURL": server_url} if server_url else {})}
    spec = GoldenSpec(scheme=layout, rootfs_mib=rootfs_mib, data_mib=data_mib, payload_mib=payload_mib,
                      mender_conf=json.dumps(conf, indent=2) + "\n", boot_fs=boot_fs, rootfs_b=rootfs_b,
                      split_conf=split_conf)  # fmt: skip
    with staged(out) as temp:
        build_golden(temp, spec)
    typer.echo(f"built {out}", err=True)


cli_stamp.register(app)
cli_pki.register(app)
app.command()(cli_flash.flash)
cli_registry.register(app)
cli_edge.register(app)


def main() -> None:
    """Entry point: run the app and turn imageprov's errors into one line and an exit code."""
    try:
        # Not standalone: typer would print its own usage errors, a box of several lines.
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (exit 2) and the like
        # A bare group (imageprov ca) has had its help printed already; typer tells it by name too.
        if type(exc).__name__ != "NoArgsIsHelpError":
            typer.echo(f"imageprov: error: {_one_line(exc.format_message())}{_see_help(exc)}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # a prompt's input ended (EOF)
        typer.echo("imageprov: error: aborted", err=True)
        sys.exit(1)
    except ImageprovError as exc:
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"imageprov: error: {_one_line(str(exc))}", err=True)
        sys.exit(2 if isinstance(exc, UsageError) else 1)
    except KeyboardInterrupt:
        typer.echo("imageprov: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        # Ctrl-C inside cleanup code (shutil.rmtree of a temporary directory) can
        # surface as the OSError of a half-done step, with the interrupt as its
        # context: still an interruption, never a traceback.
        if not _interrupted(exc):
            raise
        typer.echo("imageprov: interrupted", err=True)
        sys.exit(130)
    # A command's own exit status (typer.Exit, --help, --version), or 0.
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    """A message on one line: a tool's or click's text may span several."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _see_help(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f" (see '{path} --help')" if path else ""


def _interrupted(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False
