"""The dashboard at GET /, in a real browser: Debian's headless Chromium driven by Selenium
(`make browser` installs it), api.py's app behind a real HTTP server, a fresh database per test.

What the chart drew is read from plotly.js's own data model (the chart's `_fullData`) and
compared with the messages each test stored; the table is compared with /status-count for the
bounds the page shows. Screenshots go to tests/artifacts/ (not in git).
"""

import json
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from api import STEPS, create_app
from browser import LiveServer, chromium
from conftest import MONGO_URI, ROOT, wait_until
from counts import BatchWriter, Folder, epoch_ms

ARTIFACTS = ROOT / "tests" / "artifacts"
REFRESH_SECONDS = 5  # static/dashboard.js, REFRESH_MS
PRESETS = {"15m": ("1m", 900), "1h": ("1m", 3600), "24h": ("15m", 86400), "7d": ("1h", 604800)}

READ_PAGE = """
const chart = document.getElementById("chart"), message = document.getElementById("message");
return {
  refreshes: Number(document.body.dataset.refreshes || 0),
  busy: chart.getAttribute("aria-busy") !== "false",
  message: message.hidden ? null : message.textContent,
  stale: document.body.classList.contains("stale"),
  start: chart.dataset.start, end: chart.dataset.end, step: chart.dataset.step,
  totals_bounds: [document.getElementById("totals").dataset.start, document.getElementById("totals").dataset.end],
  barmode: chart._fullLayout ? chart._fullLayout.barmode : null,
  traces: (chart._fullData || []).map((trace) => ({
    name: trace.name, type: trace.type, visible: trace.visible, x: Array.from(trace.x), y: Array.from(trace.y)})),
  totals: Object.fromEntries(Array.from(document.querySelectorAll("#totals td[data-status]"),
                                        (cell) => [cell.dataset.status, cell.textContent])),
  total: document.getElementById("total").textContent,
  pause: document.getElementById("pause").textContent,
};
"""


@pytest.fixture(scope="module")
def browser():
    # A time zone far from UTC: the page shows UTC, as the API does, whatever the browser's zone.
    driver = chromium(timezone="Pacific/Chatham")
    yield driver
    driver.quit()


class Site:
    """api.py's app over a database of its own (through `mongo_uri`), served over HTTP."""

    def __init__(self, mongo, mongo_uri, api_token=None):
        self.database = f"test_dashboard_{uuid.uuid4().hex[:10]}"
        self.app = create_app({"TESTING": True, "MONGO_URI": mongo_uri, "MONGO_DB": self.database,
                               "MONGO_COLLECTION": "status", "API_TOKEN": api_token})
        self.collection = mongo[self.database]["status"]
        self.headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        self.server = LiveServer(self.app)
        self.rows = []

    def store(self, *rows):
        """rows: (status, timestamp), written as server.py writes them: raw documents and their counts."""
        documents = [{"status": status, "timestamp": moment, "received_at": moment} for status, moment in rows]
        BatchWriter(self.collection).write(documents)
        Folder(self.collection).fold_once()
        self.rows += rows

    def get(self, path):
        with urllib.request.urlopen(urllib.request.Request(self.server.url + path, headers=self.headers),
                                    timeout=30) as response:
            return response.status, response.headers.get_content_type(), response.read()

    def get_json(self, path):
        return json.loads(self.get(path)[2])

    def close(self):
        self.server.stop()
        self.app.extensions["mongo"].close()
        self.collection.database.client.drop_database(self.database)


@pytest.fixture
def site_for(mongo):
    sites = []

    def make(mongo_uri=MONGO_URI, api_token=None):
        sites.append(Site(mongo, mongo_uri, api_token))
        return sites[-1]

    yield make
    for site in sites:
        site.close()


@pytest.fixture
def site(site_for):
    return site_for()


def page(browser):
    state = browser.execute_script(READ_PAGE)
    state["totals"] = {status: int(text.replace(",", "")) for status, text in state["totals"].items()}
    state["total"] = int(state["total"].replace(",", "")) if state["total"] else None
    return state


def settled(browser, condition=lambda state: True, timeout=30, what="the page to draw"):
    """The page once it has drawn, no refresh is in flight, and `condition(state)` holds."""
    def ready():
        state = page(browser)
        return state if state["refreshes"] and not state["busy"] and condition(state) else None
    return wait_until(ready, timeout, what)


def message_shown(browser, timeout, what):
    def shown():
        state = page(browser)
        return state if state["message"] else None
    return wait_until(shown, timeout, what)


def parse(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)  # a Z or none: UTC both


def expected_chart(rows, start, end, step):
    """The bars for `rows` over [start, end) in `step` buckets aligned to UTC, the first and last
    clipped: (the bucket starts, {status: [count per bucket]})."""
    size = STEPS[step] * 1000
    low, high = epoch_ms(parse(start)), epoch_ms(parse(end))
    first = low // size
    buckets = -(-high // size) - first
    starts = [parse("1970-01-01T00:00:00") + timedelta(milliseconds=max(low, (first + index) * size))
              for index in range(buckets)]
    bars = {status: [0] * buckets for status in range(7)}
    for status, moment in rows:
        if low <= epoch_ms(moment) < high:
            bars[status][epoch_ms(moment) // size - first] += 1
    return starts, bars


def assert_shows(site, state):
    """The chart drew the stored messages over the page's bounds, one stacked bar per bucket and
    status, and the table holds what /status-count answers for the same bounds."""
    starts, bars = expected_chart(site.rows, state["start"], state["end"], state["step"])
    assert state["barmode"] == "stack"
    assert [trace["name"] for trace in state["traces"]] == [f"status {status}" for status in range(7)]
    for status, trace in enumerate(state["traces"]):
        assert trace["type"] == "bar" and trace["visible"] is True
        assert [parse(x) for x in trace["x"]] == starts, f"status {status}: bars at {trace['x']}"
        assert trace["y"] == bars[status], f"status {status}"
    assert state["totals_bounds"] == [state["start"], state["end"]]  # the table's /status-count asked for the same
    answer = site.get_json(f"status-count?start={state['start']}&end={state['end']}")
    assert (state["totals"], state["total"]) == (answer["counts"], answer["total"])
    assert answer["counts"] == {str(status): sum(bars[status]) for status in range(7)}
    return len(starts)


def screenshot(browser, name):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert browser.save_screenshot(str(path)), f"no screenshot written to {path}"
    print(f"screenshot: {path}")


def now():
    return datetime.now(timezone.utc).replace(microsecond=0)


def test_the_page_and_its_chart_library_are_served_by_the_api(site):
    status, kind, body = site.get("")
    page_text = body.decode()
    assert (status, kind) == (200, "text/html")
    assert '<script src="/plotly.min.js" defer>' in page_text and "/static/dashboard.js" in page_text
    assert "://" not in page_text  # nothing from elsewhere
    status, kind, body = site.get("plotly.min.js")
    assert (status, kind) == (200, "text/javascript") and body.startswith(b"/**\n* plotly.js v")
    status, kind, body = site.get("static/dashboard.js")
    assert (status, kind) == (200, "text/javascript") and b"status-series" in body


def test_the_last_hour_is_drawn_per_status_and_follows_new_messages(browser, site):
    start = now()
    site.store(*[(index % 7, start - timedelta(minutes=1 + index * 7 % 50, seconds=index * 13 % 60))
                 for index in range(60)],
               (3, start - timedelta(minutes=61)), (5, start - timedelta(hours=2)),  # before the range
               (1, start + timedelta(minutes=2)))  # after it: a clock ahead by less than server.py's 5 minutes
    browser.get_log("browser")  # what earlier tests left
    browser.get(site.server.url)
    state = settled(browser)
    assert state["step"] == "1m" and parse(state["end"]) - parse(state["start"]) == timedelta(hours=1)
    assert assert_shows(site, state) in (60, 61)  # 61 unless the range starts on a whole minute
    assert state["total"] == 60 and state["message"] is None
    screenshot(browser, "dashboard-last-hour")

    arrived = now()
    site.store((6, arrived - timedelta(seconds=3)), (6, arrived - timedelta(seconds=2)), (2, arrived))
    state = settled(browser, lambda state: state["total"] == 63, timeout=3 * REFRESH_SECONDS,
                    what="the new messages on the page")
    assert_shows(site, state)
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_each_range_gets_a_step_that_fits_and_its_own_buckets(browser, site):
    moment = now()
    site.store(*[(index % 7, moment - delta) for index, delta in enumerate([
        timedelta(seconds=30), timedelta(minutes=3), timedelta(minutes=9), timedelta(minutes=14),
        timedelta(minutes=20), timedelta(minutes=50), timedelta(hours=2), timedelta(hours=10), timedelta(hours=23),
        timedelta(days=2), timedelta(days=5), timedelta(days=6, hours=20), timedelta(days=9)])])
    day = datetime(2026, 1, 15, tzinfo=timezone.utc)
    site.store(*[(index % 7, day + delta) for index, delta in enumerate([
        timedelta(hours=10, seconds=45), timedelta(hours=10, minutes=1), timedelta(hours=10, minutes=1, seconds=59.999),
        timedelta(hours=10, minutes=2, seconds=14.999), timedelta(hours=10, minutes=2, seconds=15),
        timedelta(hours=12, minutes=34, seconds=56), timedelta(hours=15, minutes=59, seconds=59),
        timedelta(days=5, hours=6), timedelta(days=-200)])])
    browser.get(site.server.url)
    settled(browser)
    for value, (step, seconds) in PRESETS.items():
        Select(browser.find_element(By.ID, "range")).select_by_value(value)
        state = settled(browser, lambda state: (state["step"], parse(state["end"]) - parse(state["start"]))
                        == (step, timedelta(seconds=seconds)), what=f"the range {value}")
        buckets = assert_shows(site, state)
        assert buckets in (seconds // STEPS[step], seconds // STEPS[step] + 1)

    Select(browser.find_element(By.ID, "range")).select_by_value("custom")
    for start, end, step, buckets in [
            ("2026-01-15T10:00:30", "2026-01-15T10:02:15", "1m", 3),  # both ends clipped
            ("2026-01-15T10:00:00", "2026-01-15T16:00:00", "5m", 72),  # 1m would make 360 bars
            ("2026-01-15T00:00:00", "2026-01-19T00:00:00", "1h", 96),
            ("2026-01-01T00:00:00", "2026-01-31T00:00:00", "6h", 120),
            ("2025-01-01T00:00:00", "2026-01-01T00:00:00", "1d", 365)]:  # past 300 bars: the longest step
        choose_custom(browser, start, end)
        state = settled(browser, lambda state: (state["start"], state["end"]) == (start + "Z", end + "Z"),
                        what=f"the range {start} to {end}")
        assert state["step"] == step and state["message"] is None
        assert assert_shows(site, state) == buckets
    assert state["total"] == 1  # 2025-06-29

    choose_custom(browser, "2026-01-15T12:00:00", "2026-01-15T11:00:00")
    state = message_shown(browser, 10, "the message about the range")
    assert state["message"].startswith("The start must be before the end.") and state["stale"]
    choose_custom(browser, "2026-01-15T10:00:00", "2026-01-15T11:00:00")
    state = settled(browser, lambda state: state["message"] is None and state["step"] == "1m")
    assert assert_shows(site, state) == 60


def choose_custom(browser, start, end):
    browser.execute_script("""
        for (const [id, value] of [["custom-start", arguments[0]], ["custom-end", arguments[1]]]) {
          const input = document.getElementById(id);
          input.value = value;
          input.dispatchEvent(new Event("change"));
        }""", start, end)


def test_pause_stops_the_refresh_and_resume_catches_up(browser, site):
    site.store((1, now() - timedelta(minutes=5)))
    browser.get(site.server.url)
    settled(browser, lambda state: state["total"] == 1)
    browser.find_element(By.ID, "pause").click()
    paused = settled(browser)  # a refresh in flight at the click has ended
    assert paused["pause"] == "Resume"
    site.store((4, now() - timedelta(seconds=1)))
    # That a refresh does not come can only be seen by waiting past its time.
    time.sleep(2 * REFRESH_SECONDS)
    state = page(browser)
    assert (state["refreshes"], state["total"]) == (paused["refreshes"], 1)

    browser.find_element(By.ID, "pause").click()
    state = settled(browser, lambda state: state["total"] == 2, timeout=REFRESH_SECONDS, what="the refresh on resume")
    assert state["pause"] == "Pause"
    site.store((0, now()))
    state = settled(browser, lambda state: state["total"] == 3, timeout=3 * REFRESH_SECONDS, what="the next refresh")
    assert_shows(site, state)


def test_a_store_that_stops_answering_is_a_message_that_clears_when_it_answers(browser, site_for, store_proxy):
    site = site_for(store_proxy.uri)
    site.store((2, now() - timedelta(minutes=10)), (2, now() - timedelta(minutes=3)))
    browser.get(site.server.url)
    before = settled(browser, lambda state: state["total"] == 2)
    store_proxy.hang()
    # The API gives up on the store after its 10 s deadline and answers 503.
    down = message_shown(browser, 10 + 4 * REFRESH_SECONDS, "the message that the database is down")
    assert down["message"].startswith("The database is not answering (HTTP 503: the database is unavailable")
    assert down["stale"] and down["total"] == 2 and len(down["traces"]) == 7  # the last figures, greyed
    screenshot(browser, "dashboard-database-down")

    store_proxy.forward()
    state = settled(browser, lambda state: state["message"] is None and state["refreshes"] > before["refreshes"],
                    timeout=10 + 4 * REFRESH_SECONDS, what="the message to clear")
    assert not state["stale"]
    assert_shows(site, state)


def test_a_database_down_from_the_start_is_a_message_not_a_blank_chart(browser, site_for):
    site = site_for("mongodb://127.0.0.1:9/")  # nothing listens there (test_api's 503 test)
    browser.get(site.server.url)
    state = message_shown(browser, 4 * REFRESH_SECONDS, "the message that the database is down")
    assert state["message"].startswith("The database is not answering (HTTP 503")
    assert "Trying again every 5 s." in state["message"] and not state["stale"] and state["traces"] == []


def test_an_api_that_stops_answering_is_a_message_that_clears_when_it_is_back(browser, site):
    site.store((5, now() - timedelta(minutes=1)))
    browser.get(site.server.url)
    before = settled(browser, lambda state: state["total"] == 1)
    site.server.stop()
    state = message_shown(browser, 4 * REFRESH_SECONDS, "the message that the API is down")
    assert state["message"].startswith(f"The API does not answer at {site.server.url[:-1]}.") and state["stale"]
    site.server.start()
    state = settled(browser, lambda state: state["message"] is None and state["refreshes"] > before["refreshes"],
                    timeout=4 * REFRESH_SECONDS, what="the message to clear")
    assert_shows(site, state)


def test_with_api_token_the_page_asks_for_it_and_keeps_it_for_this_tab_only(browser, site_for):
    token = "dashboard-" + uuid.uuid4().hex
    site = site_for(api_token=token)
    site.store((2, now() - timedelta(minutes=1)))
    browser.get(site.server.url)
    state = message_shown(browser, 4 * REFRESH_SECONDS, "the page to ask for the token")
    assert state["message"] == "This API needs a token; enter it (API_TOKEN)." and state["traces"] == []
    form = browser.find_element(By.ID, "token-form")
    assert form.is_displayed()

    browser.find_element(By.ID, "token").send_keys(token[:-1] + "x", Keys.ENTER)  # off by the last character
    wait_until(lambda: "refused that token" in (page(browser)["message"] or ""), 4 * REFRESH_SECONDS,
               "the page to say the token was refused")
    assert form.is_displayed() and browser.execute_script("return sessionStorage.length") == 0

    browser.find_element(By.ID, "token").send_keys(token, Keys.ENTER)
    state = settled(browser, lambda state: state["total"] == 1 and state["message"] is None)
    assert_shows(site, state)
    assert not form.is_displayed()
    assert browser.execute_script("return Object.values(sessionStorage)") == [token]
    assert browser.execute_script("return localStorage.length") == 0  # nothing outlives the tab
    browser.execute_script("sessionStorage.clear()")
