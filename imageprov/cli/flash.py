"""The line station's command: flash per-device cards straight from the golden image."""

from __future__ import annotations

import csv
import io
import json
import signal
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Optional

import typer

from imageprov.cli.ca_token import PinFile
from imageprov.cli.options import (
    AuthKeyOpt,
    BootPart,
    ConfTargetOpt,
    CurveOpt,
    DataPart,
    EnrollOpt,
    LineDays,
    PassFile,
    Pki,
    RegistryOpt,
    RootfsParts,
    ServerCaOpt,
    ServerUrl,
    TenantToken,
)
from imageprov.cli.output import human_size
from imageprov.cli.pki import open_ca
from imageprov.cli.stamp import check_golden, device_options
from imageprov.disk.blockdev import removable_disks
from imageprov.disk.layout import Overrides
from imageprov.errors import ImageprovError, UsageError
from imageprov.line.dashboard.access import Access, Address, parse_address, read_token
from imageprov.line.dashboard.server import Dashboard
from imageprov.line.flash import LOG_NAME, Assignment, FlashBatch, Flashed, FlashOptions, Progress, Result
from imageprov.line.station import Station
from imageprov.mender.conf import AuthKey
from imageprov.mender.prepare import ConfTarget
from imageprov.pki.ca import Curve
from imageprov.pki.devices import check_device_ids, read_device_ids
from imageprov.pki.registry import Registry

POLL_SECONDS = 0.5  # how often /sys/block is looked at while waiting for a card


class FlashFailed(ImageprovError):
    """Some cards were not delivered."""


def read_targets(path: Path) -> list[tuple[str, str]]:
    """(device id, target) pairs from a CSV with ``device_id`` and ``target`` columns."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --targets {path}: {exc}") from exc
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "device_id" not in header or "target" not in header:
        raise UsageError(f"--targets {path} must be a CSV with device_id and target columns")
    id_col, target_col = header.index("device_id"), header.index("target")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) <= max(id_col, target_col) or not row[target_col].strip():
            raise UsageError(f"--targets {path}, row {number}: needs a device_id and a target")
        pairs.append((row[id_col].strip(), row[target_col].strip()))
    if not pairs:
        raise UsageError(f"--targets {path} names no target")
    return pairs


def _parse_target(text: str) -> tuple[str, str]:
    device, sep, device_id = text.rpartition("=")
    if not sep or not device or not device_id:
        raise UsageError(f"--target {text!r} is not DEVICE=ID", hint="e.g. --target /dev/sdb=SN-0001")
    return device_id, device


class _Lines:
    """One progress line per card on a terminal, redrawn in place."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.drawn = 0

    def __call__(self, progress: list[Progress]) -> None:
        if not self.enabled:
            return
        out = [f"\x1b[{self.drawn}F"] if self.drawn else []
        for p in progress:
            share = f"{100 * p.written // p.total:3d}%" if p.total else "    "
            line = f"{p.target}  {p.device_id}  {p.phase:<12} {share}  {human_size(p.written)}"
            out.append(f"\x1b[2K{line}\n")
        sys.stderr.write("".join(out))
        sys.stderr.flush()
        self.drawn = len(progress)

    def done(self) -> None:
        self.drawn = 0


def _report(flashed: Flashed, json_out: bool) -> None:
    for note in flashed.notes:
        typer.echo(f"{flashed.device_id}: {note}", err=True)
    if json_out:
        typer.echo(json.dumps(flashed.to_dict()))
    if flashed.result is not Result.DELIVERED:
        # On stderr even with --json: the operator must see which card to put aside.
        typer.echo(f"FAILED {flashed.device_id} on {flashed.target}: {flashed.error}", err=True)
    elif not json_out:
        typer.echo(f"delivered {flashed.device_id} to {flashed.target} ({flashed.card}; certificate {flashed.serial}, "
                   f"{human_size(flashed.bytes_written)} in {flashed.seconds:.1f} s)", err=True)  # fmt: skip


@contextmanager
def _finish_card_on_ctrl_c() -> Iterator[dict[str, bool]]:
    """While a card is written, Ctrl-C asks to stop after it instead of leaving it half-written."""
    asked = {"stop": False}

    def handler(signum: int, frame: FrameType | None) -> None:
        asked["stop"] = True
        typer.echo("\nstopping after the card in progress", err=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def flash(
    image: Annotated[Path, typer.Argument(help="The golden disk image (never modified).")],
    pki: Pki,
    target: Annotated[
        Optional[list[str]], typer.Option("--target", help="DEVICE=ID: flash device ID onto DEVICE (repeat).")
    ] = None,
    targets: Annotated[Optional[Path], typer.Option("--targets", help="CSV with device_id and target columns.")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Wait for each new card and flash the next id onto it, until Ctrl-C or the ids run out."
        ),
    ] = False,
    device_id: Annotated[Optional[list[str]], typer.Option("--device-id", help="With --wait: an id (repeat).")] = None,
    device_ids: Annotated[
        Optional[Path], typer.Option("--device-ids", help="With --wait: ids, one per line or CSV with device_id.")
    ] = None,
    wait_for: Annotated[
        Optional[list[str]],
        typer.Option(
            "--wait-for",
            help="With --wait: kernel names to watch (e.g. 'sd?', 'mmcblk0'); default: every removable disk.",
        ),
    ] = None,
    server_url: ServerUrl = None,
    tenant_token: TenantToken = None,
    conf_target: ConfTargetOpt = ConfTarget.AUTO,
    auth_key: AuthKeyOpt = AuthKey.CERT,
    days: LineDays = None,
    curve: CurveOpt = Curve.P256,
    server_ca: ServerCaOpt = None,
    enroll: EnrollOpt = None,
    reissue: Annotated[
        bool, typer.Option("--reissue", help="Flash a device already delivered: its old certificate is revoked.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow targets that are not removable disks.")] = False,
    log: Annotated[
        Optional[Path], typer.Option("--log", help="The line log, appended to (default: PKI/line-log.jsonl).")
    ] = None,
    scratch: Annotated[
        Optional[Path], typer.Option("--scratch", help="Directory for the small per-device scratch (default: TMPDIR).")
    ] = None,
    passphrase_file: PassFile = None,
    pin_file: PinFile = None,
    registry_url: RegistryOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per card on stdout.")] = False,
    dashboard: Annotated[
        Optional[str],
        typer.Option(
            "--dashboard",
            metavar="[HOST:]PORT",
            help="With --wait: serve the line's screen at http://HOST:PORT/ (a tile per card slot, live, "
            "with a stop button) and Prometheus metrics at /metrics. HOST is 127.0.0.1 unless given; "
            "any address but loopback needs --dashboard-token-file. Port 0: any free port (printed).",
        ),
    ] = None,
    dashboard_token_file: Annotated[
        Optional[Path],
        typer.Option(
            "--dashboard-token-file",
            metavar="FILE",
            help="A secret of 16 characters or more (openssl rand -hex 16 > FILE) that the dashboard asks for: "
            "once per screen (a cookie keeps it), or as 'Authorization: Bearer TOKEN' from a scraper.",
        ),
    ] = None,
    data_part: DataPart = None,
    rootfs_parts: RootfsParts = None,
    boot_part: BootPart = None,
) -> None:
    """Flash cards straight from the golden image, each with its own key and certificate: no image files.

    The golden image is read once for all cards of a batch, and every card is
    written at once; each card is then read back and verified on the device
    itself before its device is marked delivered. Targets must be whole,
    unmounted, removable disks (loop devices too; --force for fixed disks). A
    device already delivered is refused unless --reissue. A card that fails
    does not stop the others, and its certificate is revoked. Every card is
    recorded in the line log.

    Examples:

      imageprov flash golden.sdimg --pki pki --target /dev/sdb=SN-0001 --target /dev/sdc=SN-0002

      imageprov flash golden.sdimg --pki pki --device-ids serials.txt --wait

      imageprov flash golden.sdimg --pki pki --device-ids serials.txt --wait --dashboard 127.0.0.1:8080

    With --wait, each new card gets the next id; Ctrl-C stops after the cards
    in progress (exit 130). The dashboard shows every slot by colour and by
    word (blue or purple: working, do not pull; green: delivered, pull it; red:
    failed, set it aside, with the reason; grey: empty, or a card left alone),
    the totals and the line log, and warns when one slot fails twice in a row
    (a bad reader, not a bad card). Its button "stop after the cards in
    progress" finishes them, takes no new card, and exits 0 with the usual
    summary (1 if an id failed and was never delivered).
    """
    pairs = [_parse_target(t) for t in target or []]
    if targets is not None:
        pairs += read_targets(targets)
    ids = list(device_id or [])
    if device_ids is not None:
        ids += read_device_ids(device_ids)
    if wait:
        if pairs and not targets:
            raise UsageError("--wait finds the cards itself: give ids (--device-ids, --device-id), not --target")
        ids += [i for i, _ in pairs]
        if not ids:
            raise UsageError("--wait needs the ids to flash", hint="pass --device-ids FILE or --device-id ID")
        ids = check_device_ids(ids)
    else:
        if dashboard is not None or dashboard_token_file is not None:
            raise UsageError("--dashboard goes with --wait", hint="the dashboard shows the line's card slots")
        if ids:
            raise UsageError("--device-id/--device-ids go with --wait", hint="without it, name cards: --target DEV=ID")
        if not pairs:
            raise UsageError("no target", hint="pass --target /dev/sdX=ID (repeatable), --targets FILE, or --wait")
        check_device_ids([i for i, _ in pairs])
        devices = [d for _, d in pairs]
        if len(set(devices)) != len(devices):
            raise UsageError("the same target is named twice")
    screen = _screen_access(dashboard, dashboard_token_file) if wait else None
    check_golden(image)
    ca = open_ca(pki, passphrase_file, pin_file)
    ca.check_usable()
    overrides = Overrides.parse(data_part, rootfs_parts, boot_part)
    options = FlashOptions(
        stamp=device_options(
            server_url, tenant_token, auth_key, conf_target, days, curve, reissue, overrides, server_ca, enroll
        ),
        force=force,
        scratch_dir=scratch,
        log=log,
    )
    lines = _Lines(sys.stderr.isatty() and not json_out)
    with ExitStack() as stack:
        station = Station(image, log or pki / LOG_NAME, len(ids))
        if screen is not None:
            # Up before the golden image is prepared (minutes, for a large one): the screen says so meanwhile.
            url = stack.enter_context(Dashboard(station, *screen)).url
            who = "token required" if screen[1].token else "this machine only"
            typer.echo(f"dashboard: {url} ({who}); metrics: {url}metrics", err=True)
        registry = stack.enter_context(Registry(pki, registry_url))
        batch = stack.enter_context(FlashBatch(image, pki, ca, registry, options))
        for stale in batch.stale_workdirs:
            typer.echo(f"note: removed {stale}, left by a flash process that was killed", err=True)
        batch.prepare()
        for note in batch.notes:
            typer.echo(f"note: {note}", err=True)
        if wait:
            try:
                _wait_loop(batch, ids, list(wait_for or []), json_out, lines, station)
            finally:
                station.ended()  # the screen's last state, pushed before the dashboard closes
            return
        results = batch.flash([Assignment(i, Path(d)) for i, d in pairs], on_progress=lines)
        lines.done()
        for flashed in results:
            _report(flashed, json_out)
    failed = [f for f in results if f.result is not Result.DELIVERED]
    if failed:
        if len(results) == 1:
            raise FlashFailed(f"{failed[0].device_id}: {failed[0].error}")
        delivered = len(results) - len(failed)
        raise FlashFailed(
            f"{len(failed)} of {len(results)} cards failed: "
            + ", ".join(f"{f.device_id} on {f.target}" for f in failed[:10]),
            hint=f"their certificates are revoked; {f'the other {delivered}' if delivered else 'none'} were delivered",
        )
    read = batch.golden_bytes_read
    typer.echo(f"delivered {len(results)} cards; read {human_size(read)} ({read} bytes) of the golden image", err=True)


def _screen_access(dashboard: str | None, token_file: Path | None) -> tuple[Address, Access] | None:
    """Where the dashboard listens and who may use it; refused before anything is done."""
    if dashboard is None:
        if token_file is not None:
            raise UsageError("--dashboard-token-file goes with --dashboard", hint="e.g. --dashboard 0.0.0.0:8080")
        return None
    address = parse_address(dashboard)
    if not address.loopback and token_file is None:
        raise UsageError(
            f"--dashboard {address} is reachable from other machines: it needs --dashboard-token-file FILE",
            hint="a secret the screens must give; or listen on this machine only: --dashboard 127.0.0.1:PORT",
        )
    return address, Access(address.loopback, read_token(token_file) if token_file is not None else None)


def _wait_loop(
    batch: FlashBatch, ids: list[str], patterns: list[str], json_out: bool, lines: _Lines, station: Station
) -> None:
    """The operator's loop: each new card gets the next id not yet delivered; Ctrl-C or the dashboard ends it."""
    delivered: list[str] = []
    failed: dict[str, str] = {}
    present = set(removable_disks(patterns))
    if present:
        typer.echo(f"left alone (present before the start): {', '.join(sorted(present))}", err=True)
        station.left_alone(sorted(present))
    # A line restarts with its whole list: what is delivered is asked once, not once per id.
    done = batch.delivered_among(ids)
    skipped = [i for i in ids if i in done]
    for device_id in skipped[:5]:
        typer.echo(f"{device_id}: already delivered, skipped", err=True)
    if len(skipped) > 5:
        typer.echo(f"... and {len(skipped) - 5} more already delivered, skipped", err=True)
    todo = deque(i for i in ids if i not in done)
    stopped = False

    def progress(cards: list[Progress]) -> None:
        lines(cards)
        station.progress(cards)

    try:
        while not station.stop_asked:
            while todo and batch.delivery(todo[0]) is not None:
                typer.echo(f"{todo[0]}: already delivered, skipped", err=True)
                todo.popleft()
            if not todo:
                break
            typer.echo(f"waiting for a card ({len(todo)} ids to go; Ctrl-C to stop)", err=True)
            station.waiting(len(todo))
            new: list[str] = []
            while not new and not station.stop_asked:
                now = set(removable_disks(patterns))
                for gone in sorted(present - now):
                    typer.echo(f"{gone}: card removed", err=True)
                    station.removed(gone)
                present &= now  # a card taken out may come back as a new one
                new = sorted(now - present)
                if not new:
                    station.wait_for_stop(POLL_SECONDS)  # a stop asked on the dashboard ends the wait at once
            if not new:
                break
            present |= set(new)
            assignments = [Assignment(todo.popleft(), Path("/dev") / name) for name in new[: len(todo)]]
            if len(new) > len(assignments):
                station.left_alone(new[len(assignments) :])  # more cards than ids left
            station.flashing(assignments, len(todo))
            with _finish_card_on_ctrl_c() as asked:
                for assignment in assignments:
                    typer.echo(f"flashing {assignment.device_id} onto {assignment.target}", err=True)
                results = batch.flash(assignments, on_progress=progress)
            lines.done()
            for flashed in results:
                _report(flashed, json_out)
                if flashed.result is Result.DELIVERED:
                    delivered.append(flashed.device_id)
                    failed.pop(flashed.device_id, None)
                else:
                    failed[flashed.device_id] = flashed.error
                    if batch.delivery(flashed.device_id) is None:
                        todo.appendleft(flashed.device_id)  # not delivered: the next card gets it
            station.flashed(results, len(todo), batch.last_pass)
            typer.echo(f"done: remove card{'s' if len(results) > 1 else ''} "
                       + ", ".join(str(f.target) for f in results), err=True)  # fmt: skip
            if asked["stop"]:
                stopped = True
                break
    except KeyboardInterrupt:
        stopped = True
    if station.stop_asked and not stopped:
        typer.echo("stopped from the dashboard: no card in progress, no new card taken", err=True)
    typer.echo(f"delivered {len(delivered)} cards; {len(todo)} ids not delivered", err=True)
    if failed:
        raise FlashFailed(f"{len(failed)} devices failed and were not delivered: {', '.join(sorted(failed))}")
    if stopped:
        raise KeyboardInterrupt
