"""The line station's screen: flash --wait --dashboard in a real headless Chromium, its stop button, token, metrics.

The browser is Debian's chromium, driven by Selenium through Debian's
chromedriver, both named by path so that Selenium Manager never downloads
one. Cards are loop devices put in and taken out as in test_flash_wait. A
card that fails mid-write is a loop device over a file on a 4 MiB tmpfs (as
in test_flash). A card that stays "writing" until the test lets it go is a
loop device over a file on a frozen filesystem (fsfreeze): its writes wait
for the thaw, so that the stop button is pressed while a card is written,
every time, with no sleep and no race.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import shutil
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageprov.disk.golden import Scheme
from imageprov.errors import UsageError
from imageprov.line.dashboard import page
from imageprov.line.dashboard.access import COOKIE, Access, Verdict, parse_address
from imageprov.line.flash import Assignment, Failure, Flashed, Phase, Progress, Result
from imageprov.line.station import SlotState, Station, StationState, read_log
from tests.conftest import IMAGEPROV_ARGV, imageprov_pki, need, tool
from tests.flashdev import STALE, Loops, loop_devices, read_span, unavailable
from tests.test_flash import check_delivered
from tests.test_flash_wait import FrozenSlot, Operator, Writer

SMALL = {"rootfs_mib": 16, "data_mib": 16}
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT_COPY = Path("/tmp/imageprov-dashboard.png")
WAIT = 120.0  # seconds for anything the station does; polls end as soon as it is done


# -- the pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "loopback"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("8080", "127.0.0.1", 8080, True),
        ("localhost:0", "localhost", 0, True),
        ("[::1]:9000", "::1", 9000, True),
        ("0.0.0.0:8080", "0.0.0.0", 8080, False),
        ("192.0.2.7:80", "192.0.2.7", 80, False),
        ("[::]:8080", "::", 8080, False),
    ],
)
def test_dashboard_address(text: str, host: str, port: int, loopback: bool) -> None:
    address = parse_address(text)
    assert (address.host, address.port, address.loopback) == (host, port, loopback)


@pytest.mark.parametrize("text", ["", ":8080", "host:8080", "127.0.0.1:", "127.0.0.1:99999", "::1:8080", "1.2.3.4:x"])
def test_dashboard_address_refused(text: str) -> None:
    with pytest.raises(UsageError, match="--dashboard"):
        parse_address(text)


def test_loopback_answers_loopback_names_only() -> None:
    """DNS rebinding: a page of evil.example, resolved to 127.0.0.1, must not read or drive the station."""
    access = Access(loopback=True)
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.1"):
        assert access.request(host=host, authorization=None, cookie=None) is Verdict.ALLOW, host
    for host in ("evil.example:8080", "192.0.2.7:8080", None):
        assert access.request(host=host, authorization=None, cookie=None) is Verdict.WRONG_HOST, host


def test_token_bearer_or_cookie() -> None:
    token = secrets.token_hex(16)
    access = Access(loopback=False, token=token)
    host = "station.line:8080"
    assert access.request(host=host, authorization=None, cookie=None) is Verdict.SIGN_IN
    assert access.request(host=host, authorization=f"Bearer {token}", cookie=None) is Verdict.ALLOW
    assert access.request(host=host, authorization=f"Bearer {token}x", cookie=None) is Verdict.SIGN_IN
    assert access.request(host=host, authorization=f"Basic {token}", cookie=None) is Verdict.SIGN_IN
    assert access.request(host=host, authorization="Bearer ünïcode", cookie=None) is Verdict.SIGN_IN
    assert access.request(host=host, authorization=None, cookie=access.session) is Verdict.ALLOW
    # The cookie proves the token without being it.
    assert token not in access.session
    assert access.request(host=host, authorization=None, cookie=token) is Verdict.SIGN_IN
    assert Access(loopback=False, token=token + "0").session != access.session
    assert token not in repr(access) and access.csrf not in repr(access)


def test_a_post_comes_from_the_page_or_a_script() -> None:
    token = secrets.token_hex(16)
    access = Access(loopback=False, token=token)
    host = "station.line:8080"
    page_post = {"host": host, "origin": f"http://{host}", "authorization": None}
    assert access.post(**page_post, csrf=access.csrf) is Verdict.ALLOW
    assert access.post(**page_post, csrf=None) is Verdict.FORGED
    assert access.post(**page_post, csrf="x" + access.csrf) is Verdict.FORGED
    assert access.post(host=host, origin="http://evil.example", csrf=access.csrf, authorization=None) is Verdict.FORGED
    assert access.post(host=host, origin="null", csrf=access.csrf, authorization=None) is Verdict.FORGED
    assert access.post(host=host, origin=None, csrf=None, authorization=f"Bearer {token}") is Verdict.ALLOW


def _result(device_id: str, slot: str, failure: Failure | None = None) -> Flashed:
    result = Result.DELIVERED if failure is None else Result.FAILED
    return Flashed(device_id, Path("/dev") / slot, result, bytes_written=1 << 20, seconds=2.0,
                   error="" if failure is None else "sdb: write failed at byte 4194304: Input/output error",
                   failure=failure)  # fmt: skip


def test_two_failures_in_a_row_at_one_slot_is_a_bad_reader(tmp_path: Path) -> None:
    now = [100.0]
    station = Station(tmp_path / "golden.img", tmp_path / "line-log.jsonl", 4, clock=lambda: now[0],
                      identity=lambda name: f"reader {name}")  # fmt: skip

    def card(device_id: str, slot: str, failure: Failure | None, remaining: int) -> None:
        station.flashing([Assignment(device_id, Path("/dev") / slot)], remaining)
        assert station.snapshot().slots[0 if slot == "sdb" else 1].state is SlotState.PREPARING
        now[0] += 2.0
        station.flashed([_result(device_id, slot, failure)], remaining, None)

    card("A-1", "sdb", Failure.WRITE, 3)
    assert not station.snapshot().slots[0].bad_reader
    card("A-1", "sdc", None, 3)  # another slot's delivery does not clear sdb's streak
    card("A-2", "sdb", Failure.READ_BACK, 2)
    snapshot = station.snapshot()
    sdb, sdc = snapshot.slots
    assert (sdb.name, sdb.state, sdb.bad_reader, sdb.identity) == ("sdb", SlotState.FAILED, True, "reader sdb")
    assert (sdc.state, sdc.device_id, sdc.bad_reader) == (SlotState.DELIVERED, "A-1", False)
    assert (snapshot.totals.delivered, snapshot.totals.failed, snapshot.totals.remaining) == (1, 2, 2)
    assert snapshot.totals.mean_seconds == 2.0
    card("A-2", "sdb", None, 2)
    assert not station.snapshot().slots[0].bad_reader
    # A failure of the station's own (the id was delivered elsewhere) says nothing of the reader.
    card("A-3", "sdb", Failure.ALREADY_DELIVERED, 1)
    card("A-3", "sdb", Failure.ALREADY_DELIVERED, 1)
    assert not station.snapshot().slots[0].bad_reader
    station.removed("sdb")
    assert station.snapshot().slots[0].state is SlotState.EMPTY


def test_a_tile_follows_its_card_between_two_progress_reports(tmp_path: Path) -> None:
    """The batch moves a card to reading back and verifying in its own threads: the screen shows it as it happens."""
    station = Station(tmp_path / "golden.img", tmp_path / "log", 1, identity=lambda name: "")
    station.flashing([Assignment("P-1", Path("/dev/sdb"))], 0)
    live = Progress("P-1", Path("/dev/sdb"), Phase.WRITING, written=1 << 20, total=4 << 20)
    station.progress([live])
    assert station.snapshot().slots[0].state is SlotState.WRITING
    html = page.board(station.snapshot(), "csrf")
    assert 'data-state="writing"' in html and 'aria-valuenow="25"' in html and "25%" in html
    for phase, state in ((Phase.READING_BACK, SlotState.READING_BACK), (Phase.VERIFYING, SlotState.VERIFYING)):
        live.phase = phase
        assert station.snapshot().slots[0].state is state


def test_stop_asked_ends_a_wait_at_once_and_names_the_cards_in_progress(tmp_path: Path) -> None:
    station = Station(tmp_path / "golden.img", tmp_path / "log", 2, identity=lambda name: "")
    station.flashing([Assignment("B-1", Path("/dev/sdb"))], 1)
    assert not station.stop_asked and not station.wait_for_stop(0.01)
    assert station.ask_stop() == 1
    assert station.wait_for_stop(60) and station.snapshot().state is StationState.STOPPING
    station.flashed([_result("B-1", "sdb")], 1, None)
    assert station.snapshot().state is StationState.STOPPING  # still, until the loop ends
    station.ended()
    assert station.snapshot().state is StationState.STOPPED


def test_the_page_escapes_what_comes_from_outside(tmp_path: Path) -> None:
    log = tmp_path / "line-log.jsonl"
    entry = {"time": "2025-01-01T00:00:00+00:00", "device_id": "X-1", "target": "/dev/sdb", "result": "failed",
             "error": "<img src=x onerror=alert(1)>"}  # fmt: skip
    log.write_text("not json\n" + json.dumps(entry) + "\n")
    station = Station(tmp_path / "golden.img", log, 1, identity=lambda name: "<b>reader</b>")
    station.flashing([Assignment("X-1", Path("/dev/sdb"))], 0)
    bad = _result("X-1", "sdb", Failure.VERIFY)
    station.flashed([Flashed(**{**bad.__dict__, "error": "<script>alert(1)</script>"})], 0, None)
    html = page.page(station.snapshot(), "csrf-value")
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>reader" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "Card failed verification" in html
    assert '<noscript><meta http-equiv="refresh"' in html and 'value="csrf-value"' in html


def test_the_line_log_is_read_from_its_tail(tmp_path: Path) -> None:
    log = tmp_path / "line-log.jsonl"
    lines = [json.dumps({"time": str(i), "device_id": f"L-{i}", "result": "delivered", "pad": "x" * 300})
             for i in range(1000)]  # fmt: skip
    log.write_text("\n".join(lines) + "\n")
    entries = read_log(log)
    assert [e.device_id for e in entries] == [f"L-{i}" for i in range(999, 991, -1)]
    assert read_log(tmp_path / "missing") == ()


# -- the station, in a browser --------------------------------------------------------------------


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


def _selenium() -> Any:
    need("chromium", "chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        unavailable("selenium is not installed (scripts/setup --test installs it)")
    return webdriver


def chromium(profile: Path, *, javascript: bool = True) -> Any:
    """Debian's headless Chromium through Debian's chromedriver (never Selenium Manager's downloads)."""
    webdriver = _selenium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1600,1800", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(argument)  # --no-sandbox: the tests run as root
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


T = TypeVar("T")


def poll(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """``check()``'s first true value, looked for every 0.1 s; fails naming ``what`` after ``timeout``."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.wait import WebDriverWait

    def attempt(_: object) -> Any:
        try:
            return check()
        except (StaleElementReferenceException, LookupError):  # the board was swapped meanwhile
            return None

    try:
        return WebDriverWait(None, timeout, poll_frequency=0.1).until(attempt, what)
    except WebDriverException as exc:
        raise AssertionError(f"no {what} within {timeout} s") from exc


def fresh(act: Callable[[], T]) -> T:
    """``act()``, done again on elements found anew when the board was swapped under it (every update
    replaces it): a stale element was neither read nor clicked, so doing it again is safe."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(50):
        try:
            return act()
        except StaleElementReferenceException:
            continue
    return act()


def tile(browser: Any, slot: Path) -> dict[str, str]:
    """A slot's tile as the operator reads it: its state, id, text and colour."""
    return fresh(lambda: _tile(browser, slot))


def _tile(browser: Any, slot: Path) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, f'[data-slot="{slot.name}"]')
    if not found:
        raise LookupError(slot.name)
    element = found[0]
    return {
        "state": element.get_attribute("data-state"),
        "device_id": element.get_attribute("data-device-id") or "",
        "text": element.text,
        "colour": element.value_of_css_property("background-color"),
    }


def totals(browser: Any) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return fresh(lambda: {e.get_attribute("data-total"): e.find_element(By.CLASS_NAME, "n").text
                          for e in browser.find_elements(By.CSS_SELECTOR, "[data-total]")})  # fmt: skip


def station_state(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return fresh(lambda: str(browser.find_element(By.CSS_SELECTOR, "[data-station]").get_attribute("data-station")))


class FailingSlot(Writer):
    """A writer whose cards take 4 MiB and then fail: sparse files on a 4 MiB tmpfs."""

    def __init__(self, loops: Loops, tmp: Path) -> None:
        small = loops.mount("tmpfs", tmp / "small", "-t", "tmpfs", "-o", "size=4m")
        super().__init__(loops, small / "card.img")

    def put_in(self, size: int) -> None:
        with open(self.backing, "r+b") as handle:
            handle.truncate(size)
        tool("losetup", "-c", self.device)


def request(url: str, method: str = "GET", *, headers: dict[str, str] | None = None,
            form: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, str]:  # fmt: skip
    """One HTTP request, redirects not followed: status, headers, body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    body = urllib.parse.urlencode(form) if form is not None else None
    sent = {**(headers or {}), **({"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {})}
    try:
        connection.request(method, parts.path or "/", body=body, headers=sent)
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        connection.close()


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, text = request(url + "metrics", headers=headers)
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def stderr_of(operator: Operator) -> str:
    """All the station said, once it has ended."""
    while not operator.lines.empty():
        operator.seen.append(operator.lines.get())
    return "".join(operator.seen)


def dashboard_url(operator: Operator) -> str:
    line = operator.expect("dashboard: ")
    found = re.search(r"dashboard: (http://\S+/) ", line)
    assert found, line
    return found.group(1).replace("0.0.0.0", "127.0.0.1")


def test_the_line_on_its_screen(make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path) -> None:
    """Three cards delivered and one slot failing twice, seen live in Chromium; its stop button ends the run."""
    need("fsfreeze", "mkfs.ext4")
    _selenium()
    golden = make_golden(Scheme.MBR, **SMALL)
    size = golden.stat().st_size
    slot_a, slot_b = Writer(loops, tmp_path / "slot-a"), Writer(loops, tmp_path / "slot-b")
    bad, slow = FailingSlot(loops, tmp_path), FrozenSlot(loops, tmp_path, size)
    ids = tmp_path / "ids.txt"
    ids.write_text("D-1\nD-2\nD-3\nD-4\n")
    watch = [a for w in (slot_a, slot_b, bad, slow) for a in ("--wait-for", w.device.name)]
    operator = Operator([*IMAGEPROV_ARGV, "flash", golden, "--pki", pki, "--device-ids", ids, "--wait", *watch,
                         "--json", "--dashboard", "127.0.0.1:0"])  # fmt: skip
    browsers: list[Any] = []
    try:
        url = dashboard_url(operator)
        browser = chromium(tmp_path / "profile-js")
        browsers.append(browser)
        browser.get(url)
        poll("the station waiting for a card", lambda: station_state(browser) == "waiting")
        browser.execute_script("window.imageprovProbe = 'never reloaded'")
        assert totals(browser)["remaining"] == "4"

        slot_a.put_in(size)
        poll("D-1 delivered on slot A", lambda: tile(browser, slot_a.device)["state"] == "delivered")
        delivered = tile(browser, slot_a.device)
        assert delivered["device_id"] == "D-1" and "DELIVERED" in delivered["text"] and "D-1" in delivered["text"]
        assert delivered["colour"] == "rgba(23, 128, 58, 1)"  # green
        assert str(slot_a.device) in delivered["text"] and slot_a.backing.name in delivered["text"]  # node, identity

        bad.put_in(size)
        poll("D-2 failed on the bad slot", lambda: tile(browser, bad.device)["state"] == "failed")
        failed = tile(browser, bad.device)
        assert failed["device_id"] == "D-2" and "FAILED" in failed["text"] and "Write error" in failed["text"]
        assert "No space left on device" in failed["text"] and failed["colour"] == "rgba(179, 38, 30, 1)"  # red
        assert "bad reader" not in failed["text"]
        bad.take_out()
        poll("the bad slot empty", lambda: tile(browser, bad.device)["state"] == "empty")
        bad.put_in(size)
        poll("a bad reader", lambda: "a bad reader, not a bad card" in tile(browser, bad.device)["text"])

        slot_b.put_in(size)  # D-2, which failed twice, goes on the next card
        poll("D-2 delivered on slot B", lambda: tile(browser, slot_b.device)["device_id"] == "D-2"
             and tile(browser, slot_b.device)["state"] == "delivered")  # fmt: skip
        figures = poll("the totals", lambda: (t := totals(browser))["delivered"] == "2" and t)
        assert (figures["failed"], figures["remaining"]) == ("2", "2")
        assert figures["cards-per-hour"].isdigit() and float(figures["mean-seconds"]) > 0
        log_text = fresh(lambda: browser.find_element("css selector", ".log").text)
        assert "D-2" in log_text and "No space left on device" in log_text

        # The metrics count what the screen shows; the golden image was never read twice in a pass.
        counted = metrics(url)
        assert counted[("imageprov_station_cards_total", (("reason", "none"), ("result", "delivered")))] == 2
        assert counted[("imageprov_station_cards_total", (("reason", "write"), ("result", "failed")))] == 2
        assert counted[("imageprov_station_card_seconds_count", (("result", "delivered"),))] == 2
        assert counted[("imageprov_station_bytes_written_total", ())] > 2 * (1 << 20)
        assert counted[("imageprov_station_passes_total", ())] == 4
        assert counted[("imageprov_station_golden_reads_bucket", (("le", "1.0"),))] == 4
        assert counted[("imageprov_station_ids_remaining", ())] == 2
        assert counted[("imageprov_station_bad_readers", ())] == 1
        # Loopback answers loopback names only (DNS rebinding), and a POST from elsewhere does nothing.
        assert request(url, headers={"Host": "evil.example"})[0] == 403
        assert request(url + "stop", "POST", form={"csrf": "guess"})[0] == 403

        # Without JavaScript: the server's page, which refreshes itself.
        plain = chromium(tmp_path / "profile-nojs", javascript=False)
        browsers.append(plain)
        plain.get(url)
        # The page's own script never ran (it says "live" once it has); WebDriver's own scripts always run.
        assert plain.find_element("id", "link").text == f"updated every {page.REFRESH_SECONDS} s"
        assert tile(plain, slot_a.device)["state"] == "delivered" and tile(plain, bad.device)["state"] == "failed"
        assert "a bad reader" in tile(plain, bad.device)["text"] and totals(plain)["delivered"] == "2"
        assert fresh(lambda: browser.find_element("id", "link").text) == "live"

        slow.put_in(size)  # its writes wait for the thaw
        poll("D-3 writing on the slow slot", lambda: tile(browser, slow.device)["state"] == "writing")
        assert tile(browser, slow.device)["device_id"] == "D-3" and "WRITING" in tile(browser, slow.device)["text"]
        poll("the page without JavaScript refreshed", lambda: tile(plain, slow.device)["state"] == "writing", 30)
        screenshot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(screenshot))
        shutil.copy(screenshot, SCREENSHOT_COPY)
        print(f"dashboard screenshot: {screenshot} (and {SCREENSHOT_COPY})")

        fresh(lambda: browser.find_element("css selector", "form.controls button").click())
        poll("the station stopping", lambda: station_state(browser) == "stopping")
        assert tile(browser, slow.device)["state"] == "writing"  # still: the card in progress is finished first
        # A card put in meanwhile is not taken.
        slot_a.take_out()
        slot_a.put_in(size)
        slow.thaw()
        code, results = operator.finish()

        # The screen's last state was pushed before the station ended, and the page was never reloaded.
        # One poll: the station's end may reach the screen an update after D-3's delivery.
        def ended() -> bool:
            delivered = tile(browser, slow.device)["state"] == "delivered"
            return delivered and station_state(browser) == "stopped" and totals(browser)["delivered"] == "3"

        poll("D-3 delivered and the station stopped on the screen", ended, 30)
        assert browser.execute_script("return window.imageprovProbe") == "never reloaded"
    finally:
        slow.thaw()
        for each in browsers:
            each.quit()
        operator.kill()
    assert code == 0, "".join(operator.seen)
    assert [(r["device_id"], r["result"]) for r in results] == [
        ("D-1", "delivered"), ("D-2", "failed"), ("D-2", "failed"), ("D-2", "delivered"), ("D-3", "delivered")
    ]  # fmt: skip
    assert results[1]["failure"] == "write"
    check_delivered(slow.device, golden, pki, "D-3", tmp_path)
    assert read_span(slot_a.device, 0, 1 << 20) == bytes([STALE]) * (1 << 20)
    assert "delivered 3 cards; 1 ids not delivered" in stderr_of(operator)


def test_dashboard_beyond_loopback_needs_a_token(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    flash = ["flash", golden, "--pki", pki, "--device-id", "T-1", "--wait", "--wait-for", "imageprov-no-such-disk"]
    refused = imageprov_pki(*flash, "--dashboard", "0.0.0.0:0", check=False)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [refused.stderr.strip()] and "--dashboard-token-file" in refused.stderr
    short = tmp_path / "short.token"
    short.write_text("0123456789\n")
    refused = imageprov_pki(*flash, "--dashboard", "0.0.0.0:0", "--dashboard-token-file", short, check=False)
    assert refused.returncode == 2 and "at least 16 characters" in refused.stderr

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = imageprov_pki(*flash, "--dashboard", f"127.0.0.1:{port}", check=False)
    assert refused.returncode == 1
    assert (
        refused.stderr == f"imageprov: error: cannot listen on 127.0.0.1:{port} for the dashboard: Address "
        "already in use (another program has that port: choose another with --dashboard HOST:PORT (0: any free port))\n"
    )

    token = secrets.token_hex(16)
    token_file = tmp_path / "dashboard.token"
    token_file.write_text(token + "\n")
    operator = Operator([*IMAGEPROV_ARGV, *flash, "--dashboard", "0.0.0.0:0", "--dashboard-token-file", token_file])
    try:
        url = dashboard_url(operator)
        operator.expect("waiting for a card")
        for method, path in (("GET", ""), ("GET", "events"), ("GET", "metrics"), ("POST", "stop")):
            status, headers, body = request(url + path, method)
            assert status == 401, (path, status)
            assert "csrf" not in body and token not in body
        wrong = token[:-1] + ("1" if token.endswith("0") else "0")  # one character off
        assert request(url + "metrics", headers={"Authorization": f"Bearer {wrong}"})[0] == 401
        counted = metrics(url, {"Authorization": f"Bearer {token}"})
        assert counted[("imageprov_station_cards_total", (("reason", "none"), ("result", "delivered")))] == 0
        assert counted[("imageprov_station_ids_remaining", ())] == 1
        # A screen signs in once: the cookie it gets is not the token.
        assert request(url + "sign-in", "POST", form={"token": "wrong" * 8})[0] == 401
        status, headers, _ = request(url + "sign-in", "POST", form={"token": token})
        assert status == 303
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}=") and token not in cookie and "HttpOnly" in cookie
        session = {"Cookie": cookie.split(";")[0]}
        status, _, body = request(url, headers=session)
        assert status == 200 and "Stop after the cards in progress" in body
        csrf = re.search(r'name="csrf" value="([^"]+)"', body)
        assert csrf
        assert request(url + "stop", "POST", headers=session)[0] == 403  # no CSRF token
        evil = {**session, "Origin": "http://evil.example"}
        assert request(url + "stop", "POST", headers=evil, form={"csrf": csrf.group(1)})[0] == 403
        assert operator.proc.poll() is None  # none of these stopped it
        status, headers, _ = request(url + "stop", "POST", headers=session, form={"csrf": csrf.group(1)})
        assert (status, headers["Location"]) == (303, "/")
        code, _ = operator.finish()
    finally:
        operator.kill()
    stderr = stderr_of(operator)
    assert code == 0, stderr
    assert "stopped from the dashboard" in stderr and "delivered 0 cards; 1 ids not delivered" in stderr
    assert token not in stderr


def test_dashboard_goes_with_wait(pki: Path, tmp_path: Path) -> None:
    proc = imageprov_pki("flash", tmp_path / "golden.img", "--pki", pki, "--target", "/dev/null=X-1",
                         "--dashboard", "8080", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--dashboard goes with --wait" in proc.stderr
