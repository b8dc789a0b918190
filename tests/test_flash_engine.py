"""The fan-out copy engine and the sparse partition copies, on files (no root needed).

Interesting sparse sources as bmaptool's tests make them: one hole, a span of
block size + 1, spans at unaligned offsets (written through the buffered
fallback), random holes; every target must read back exactly the shared
spans and its own, and nothing else may change.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageprov.disk.fanout import CHUNK, Span, Target, fan_out, read_back
from imageprov.line.flash import _outside, _spans_in, copy_spans
from tests.conftest import tool

SIZE = 3 * CHUNK + 12345 * 512  # not a multiple of the chunk


def _source(path: Path, seed: int, holes: list[tuple[int, int]], size: int = SIZE) -> bytes:
    """A file of random bytes with real holes (punched) at ``holes``; its content."""
    data = bytearray(random.Random(seed).randbytes(size))
    for a, b in holes:
        data[a:b] = bytes(b - a)
    path.write_bytes(data)
    for a, b in holes:
        tool("fallocate", "--punch-hole", "--offset", str(a), "--length", str(b - a), path)
    return bytes(data)


def _target(path: Path, stale: int, own: Path | None = None, ranges: tuple[tuple[int, int], ...] = ()) -> Target:
    """A card as a file, opened with O_DIRECT as cards are (unaligned pieces then take the buffered path)."""
    path.write_bytes(bytes([stale]) * SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    return Target(str(path), path, fd, True, 4096, own, ranges)


@pytest.mark.parametrize(
    "shared",
    [
        [(0, SIZE)],  # everything, one span
        [(0, 4096), (8192, 8192 + 4097)],  # one hole; block size + 1
        [(513, 1025), (CHUNK - 7, CHUNK + 9), (SIZE - 100, SIZE)],  # unaligned offsets and lengths
    ],
)
def test_every_target_gets_the_shared_spans_and_its_own(tmp_path: Path, shared: list[tuple[int, int]]) -> None:
    golden = _source(tmp_path / "golden", 1, [])
    own_region = (2 * CHUNK, 2 * CHUNK + 3 * 4096 + 100)
    shared = _outside(shared, [own_region])
    owns, targets = [], []
    for i in range(3):
        own = _source(tmp_path / f"own{i}", 10 + i, [])
        ranges = ((own_region[0], own_region[0] + 4096 * (i + 1)),)
        owns.append((own, ranges))
        path = tmp_path / f"card{i}"
        targets.append(_target(path, 0xA5, tmp_path / f"own{i}", ranges))
    spans = [Span(a, b, tmp_path / "golden") for a, b in shared] + [Span(*own_region, None)]
    try:
        outcomes, read = fan_out(spans, targets)
    finally:
        for t in targets:
            os.close(t.fd)
    assert read == {tmp_path / "golden": sum(b - a for a, b in shared)}  # once, whatever the number of targets
    for target, outcome, (own, ranges) in zip(targets, outcomes, owns):
        assert outcome.error is None
        assert outcome.written == outcome.total == sum(b - a for a, b in shared) + sum(b - a for a, b in ranges)
        expected = bytearray([0xA5]) * SIZE
        for a, b in shared:
            expected[a:b] = golden[a:b]
        for a, b in ranges:
            expected[a:b] = own[a:b]
        assert target.path.read_bytes() == bytes(expected)
        assert read_back(target, outcome.chunks) is None


def test_read_back_finds_a_changed_byte(tmp_path: Path) -> None:
    _source(tmp_path / "golden", 2, [])
    target = _target(tmp_path / "card", 0)
    try:
        [outcome], _ = fan_out([Span(0, 3 * 4096, tmp_path / "golden")], [target])
    finally:
        os.close(target.fd)
    with open(target.path, "r+b") as handle:
        handle.seek(5000)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    assert "reads back differently" in str(read_back(target, outcome.chunks))


def test_a_failing_target_stops_alone(tmp_path: Path) -> None:
    _source(tmp_path / "golden", 3, [])
    good = _target(tmp_path / "good", 0)
    (tmp_path / "bad").write_bytes(b"")
    bad_fd = os.open(tmp_path / "bad", os.O_RDONLY)  # every write fails: EBADF
    bad = Target("bad card", tmp_path / "bad", bad_fd, False, 512)
    try:
        (ok, failed), _ = fan_out([Span(0, 2 * CHUNK, tmp_path / "golden")], [good, bad])
    finally:
        os.close(good.fd)
        os.close(bad_fd)
    assert ok.error is None and ok.written == 2 * CHUNK
    assert failed.error is not None and failed.error.startswith("bad card: write failed at byte 0")


SMALL = (1 << 20) + 7 * 512


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    holes=st.lists(st.tuples(st.integers(0, SMALL // 4096 - 1), st.integers(1, 32)), max_size=6),
    spans=st.lists(st.tuples(st.integers(0, SMALL - 1), st.integers(1, SMALL)), min_size=1, max_size=4),
)
def test_copy_spans_copies_exactly_the_spans(
    tmp_path: Path, holes: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> None:
    hole_bytes = [(b * 4096, min(SMALL, (b + n) * 4096)) for b, n in holes]
    source = _source(tmp_path / "src", 4, hole_bytes, SMALL)
    spans = sorted({(a, min(SMALL, a + n)) for a, n in spans})
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    dst = tmp_path / "dst"
    dst.write_bytes(b"")
    copy_spans(tmp_path / "src", dst, merged)
    copied = dst.read_bytes()
    assert len(copied) == SMALL
    expected = bytearray(SMALL)
    for a, b in merged:
        expected[a:b] = source[a:b]
    assert copied == bytes(expected)
    # Sparse: no more allocated than the spans hold.
    assert os.stat(dst).st_blocks * 512 <= sum(b - a for a, b in merged) + 2 * 4096 * len(merged)
    dst.unlink()


def test_range_arithmetic() -> None:
    assert _spans_in([(0, 10), (20, 30)], 5, 25) == [(5, 10), (20, 25)]
    assert _outside([(0, 100)], [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert _outside([(0, 10)], [(0, 10)]) == []
