"""The station's screen as HTML: read from two metres, by colour and by word, with or without JavaScript.

The server renders every state: with JavaScript off, the page reloads itself
every few seconds (a refresh inside ``<noscript>``, which a browser running
scripts never sees). With JavaScript on, a small inline script swaps in the
board that the server pushes (Server-Sent Events) and sends the stop form
without leaving the page. No framework, no build step, nothing from another
site: the page is this module's text.

Every piece of text that comes from outside (ids, device names, errors, the
line log) is escaped here, and only here.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from html import escape

from imageprov.line.flash import Failure
from imageprov.line.station import LogEntry, SlotState, SlotView, Snapshot, StationState, Totals

REFRESH_SECONDS = 5  # with JavaScript off
NOTHING_YET = "&ndash;"  # a figure with no card to count yet

# What an operator reads on a tile, after its state's word: what to do with the card.
_ADVICE = {
    SlotState.EMPTY: "Insert a card.",
    SlotState.LEFT_ALONE: "Not flashed: it was in before the start. Take it out and put it back to flash it.",
    SlotState.PREPARING: "Do not pull.",
    SlotState.WRITING: "Do not pull.",
    SlotState.READING_BACK: "Do not pull.",
    SlotState.VERIFYING: "Do not pull.",
    SlotState.DELIVERED: "Done: pull the card.",
    SlotState.FAILED: "Pull the card and set it aside.",
}

# Why a card failed, in words; the error's text follows, for whoever looks closer.
REASONS = {
    Failure.REFUSED: "Card refused",
    Failure.ALREADY_DELIVERED: "This device id is on another card already",
    Failure.STAMP: "Its credentials could not be made",
    Failure.BUSY: "Card in use by another program",
    Failure.WRITE: "Write error",
    Failure.READ_BACK: "Card reads back wrong",
    Failure.VERIFY: "Card failed verification",
    Failure.NOT_CONFIRMED: "The registry did not confirm the delivery",
    Failure.INTERRUPTED: "Interrupted",
}

_HEADLINE = {
    StationState.PREPARING: "Preparing the golden image",
    StationState.WAITING: "Insert a card",
    StationState.FLASHING: "Flashing",
    StationState.STOPPING: "Stopping after the cards in progress",
    StationState.STOPPED: "Stopped",
    StationState.FINISHED: "Finished: every id delivered",
}

CSS = """
:root { color-scheme: dark; --empty: #3b4148; --busy: #1559b7; --check: #6a2fa0; --ok: #17803a; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; padding: 1rem; background: #111418; color: #f4f6f8;
  font: 600 clamp(18px, 1.5vw, 30px)/1.25 system-ui, "DejaVu Sans", sans-serif; }
#link { float: right; font-size: .7em; opacity: .8; }
#link[data-link="lost"] { color: #ffb4ab; opacity: 1; }
.station { padding: .4em .7em; border-radius: .3em; margin-bottom: .6em; background: var(--empty); }
.station h1 { margin: 0; font-size: 2em; text-transform: uppercase; letter-spacing: .03em; }
.station p { margin: .2em 0 0; font-size: .8em; opacity: .9; }
.station.flashing { background: var(--busy); } .station.stopping { background: #8a5a00; }
.station.finished { background: var(--ok); }
.totals { display: flex; flex-wrap: wrap; gap: .5em; margin-bottom: .6em; }
.total { flex: 1 1 8em; background: #22272e; border-radius: .3em; padding: .3em .6em; }
.total .n { display: block; font-size: 2.2em; line-height: 1.1; }
.total .k { font-size: .8em; opacity: .85; }
.slots { display: grid; grid-template-columns: repeat(auto-fill, minmax(16em, 1fr)); gap: .6em; }
.slot { border-radius: .3em; padding: .5em .7em; background: var(--empty); border: .25em solid transparent; }
.slot .word { font-size: 2em; text-transform: uppercase; letter-spacing: .03em; }
.slot .id { font-size: 1.7em; font-family: "DejaVu Sans Mono", monospace; }
.slot .advice { font-size: .9em; }
.slot .meta, .slot .identity { font-size: .7em; opacity: .9; font-weight: 400; overflow-wrap: anywhere; }
.slot .reason { margin-top: .3em; font-size: .8em; overflow-wrap: anywhere; }
.slot .reason small { display: block; font-weight: 400; font-size: .85em; }
.warn { margin-top: .4em; padding: .3em .4em; background: #ffd54f; color: #1b1b1b; border-radius: .2em; }
.slot.bad-reader { border-color: #ffd54f; }
.bar { height: .7em; background: rgba(255,255,255,.25); border-radius: .35em; margin: .3em 0; overflow: hidden; }
.bar div { height: 100%; background: #fff; }
.s-preparing, .s-writing { background: var(--busy); }
.s-reading-back, .s-verifying { background: var(--check); }
.s-delivered { background: var(--ok); }
.s-failed { background: var(--bad); }
.s-left-alone { background: #2a2e33; border: .25em dashed #6b737c; }
.log { margin-top: .8em; font-size: .75em; }
.log h2 { font-size: 1.1em; margin: 0 0 .3em; }
.log table { width: 100%; border-collapse: collapse; }
.log td, .log th { text-align: left; padding: .15em .4em; border-bottom: 1px solid #2c323a; font-weight: 400; }
.log .r-delivered { color: #8ee59f; } .log .r-failed { color: #ffb4ab; }
.controls { margin-top: .8em; }
.controls button { font: inherit; font-size: 1em; padding: .4em 1em; border-radius: .3em; border: 0;
  background: #e8eaed; color: #111; cursor: pointer; }
.controls button[disabled] { opacity: .5; cursor: default; }
"""

# Swap in the boards the server pushes; send the stop form without leaving the page. Should the stream
# never connect (a proxy that holds it back), reload now and then, as the page does without scripts.
SCRIPT = """
"use strict";
(function () {
  var board = document.getElementById("board"), link = document.getElementById("link"), connected = false;
  function show(text, live) { link.textContent = text; link.dataset.link = live ? "live" : "lost"; }
  var source = new EventSource("events");
  source.addEventListener("open", function () { connected = true; show("live", true); });
  source.addEventListener("board", function (event) { board.innerHTML = event.data; show("live", true); });
  source.addEventListener("error", function () {
    show("connection lost: the station may have stopped; this is its last state", false);
  });
  setInterval(function () { if (!connected) { location.reload(); } }, 10000);
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.hasAttribute("data-fetch")) { return; }
    event.preventDefault();
    form.querySelector("button").disabled = true;
    fetch(form.action, { method: "POST", body: new URLSearchParams(new FormData(form)), credentials: "same-origin" })
      .then(function (response) { if (!response.ok) { show("refused: " + response.status, false); } })
      .catch(function () { show("the station did not answer", false); });
  });
})();
"""
# For the Content-Security-Policy: this script, and no other, may run.
SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()


def page(snapshot: Snapshot, csrf: str) -> str:
    """The whole page: what the station shows now, and the means to follow it."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(_headline(snapshot))} · imageprov line station</title>
<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>
<style>{CSS}</style></head>
<body><div id="link" data-link="static">updated every {REFRESH_SECONDS} s</div>
<main id="board">{board(snapshot, csrf)}</main>
<script>{SCRIPT}</script></body></html>
"""


def board(snapshot: Snapshot, csrf: str) -> str:
    """The part of the page that changes: what the server pushes."""
    state = snapshot.state
    remaining = snapshot.totals.remaining
    detail = f"{remaining} id{'' if remaining == 1 else 's'} to go · golden image {snapshot.golden}"
    parts = [
        f'<header class="station {state.value}" data-station="{state.value}">'
        f"<h1>{escape(_headline(snapshot))}</h1><p>{escape(detail)}</p></header>",
        _totals(snapshot.totals),
        '<section class="slots">',
        *(_slot(s) for s in snapshot.slots),
        "</section>",
        _log(snapshot.log),
        _controls(snapshot, csrf),
    ]
    return "".join(parts)


def sign_in_page(*, wrong: bool) -> str:
    """The form that asks a screen for the station's token, once (a cookie keeps it)."""
    note = '<p class="warn">Wrong token.</p>' if wrong else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in · imageprov line station</title>
<style>{CSS}</style></head>
<body><main><header class="station"><h1>Line station</h1><p>Enter the station's dashboard token.</p></header>
{note}<form method="post" action="sign-in" class="controls">
<input type="password" name="token" autocomplete="current-password" autofocus required
 style="font: inherit; padding: .3em; width: 20em; max-width: 100%">
<button>Sign in</button></form></main></body></html>
"""


def _headline(snapshot: Snapshot) -> str:
    if snapshot.state is StationState.FLASHING:
        busy = sum(1 for s in snapshot.slots if s.state.busy)
        return f"Flashing {busy} card{'' if busy == 1 else 's'}"
    return _HEADLINE[snapshot.state]


def _totals(totals: Totals) -> str:
    figures = [
        ("delivered", str(totals.delivered), "delivered"),
        ("failed", str(totals.failed), "failed"),
        ("remaining", str(totals.remaining), "ids to go"),
        (
            "cards-per-hour",
            NOTHING_YET if totals.cards_per_hour is None else f"{totals.cards_per_hour:.0f}",
            "cards / hour",
        ),
        (
            "mean-seconds",
            NOTHING_YET if totals.mean_seconds is None else f"{totals.mean_seconds:.1f}",
            "seconds / card",
        ),
    ]
    cells = (f'<div class="total" data-total="{k}"><span class="n">{n}</span><span class="k">{w}</span></div>'
             for k, n, w in figures)  # fmt: skip
    return f'<section class="totals">{"".join(cells)}</section>'


def _slot(slot: SlotView) -> str:
    state = slot.state
    kind = state.value.replace(" ", "-")
    inner = [f'<div class="word">{escape(state.value)}</div>']
    if slot.device_id is not None and state is not SlotState.EMPTY:
        inner.append(f'<div class="id">{escape(slot.device_id)}</div>')
    inner.append(f'<div class="advice">{_ADVICE[state]}</div>')
    meta = [slot.node]
    if state.busy or state in (SlotState.DELIVERED, SlotState.FAILED):
        meta.append(_duration(slot.elapsed))
    if state is SlotState.WRITING:
        share = 100 * slot.written // slot.total if slot.total else 0
        inner.append(f'<div class="bar" role="progressbar" aria-valuenow="{share}" aria-valuemin="0" '
                     f'aria-valuemax="100"><div style="width: {share}%"></div></div>')  # fmt: skip
        meta.append(f"{share}%")
        if slot.rate:
            meta.append(f"{slot.rate / 1e6:.1f} MB/s")
    elif state is SlotState.DELIVERED and slot.written:
        meta.append(f"{slot.written / 1e6:.0f} MB written")
    inner.append(f'<div class="meta">{escape(" · ".join(meta))}</div>')
    if slot.identity:
        inner.append(f'<div class="identity">{escape(slot.identity)}</div>')
    if state is SlotState.FAILED:
        reason = REASONS[slot.failure] if slot.failure is not None else "Failed"
        inner.append(f'<div class="reason">{escape(reason)}<small>{escape(slot.error)}</small></div>')
    if slot.bad_reader:
        inner.append(f'<div class="warn" role="alert">Failed {slot.failures_in_a_row} times in a row in this slot: '
                     "a bad reader, not a bad card. Check or replace the reader.</div>")  # fmt: skip
    device_id = f' data-device-id="{escape(slot.device_id)}"' if slot.device_id is not None else ""
    classes = f"slot s-{kind}{' bad-reader' if slot.bad_reader else ''}"
    return (f'<article class="{classes}" data-slot="{escape(slot.name)}" data-state="{kind}"{device_id}>'
            f'{"".join(inner)}</article>')  # fmt: skip


def _log(entries: Iterable[LogEntry]) -> str:
    rows = []
    for entry in entries:
        result = entry.result if entry.result in ("delivered", "failed") else "other"
        why = entry.error or entry.failure
        cells = [entry.time.replace("T", " ").removesuffix("+00:00"), entry.device_id, entry.target, entry.result, why]
        rows.append(f'<tr class="r-{result}">' + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        rows.append('<tr><td colspan="5">Nothing in the line log yet.</td></tr>')
    head = "<tr><th>time (UTC)</th><th>device id</th><th>card</th><th>result</th><th>why</th></tr>"
    return f'<section class="log"><h2>Line log, newest first</h2><table>{head}{"".join(rows)}</table></section>'


def _controls(snapshot: Snapshot, csrf: str) -> str:
    over = snapshot.stop_asked or snapshot.state in (StationState.STOPPED, StationState.FINISHED)
    label = "Stopping after the cards in progress" if snapshot.stop_asked else "Stop after the cards in progress"
    return (f'<form class="controls" method="post" action="stop" data-fetch>'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<button type="submit"{" disabled" if over else ""}>{label}</button></form>')  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60:02d} s"
