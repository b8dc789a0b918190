"""Many instances (issue 25): two ``edge serve`` replicas, each behind its own real nginx, sharing one
PostgreSQL registry (tests/pg.py) and one stand-in Mender server, give the same answers; and one killed in the
middle of a fleet switching on loses no device.

``edge nginx --accept`` takes one service address, so each replica has its own nginx, and the devices know both
(mender.conf's ``Servers``: tests/edge_replicas.py). What the replicas share is the registry alone: a test here
fails if identity pins, revocations or the Mender device ids that preauthorization records were kept per process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import imageprov_pki
from tests.edge_fleet import NO_ANSWER, ClientRetry, make_fleet, standin_process
from tests.edge_replicas import (
    DEVICES,
    Board,
    EdgeFiles,
    RecordingStandin,
    Replica,
    Spread,
    Tracked,
    make_board,
    mender_devices,
    once,
    recording_standin,
    register,
    replicas,
    shared_pki,
    switch_on_across,
)
from tests.edge_support import decisions, public_pem, wait_for
from tests.pg import Postgres, running_postgres

# The Mender client's schedule with a minute made 0.1 s (as tests/test_edge_load.py): 12 retries within ~4 s.
CLIENT = ClientRetry().scaled(0.1 / 60)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres
) -> Iterator[tuple[EdgeFiles, RecordingStandin, Replica, Replica]]:
    tmp_path = tmp_path_factory.mktemp("replicas")
    files = shared_pki(tmp_path / "edge", postgres)
    with recording_standin() as standin, replicas(tmp_path, files, standin.url) as (a, b):
        yield files, standin, a, b


def _board(files: EdgeFiles, tmp_path: Path, name: str) -> Board:
    board = make_board(files, tmp_path / "boards", name)
    register(files, [board])
    return board


def _pins(files: EdgeFiles, identity: dict[str, Any]) -> list[tuple[object, ...]]:
    """The current pins of ``identity``: (serial, mender_device_id, cut_at)."""
    canonical = _canonical(identity).replace("'", "''")
    return files.rows(
        f"SELECT serial, mender_device_id, cut_at FROM pins WHERE released_at IS NULL AND identity = '{canonical}'"
    )


def _reasons(replica: Replica, cn: str) -> list[tuple[str, str | None]]:
    return [(d["decision"], d.get("reason")) for d in decisions(replica.service["log"]) if d.get("cn") == cn]


def _auth_sets(standin: RecordingStandin, identity: dict[str, Any]) -> dict[str, str]:
    """Mender's auth sets of the identity's device: public key PEM (stripped) -> status."""
    device = standin.device(identity)
    assert device is not None, f"Mender holds no device {identity}"
    with standin.lock:
        return {a.pubkey.strip(): a.status for a in device.auth_sets}


def _pubkey(board: Board) -> str:
    return public_pem(board.key).strip()


def _canonical(identity: dict[str, Any]) -> str:
    """An identity as the registry pins it (canonical JSON)."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- coherence ---------------------------------------------------------------------------------------------


def test_a_device_accepted_through_one_replica_is_accepted_through_the_other(
    tmp_path: Path, pair: tuple[EdgeFiles, RecordingStandin, Replica, Replica]
) -> None:
    files, standin, a, b = pair
    board = _board(files, tmp_path, "ONE-1")
    identity = {"serial": board.name}
    through_a = board.auth(a, identity)
    through_b = board.auth(b, identity)
    assert (through_a[0], through_b[0]) == (200, 200)
    # The token A brought passes B's route check (and the reverse): both ask the same registry.
    assert (board.poll(b, through_a[1]), board.poll(a, through_b[1])) == (204, 204)
    assert _auth_sets(standin, identity) == {_pubkey(board): "accepted"}
    assert not [p for p in standin.preauthorized if p["identity_data"] == identity and p.get("force")]
    # One pin, recorded by whichever replica came first, with the Mender device it took.
    device = standin.device(identity)
    assert device is not None
    assert _pins(files, identity) == [(board.serial, device.id, None)]


def test_an_identity_pinned_through_one_replica_is_refused_to_another_certificate_through_the_other(
    tmp_path: Path, pair: tuple[EdgeFiles, RecordingStandin, Replica, Replica]
) -> None:
    files, standin, a, b = pair
    holder, claimant = _board(files, tmp_path, "PIN-1"), _board(files, tmp_path, "PIN-2")
    identity = {"serial": holder.name}
    assert holder.auth(a, identity)[0] == 200
    # Through B (which never saw the holder), then A, then B again: never, and never forced into Mender.
    assert [claimant.auth(b, identity)[0], claimant.auth(a, identity)[0], claimant.auth(b, identity)[0]] == [401] * 3
    assert _reasons(b, claimant.name) == [("refused", "identity-taken")] * 2
    assert _reasons(a, claimant.name) == [("refused", "identity-taken")]
    assert holder.auth(b, identity)[0] == 200
    assert _auth_sets(standin, identity) == {_pubkey(holder): "accepted"}
    assert not [p for p in standin.preauthorized if p["pubkey"].strip() == _pubkey(claimant)]
    assert [row[0] for row in _pins(files, identity)] == [holder.serial]


REVOKED = 4
CUT_OFF = "imageprov_edge_cut_off_total"


def _accepted_through_both(boards: list[Board], a: Replica, b: Replica) -> dict[str, list[bytes]]:
    """Each board accepted through A, then B (both have it cached, its standing fresh); its two tokens, which
    pass both route checks."""
    tokens: dict[str, list[bytes]] = {}
    for board in boards:
        identity = {"serial": board.name}
        answers = [board.auth(a, identity), board.auth(b, identity)]
        assert [status for status, _ in answers] == [200, 200]
        tokens[board.name] = [token for _, token in answers]
        assert [board.poll(a, tokens[board.name][0]), board.poll(b, tokens[board.name][1])] == [204, 204]
    return tokens


def _settled_cut_off(files: EdgeFiles, boards: list[Board]) -> None:
    """Wait until every board's pin is marked cut off, and then until each replica has begun a round of its
    cut-off since: any round begun before the last mark is over by then (a replica's rounds follow each other).
    A round begins with the select of the current pins not yet cut (its registry connection's last query, in
    pg_stat_activity: one connection per replica)."""

    def all_cut() -> bool:
        return all(_pins(files, {"serial": board.name})[0][2] is not None for board in boards)

    wait_for(all_cut, "the revoked devices to be cut off in Mender", timeout=60)
    marked = files.rows("SELECT now()")[0][0]

    def both_rounds_since() -> bool:
        backends = files.rows(
            f"SELECT query_start > '{marked}'::timestamptz AND query ILIKE 'select%cut_at IS NULL%' "
            f"FROM pg_stat_activity WHERE datname = '{files.db.database}' AND pid <> pg_backend_pid()"
        )
        return len(backends) == 2 and all(row[0] for row in backends)

    wait_for(both_rounds_since, "a round of both replicas' cut-off after the last cut", timeout=30)


def _refused(board: Board, replica: Replica, token: bytes) -> bool:
    return board.poll(replica, token) == 403


def _rejections(standin: RecordingStandin, board: Board) -> list[int]:
    """The statuses of every call that set the board's auth set's status in Mender (or dismissed it)."""
    device = standin.device({"serial": board.name})
    assert device is not None
    return [c.status for c in standin.answered(path=f"{DEVICES}/{device.id}/auth/") if c.method in ("PUT", "DELETE")]


def test_a_revoked_certificate_is_refused_by_both_and_cut_off_in_mender_once(
    tmp_path: Path, pair: tuple[EdgeFiles, RecordingStandin, Replica, Replica]
) -> None:
    files, standin, a, b = pair
    boards = [_board(files, tmp_path, f"REV-{n}") for n in range(REVOKED)]
    tokens = _accepted_through_both(boards, a, b)
    for board in boards:
        imageprov_pki("revoke", "--pki", files.pki, board.name)
    for board in boards:
        identity = {"serial": board.name}
        assert [board.auth(a, identity)[0], board.auth(b, identity)[0]] == [401, 401]
        assert ("refused", "revoked") in _reasons(a, board.name) and ("refused", "revoked") in _reasons(b, board.name)
        # The route check of both nginx cuts the device off within the recheck window (2 s).
        for replica, token in zip((a, b), tokens[board.name]):
            wait_for(partial(_refused, board, replica, token), f"{replica.name}'s route check to refuse {board.name}")
    _settled_cut_off(files, boards)
    for board in boards:
        assert _auth_sets(standin, {"serial": board.name}) == {_pubkey(board): "rejected"}
        # Rejected in Mender by one replica, once. (A second replica's attempt while Mender is slow: below.)
        assert _rejections(standin, board) == [204]


def test_a_revoked_certificate_is_cut_off_by_one_replica_while_mender_is_slow(
    tmp_path: Path, pair: tuple[EdgeFiles, RecordingStandin, Replica, Replica]
) -> None:
    """Mender answering a device read after 2 s (longer than the cut-off's 1 s round): both replicas' rounds
    see the revoked pin before either has rejected it. One must leave it to the other."""
    files, standin, a, b = pair
    board = _board(files, tmp_path, "SLOW-1")
    _accepted_through_both([board], a, b)
    before = a.metric(CUT_OFF) + b.metric(CUT_OFF)
    standin.device_read_delay = 2.0
    try:
        imageprov_pki("revoke", "--pki", files.pki, board.name)
        _settled_cut_off(files, [board])
    finally:
        standin.device_read_delay = 0.0
    assert _auth_sets(standin, {"serial": board.name}) == {_pubkey(board): "rejected"}
    assert (_rejections(standin, board), a.metric(CUT_OFF) + b.metric(CUT_OFF) - before) == ([204], 1)


RACES = 6


def _race(
    board: Board, replica: Replica, identity: dict[str, Any], start: threading.Barrier, statuses: dict[str, int]
) -> None:
    start.wait()  # both requests leave together
    statuses[board.name] = board.auth(replica, identity)[0]


def test_two_certificates_racing_for_one_identity_through_both_replicas_end_with_one_winner(
    tmp_path: Path, pair: tuple[EdgeFiles, RecordingStandin, Replica, Replica]
) -> None:
    files, standin, a, b = pair
    for race in range(RACES):
        first, second = _board(files, tmp_path, f"RACE-{race}-1"), _board(files, tmp_path, f"RACE-{race}-2")
        identity = {"serial": f"RACE-{race}"}
        # Alternate which certificate goes through which replica.
        contenders = [(first, a), (second, b)] if race % 2 == 0 else [(first, b), (second, a)]
        statuses: dict[str, int] = {}
        start = threading.Barrier(2, timeout=30)
        threads = [
            threading.Thread(target=_race, args=(board, replica, identity, start, statuses))
            for board, replica in contenders
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert sorted(statuses.values()) == [200, 401], statuses
        winner, loser = (first, second) if statuses[first.name] == 200 else (second, first)
        loser_via = next(replica for board, replica in contenders if board is loser)
        other = b if loser_via is a else a
        assert _reasons(loser_via, loser.name) == [("refused", "identity-taken")]
        # The loser is refused through the other replica too; the winner is accepted through both.
        assert loser.auth(other, identity)[0] == 401
        assert [winner.auth(a, identity)[0], winner.auth(b, identity)[0]] == [200, 200]
        assert [row[0] for row in _pins(files, identity)] == [winner.serial]
        assert not files.rows(f"SELECT 1 FROM pins WHERE serial = '{loser.serial}'")
        # Mender holds the winner's key alone, accepted; the loser's never reached it, and nothing was forced.
        assert _auth_sets(standin, identity) == {_pubkey(winner): "accepted"}
        mine = [p for p in standin.preauthorized if p["identity_data"] == identity]
        assert mine and all(p["pubkey"].strip() == _pubkey(winner) and not p.get("force") for p in mine)


# -- failover ----------------------------------------------------------------------------------------------

FLEET = 200
RATE = 50.0  # devices switched on a second: 4 s of arrivals
KILL_AFTER = 20  # devices accepted through A before its edge serve is killed
CAUGHT = 3  # requests waiting on A when it is killed
DEADLINE = 180.0


def test_a_replica_killed_mid_load_loses_no_device(tmp_path: Path, postgres: Postgres) -> None:
    files = shared_pki(tmp_path / "edge", postgres)
    fleet = make_fleet(files.ca, FLEET, tmp_path / "fleet", files.server_ca, "fo")
    register(files, fleet)
    killed: dict[str, float] = {}
    caught: list[str] = []  # devices whose request A held when it was killed
    with standin_process() as standin, replicas(tmp_path, files, standin["url"]) as (a, b):
        # Half the fleet lists A first, half B first.
        tracked = [Tracked(d, [a, b] if i % 2 == 0 else [b, a]) for i, d in enumerate(fleet)]

        async def kill_a(spread: Spread) -> None:
            # Once A has accepted its share, it is frozen, and killed while requests wait on it.
            while len(spread.accepted_by("A")) < KILL_AFTER:
                assert time.monotonic() - spread.started < 60, "A accepted too few devices"
                await asyncio.sleep(0.01)
            a.freeze()
            # Only requests sent after the freeze: one sent before may have its answer from A on its way.
            frozen = time.monotonic()
            while len(spread.waiting_on("A", sent_after=frozen)) < CAUGHT:
                assert time.monotonic() - spread.started < 60, "too few devices reached A once it was frozen"
                await asyncio.sleep(0.01)
            caught.extend(d.device.name for d in spread.waiting_on("A", sent_after=frozen))
            a.kill()
            killed["at"] = time.monotonic()
            killed["accepted"] = len([d for d in spread.devices if d.accepted_by])
            spread.release()  # the second half of the fleet comes now, half of it to A first

        # The first half arrives on the schedule (A is killed among it), the second only after the kill.
        spread = switch_on_across(tracked, CLIENT, rate=RATE, deadline=DEADLINE, meanwhile=kill_a, held_from=FLEET // 2)
        assert a.service["proc"].wait(10) == -9
        at = killed["at"]
        a_lines, b_lines = decisions(a.service["log"]), decisions(b.service["log"])
        held = mender_devices(standin["url"])
        pins = files.rows("SELECT serial, identity, mender_device_id FROM pins WHERE released_at IS NULL")
        # A device A accepted before it died, revoked now: B refuses it, and cuts it off in Mender by the
        # device id A recorded.
        victim = next(d for d in spread.accepted_by("A", before=at))
        imageprov_pki("revoke", "--pki", files.pki, victim.device.name)
        refused = once(victim.device, b)

        def victim_rejected() -> bool:
            found = [d for d in mender_devices(standin["url"]) if d["identity_data"] == victim.device.identity]
            return [s["status"] for s in found[0]["auth_sets"]] == ["rejected"]

        wait_for(victim_rejected, "B to cut off in Mender a device A accepted", timeout=60)
    by_name = {t.device.name: t for t in spread.devices}
    statuses = [t.status for d in spread.devices for t in d.tries]
    print(
        f"\n{FLEET} devices over two replicas, A killed after {killed['accepted']} were accepted,"
        f" holding {len(caught)} requests:"
        f" tries {dict(sorted(Counter(statuses).items()))},"
        f" accepted by A {len(spread.accepted_by('A'))}, by B {len(spread.accepted_by('B'))},"
        f" attempts per device max {max(spread.attempts(d) for d in spread.devices)}"
    )
    # The kill came mid-load, and A had been serving its share.
    assert len(spread.accepted_by("A", before=at)) >= KILL_AFTER
    assert len([line for line in a_lines if line["decision"] == "accepted"]) >= KILL_AFTER
    after = [d for d in spread.devices if d.started is not None and d.started > at and d.servers[0].name == "A"]
    assert len(after) >= FLEET // 4, "too few devices came after the kill to A first"
    # Nothing answered 200 from A once it was dead; its devices went to B.
    assert all(t.status != 200 for d in spread.devices for t in d.tries if t.server == "A" and t.started > at)
    assert all(d.accepted_by == "B" for d in after)
    assert all(t.status in (502, NO_ANSWER) for d in after for t in d.tries if t.server == "A")
    # The requests A held when it died failed, and their devices were accepted through B.
    assert len(caught) >= CAUGHT
    for name in caught:
        lost = [t for t in by_name[name].tries if t.server == "A" and t.started < at < t.ended]
        assert [t.status in (502, NO_ANSWER) for t in lost] == [True], (name, by_name[name].tries)
        assert by_name[name].accepted_by == "B"
    # No device lost: each accepted within the client's schedule.
    assert {name: t.accepted_by for name, t in by_name.items() if t.accepted_by is None} == {}
    assert max(spread.attempts(d) for d in spread.devices) <= CLIENT.attempts
    assert not [line for line in a_lines + b_lines if line["decision"] == "error"]
    # Mender's view: every device accepted once, with its own key: one auth set each, accepted.
    summary = standin["summary"]
    assert summary["deviations"] == []
    known = {d["identity"]["serial"]: d for d in summary["devices"]}
    assert set(known) == set(by_name)
    victim_name = victim.device.name
    for device in fleet:
        found = known[device.name]
        expected = "rejected" if device.name == victim_name else "accepted"
        assert (found["status"], found["auth_sets"], found["pubkey"].strip()) == (
            expected, 1, device.pubkey.strip(),
        ), device.name  # fmt: skip
    # The registry's view: one pin per device, each naming the Mender device that holds its identity, whichever
    # replica preauthorized it (and whether A died half-way through).
    ids = {_canonical(d["identity_data"]): d["id"] for d in held}
    serials = {f"{d.cert.serial_number:x}": d for d in fleet}
    assert len(pins) == FLEET
    for serial, identity, mender_id in pins:
        device = serials[str(serial)]
        assert json.loads(str(identity)) == device.identity
        assert mender_id == ids[_canonical(device.identity)], device.name
    assert refused == 401
    assert ("refused", "revoked") in [(line["decision"], line.get("reason")) for line in decisions(b.service["log"])
                                      if line.get("cn") == victim_name]  # fmt: skip
