"""What the line station is doing, as its screen shows it: card slots, totals, the last lines of the line log.

``flash --wait`` feeds a :class:`Station` as it goes (a card noticed, a batch
started, its progress, its results, a card taken out), and anything that
shows the station (the dashboard, its metrics) reads a :class:`Snapshot`: a
frozen picture taken under the station's lock, safe to hand to another
thread. A slot is a card reader (``sdb``, ``mmcblk0``, a test's ``loop3``),
kept on the screen from the first card seen in it, so that tiles never move.

The station also carries the one request the screen may make of the line,
"stop after the cards in progress": it only ever ends the loop between two
batches, so no card and no certificate is left half done.
"""

from __future__ import annotations

import enum
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imageprov.disk.blockdev import identify
from imageprov.errors import ImageprovError
from imageprov.line.flash import Assignment, Failure, Flashed, Phase, Progress, Result, WritePass

# How many lines of the line log the screen shows, newest first; read from its last LOG_TAIL bytes.
LOG_LINES = 8
LOG_TAIL = 64 * 1024
# A slot whose cards failed this many times in a row (at the slot: write, read-back, verify) has a bad reader.
BAD_READER_FAILURES = 2


class SlotState(enum.Enum):
    EMPTY = "empty"  # no card in the reader
    LEFT_ALONE = "left alone"  # a card that was there before the start, or for which no id was left
    PREPARING = "preparing"  # its certificate issued, its data partition being made
    WRITING = "writing"
    READING_BACK = "reading back"
    VERIFYING = "verifying"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        """A card in this state is being worked on: it must not be pulled."""
        return self in (SlotState.PREPARING, SlotState.WRITING, SlotState.READING_BACK, SlotState.VERIFYING)


_OF_PHASE = {
    Phase.WAITING: SlotState.PREPARING,
    Phase.STAMPING: SlotState.PREPARING,
    Phase.WRITING: SlotState.WRITING,
    Phase.READING_BACK: SlotState.READING_BACK,
    Phase.VERIFYING: SlotState.VERIFYING,
    Phase.DELIVERED: SlotState.DELIVERED,
    Phase.FAILED: SlotState.FAILED,
}


class StationState(enum.Enum):
    PREPARING = "preparing"  # the golden image, once for the batch
    WAITING = "waiting"  # for a card
    FLASHING = "flashing"
    STOPPING = "stopping"  # asked to stop: the cards in progress are finished first
    STOPPED = "stopped"
    FINISHED = "finished"  # every id delivered


@dataclass(frozen=True)
class SlotView:
    """One card reader and the card in it."""

    name: str  # the kernel's name: sdb, mmcblk0, loop3
    identity: str  # the reader (or card) as sysfs describes it: model and serial, a loop's backing file
    state: SlotState
    device_id: str | None = None  # the id its card got (or was getting)
    written: int = 0
    total: int = 0
    elapsed: float = 0.0  # seconds since the card was taken, or what it took
    rate: float = 0.0  # bytes per second written, while writing
    error: str = ""
    failure: Failure | None = None
    failures_in_a_row: int = 0  # at the slot, since its last delivered card

    @property
    def node(self) -> str:
        return f"/dev/{self.name}"

    @property
    def bad_reader(self) -> bool:
        return self.failures_in_a_row >= BAD_READER_FAILURES


@dataclass(frozen=True)
class Totals:
    delivered: int = 0
    failed: int = 0  # cards, not ids: an id that failed and was delivered later counts here too
    remaining: int = 0  # ids not delivered yet
    cards_per_hour: float | None = None  # delivered, since the first card was taken
    mean_seconds: float | None = None  # per delivered card, from taking it to delivering it


@dataclass(frozen=True)
class LogEntry:
    """One line of the line log (any station's that shares it)."""

    time: str
    device_id: str
    target: str
    result: str
    failure: str = ""
    error: str = ""


@dataclass(frozen=True)
class Snapshot:
    state: StationState
    golden: str
    slots: tuple[SlotView, ...]
    totals: Totals
    log: tuple[LogEntry, ...]
    stop_asked: bool = False


class Listener:
    """What follows a station, from the thread that feeds it; every method does nothing unless overridden."""

    def changed(self) -> None:
        """Something a snapshot shows has changed."""

    def card_done(self, flashed: Flashed) -> None:
        """A card was delivered or failed."""

    def pass_done(self, write_pass: WritePass) -> None:
        """A pass over the golden image wrote the cards of a batch."""


@dataclass
class _Slot:
    name: str
    identity: str = ""
    state: SlotState = SlotState.EMPTY
    device_id: str | None = None
    started: float = 0.0
    seconds: float | None = None  # once finished
    writing_since: float | None = None
    progress: Progress | None = None  # live: its writer and checker threads move it on
    flashed: Flashed | None = None
    failures_in_a_row: int = 0


@dataclass
class _Counts:
    delivered: int = 0
    failed: int = 0
    seconds: float = 0.0  # of the delivered cards
    first_taken: float | None = None
    remaining: int = 0
    log: tuple[LogEntry, ...] = field(default_factory=tuple)


def slot_identity(name: str) -> str:
    """The reader in slot ``name`` as sysfs describes it; empty if it cannot be read (gone meanwhile)."""
    try:
        return identify(Path("/dev") / name).identity
    except (ImageprovError, OSError):
        return ""


def _natural(name: str) -> list[str | int]:
    # loop10 after loop9, sdaa after sdz: the order of the readers on the bench, not of strings.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Station:
    """The line station's state, fed by ``flash --wait`` from its thread and read from any other."""

    def __init__(
        self,
        golden: Path,
        log: Path,
        ids: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        identity: Callable[[str], str] = slot_identity,
    ) -> None:
        self.golden = golden
        self.log = log
        self._clock = clock
        self._identity = identity
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._state = StationState.PREPARING
        self._slots: dict[str, _Slot] = {}
        self._counts = _Counts(remaining=ids, log=read_log(log))
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def forget(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    # -- fed by the wait loop ---------------------------------------------------------

    def left_alone(self, names: Sequence[str]) -> None:
        """Cards that are not the line's: in their readers before the start, or with no id left for them."""
        identities = {name: self._identity(name) for name in names}  # sysfs, read before taking the lock
        with self._lock:
            for name in names:
                slot = self._slot(name)
                slot.identity = identities[name] or slot.identity
                slot.state, slot.device_id, slot.flashed, slot.progress = SlotState.LEFT_ALONE, None, None, None
        self._changed()

    def waiting(self, remaining: int) -> None:
        with self._lock:
            self._counts.remaining = remaining
            if self._state is not StationState.STOPPING:
                self._state = StationState.WAITING
        self._changed()

    def removed(self, name: str) -> None:
        with self._lock:
            slot = self._slot(name)
            slot.state, slot.progress, slot.writing_since, slot.flashed = SlotState.EMPTY, None, None, None
        self._changed()

    def flashing(self, assignments: Sequence[Assignment], remaining: int) -> None:
        now = self._clock()
        identities = {a.target.name: self._identity(a.target.name) for a in assignments}
        with self._lock:
            for assignment in assignments:
                slot = self._slot(assignment.target.name)
                slot.identity = identities[slot.name] or slot.identity
                slot.state, slot.device_id, slot.started = SlotState.PREPARING, assignment.device_id, now
                slot.seconds, slot.writing_since, slot.progress, slot.flashed = None, None, None, None
            if self._counts.first_taken is None:
                self._counts.first_taken = now
            self._counts.remaining = remaining
            if self._state is not StationState.STOPPING:
                self._state = StationState.FLASHING
        self._changed()

    def progress(self, progress: Sequence[Progress]) -> None:
        """``FlashBatch.flash``'s ``on_progress``: the batch's live progress, read again at each snapshot.

        The batch moves its cards from phase to phase in its own threads, between two of these
        calls; keeping the objects (not a copy) lets the screen show "reading back" and
        "verifying" as they happen.
        """
        with self._lock:
            for item in progress:
                slot = self._slots.get(item.target.name)
                if slot is not None and slot.device_id == item.device_id and slot.flashed is None:
                    slot.progress = item
        self._changed()

    def flashed(self, results: Sequence[Flashed], remaining: int, write_pass: WritePass | None) -> None:
        """A batch's results, once the ids of its failed cards are back in the queue (``remaining``)."""
        with self._lock:
            listeners = list(self._listeners)
        # Counted before they are shown: a screen never shows a card that the metrics do not count yet.
        for listener in listeners:
            if write_pass is not None:
                listener.pass_done(write_pass)
            for flashed in results:
                listener.card_done(flashed)
        log = read_log(self.log)
        with self._lock:
            for flashed in results:
                slot = self._slot(flashed.target.name)
                slot.flashed, slot.progress, slot.seconds = flashed, None, flashed.seconds
                if flashed.result is Result.DELIVERED:
                    slot.state, slot.failures_in_a_row = SlotState.DELIVERED, 0
                    self._counts.delivered += 1
                    self._counts.seconds += flashed.seconds
                else:
                    slot.state = SlotState.FAILED
                    if flashed.failure is not None and flashed.failure.at_the_slot:
                        slot.failures_in_a_row += 1
                    self._counts.failed += 1
            self._counts.remaining = remaining
            self._counts.log = log
        self._changed()

    def ended(self) -> None:
        """The loop is over: stopped (asked to, or interrupted) or finished (no id left)."""
        with self._lock:
            done = self._counts.remaining == 0
            self._state = StationState.FINISHED if done else StationState.STOPPED
            for slot in self._slots.values():
                slot.progress = None
        self._changed()

    # -- the screen's one request ---------------------------------------------------------

    def ask_stop(self) -> int:
        """Stop after the cards in progress; how many there are. Asking again changes nothing."""
        with self._lock:
            if self._state not in (StationState.STOPPED, StationState.FINISHED):
                self._state = StationState.STOPPING
            busy = sum(1 for s in self._slots.values() if self._state_of(s).busy)
        self._stop.set()
        self._changed()
        return busy

    @property
    def stop_asked(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if a stop is asked meanwhile; whether one is."""
        return self._stop.wait(seconds)

    # -- read from any thread ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        now = self._clock()
        with self._lock:
            slots = tuple(self._view(self._slots[n], now) for n in sorted(self._slots, key=_natural))
            counts = self._counts
            hours = (now - counts.first_taken) / 3600 if counts.first_taken is not None else 0.0
            totals = Totals(
                delivered=counts.delivered,
                failed=counts.failed,
                remaining=counts.remaining,
                cards_per_hour=counts.delivered / hours if counts.delivered and hours > 0 else None,
                mean_seconds=counts.seconds / counts.delivered if counts.delivered else None,
            )
            return Snapshot(self._state, self.golden.name, slots, totals, counts.log, self._stop.is_set())

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot(name)
        return slot

    @staticmethod
    def _state_of(slot: _Slot) -> SlotState:
        return _OF_PHASE[slot.progress.phase] if slot.progress is not None else slot.state

    def _view(self, slot: _Slot, now: float) -> SlotView:
        state = self._state_of(slot)
        if state is SlotState.WRITING and slot.writing_since is None:
            slot.writing_since = now  # the first snapshot that sees it writing: its rate is counted from here
        written, total = (slot.progress.written, slot.progress.total) if slot.progress else (0, 0)
        flashed = slot.flashed
        if flashed is not None:
            written = total = flashed.bytes_written
        writing_for = now - slot.writing_since if slot.writing_since is not None else 0.0
        return SlotView(
            name=slot.name,
            identity=slot.identity,
            state=state,
            device_id=slot.device_id,
            written=written,
            total=total,
            elapsed=slot.seconds if slot.seconds is not None else (now - slot.started if slot.started else 0.0),
            rate=written / writing_for if state is SlotState.WRITING and writing_for > 0.5 else 0.0,
            error=flashed.error if flashed is not None else "",
            failure=flashed.failure if flashed is not None else None,
            failures_in_a_row=slot.failures_in_a_row,
        )

    def _changed(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener.changed()


def read_log(path: Path, lines: int = LOG_LINES) -> tuple[LogEntry, ...]:
    """The last ``lines`` entries of the line log, newest first; lines that are not an entry are skipped.

    Only the file's tail is read: the log grows for the life of a line and is shared by its stations.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - LOG_TAIL))
            tail = handle.read(LOG_TAIL).decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    if len(tail) > 1 and size > LOG_TAIL:
        tail = tail[1:]  # the first line read is most likely a piece of one
    entries = []
    for text in reversed(tail):
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(
                LogEntry(
                    *(str(entry.get(k) or "") for k in ("time", "device_id", "target", "result", "failure", "error"))
                )
            )
        if len(entries) == lines:
            break
    return tuple(entries)
