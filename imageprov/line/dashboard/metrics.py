"""The station's Prometheus metrics: cards by result and reason, bytes, seconds per card, golden reads.

Counters follow the station's events (a :class:`Listener`); what the station
is doing right now (slots by state, ids to go) is read from a snapshot at
each scrape. One registry per dashboard, as the edge keeps one per
application: nothing of the process's default registry leaks in.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imageprov.line.flash import Flashed, Result, WritePass
from imageprov.line.station import Listener, SlotState, Station

# Seconds per card: a small image on a fast card takes seconds; 16 GB at 20 MB/s, a quarter of an hour.
CARD_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0)
NOT_FAILED = "none"  # the reason of a delivered card


class StationMetrics(Listener):
    def __init__(self, station: Station) -> None:
        self.registry = CollectorRegistry()
        self.cards = Counter(
            "imageprov_station_cards", "Cards finished, by result and by why they failed (none: delivered)",
            ["result", "reason"], registry=self.registry,
        )  # fmt: skip
        self.cards.labels(Result.DELIVERED.value, NOT_FAILED)  # at 0 from the start, for rate()
        self.bytes_written = Counter(
            "imageprov_station_bytes_written", "Bytes written to cards", registry=self.registry
        )
        self.card_seconds = Histogram(
            "imageprov_station_card_seconds", "Seconds per card, from taking it to its result, by result",
            ["result"], buckets=CARD_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.passes = Counter(
            "imageprov_station_passes", "Passes over the golden image, each writing every card of a batch",
            registry=self.registry,
        )  # fmt: skip
        self.golden_reads = Histogram(
            "imageprov_station_golden_reads", "Times the golden image was read in one pass (1: once for all its cards)",
            buckets=(0.5, 1.0, 1.5, 2.0, 3.0), registry=self.registry,
        )  # fmt: skip
        self.registry.register(_Now(station))

    def card_done(self, flashed: Flashed) -> None:
        reason = flashed.failure.value if flashed.failure is not None else NOT_FAILED
        self.cards.labels(flashed.result.value, reason).inc()
        self.bytes_written.inc(flashed.bytes_written)
        self.card_seconds.labels(flashed.result.value).observe(flashed.seconds)

    def pass_done(self, write_pass: WritePass) -> None:
        self.passes.inc()
        if write_pass.golden_bytes:
            self.golden_reads.observe(write_pass.golden_reads)


class _Now(Collector):
    """What the station is doing at the moment of a scrape."""

    def __init__(self, station: Station) -> None:
        self.station = station

    def collect(self) -> Iterator[Metric]:
        snapshot = self.station.snapshot()
        slots = GaugeMetricFamily("imageprov_station_slots", "Card slots, by the state of their card", labels=["state"])
        for state in SlotState:
            slots.add_metric([state.value], sum(1 for s in snapshot.slots if s.state is state))
        yield slots
        yield GaugeMetricFamily("imageprov_station_ids_remaining", "Ids not delivered yet", snapshot.totals.remaining)
        yield GaugeMetricFamily(
            "imageprov_station_bad_readers", "Slots whose cards failed twice in a row or more",
            sum(1 for s in snapshot.slots if s.bad_reader),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "imageprov_station_stop_asked", "1 once the dashboard asked the station to stop", int(snapshot.stop_asked)
        )
