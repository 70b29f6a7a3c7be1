"""HTTP API: how many messages of each status arrived between start and end, and a dashboard.

    python api.py                      # serves on API_HOST:API_PORT with waitress
    open http://localhost:5000/        # the dashboard: templates/dashboard.html, static/dashboard.js
    curl 'localhost:5000/status-count?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z'
    curl 'localhost:5000/status-series?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z&step=1h'
    curl 'localhost:5000/metrics'      # Prometheus text format
    curl 'localhost:5000/openapi.json' # the OpenAPI 3.1 document of every route: openapi.json
"""

import importlib.metadata
import argparse
import logging
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pymongo
from flask import Flask, g, jsonify, render_template, request, send_file
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pymongo.errors import DuplicateKeyError, PyMongoError
from werkzeug.exceptions import HTTPException

import config
import counts
from messages import GRAMMAR, STATUSES, parse_time

MAX_PARAMETER_LENGTH = 64
HEALTH_TIMEOUT_SECONDS = 2
COUNT_TIMEOUT_SECONDS = 10
STEPS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "1d": 86400}  # each divides a day
MAX_BUCKETS = 1500
SHOWN_STEP_LENGTH = 16  # of a step that is none of STEPS, the error shows this much
# /health writes one document here, always the same one: a store can answer ping and still hang
# every write. One document, so that the write stays cheap on FerretDB, where an update reads
# its whole collection.
HEALTH_COLLECTION = "health"
# The dashboard's chart library: the plotly.js bundle inside the plotly wheel (pinned in
# requirements.txt), served from where pip put it, so that the page needs nothing but this API.
PLOTLY_JS = Path(importlib.metadata.distribution("plotly").locate_file("plotly/package_data/plotly.min.js"))
# The OpenAPI 3.1 document of every route below, kept by hand beside this file; tests/test_openapi.py
# checks that it names every route and fuzzes the API against it.
OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")


class BadRequest(ValueError):
    """A request parameter that cannot be answered; the text names it."""


def create_app(test_config=None):
    app = Flask(__name__)
    app.json.sort_keys = False
    app.config.from_mapping(MONGO_URI=config.MONGO_URI, MONGO_DB=config.MONGO_DB,
                            MONGO_COLLECTION=config.MONGO_COLLECTION)
    if test_config:
        app.config.from_mapping(test_config)
    # One client per process; a short selection timeout turns an outage into a quick 503.
    # MONGO_CLIENT_OPTIONS: more MongoClient options, such as event listeners.
    mongo = pymongo.MongoClient(app.config["MONGO_URI"], tz_aware=True, serverSelectionTimeoutMS=2000,
                                **app.config.get("MONGO_CLIENT_OPTIONS", {}))
    database = mongo[app.config["MONGO_DB"]]
    collection = database[app.config["MONGO_COLLECTION"]]
    app.extensions["mongo"] = mongo
    # A registry per app, not the global one: a process may build several apps (the tests do).
    registry = CollectorRegistry()
    requests_total = Counter("status_api_requests_total", "HTTP requests answered, by endpoint and status code",
                             ["endpoint", "code"], registry=registry)
    request_seconds = Histogram("status_api_request_duration_seconds", "Time to answer a request, by endpoint",
                                ["endpoint"], registry=registry)

    registry.register(_CountsCollector())

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def count_request(response):
        # The route, not the path, so that the labels stay few whatever is asked.
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        request_seconds.labels(endpoint).observe(time.perf_counter() - g.started)
        requests_total.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics():
        return generate_latest(registry), {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}

    @app.get("/")
    def dashboard():
        """The dashboard: counts per status over a range, drawn from /status-series and /status-count."""
        return render_template("dashboard.html")

    @app.get("/plotly.min.js")
    def plotly_js():
        return send_file(PLOTLY_JS, mimetype="text/javascript")

    @app.get("/openapi.json")
    def openapi():
        return send_file(OPENAPI_DOCUMENT, mimetype="application/json")

    @app.get("/status-count")
    def status_count():
        start, end = _time_range()
        with pymongo.timeout(COUNT_TIMEOUT_SECONDS):  # a hung store answers 503, not never
            answer = counts.count(collection, start, end)
        return jsonify(start=_format(start), end=_format(end),
                       counts={str(status): answer[status] for status in STATUSES}, total=sum(answer))

    @app.get("/status-series")
    def status_series():
        """Counts per status for every `step` bucket (aligned to UTC) that meets [start, end),
        the first and last clipped to it: each equals /status-count for its own bounds."""
        start, end = _time_range()
        step = request.args.get("step", "")
        if step not in STEPS or len(request.args.getlist("step")) > 1:
            shown = f"{step[:SHOWN_STEP_LENGTH]!r}" + (
                f" (first {SHOWN_STEP_LENGTH} of {len(step)} characters)" if len(step) > SHOWN_STEP_LENGTH else "")
            raise BadRequest(f"parameter 'step' must be given once, one of {', '.join(STEPS)}: {shown}")
        low, high = counts.epoch_ms(start), counts.epoch_ms(end)
        buckets = -(-high // (STEPS[step] * 1000)) - low // (STEPS[step] * 1000) if low < high else 0
        if buckets > MAX_BUCKETS:
            raise BadRequest(f"parameter 'step' {step} makes {buckets} buckets from start to end; at most "
                             f"{MAX_BUCKETS} are answered: choose a longer step or a shorter range")
        with pymongo.timeout(COUNT_TIMEOUT_SECONDS):
            answer = counts.series(collection, start, end, STEPS[step])
        return jsonify(start=_format(start), end=_format(end), step=step, buckets=[
            dict(start=_format_ms(low), end=_format_ms(high), counts={str(status): bucket[status] for status in STATUSES},
                 total=sum(bucket)) for low, high, bucket in answer])

    @app.get("/health")
    def health():
        """200 {"status": "ok"} when MongoDB answers a ping and a write within HEALTH_TIMEOUT_SECONDS;
        503 {"status": "unavailable", "error": why} otherwise."""
        try:
            with pymongo.timeout(HEALTH_TIMEOUT_SECONDS):
                database.command("ping")
        except PyMongoError as error:
            return _unhealthy(f"MongoDB does not answer: {error.__class__.__name__}")
        try:
            with pymongo.timeout(HEALTH_TIMEOUT_SECONDS):
                database[HEALTH_COLLECTION].replace_one(
                    {"_id": "api"}, {"_id": "api", "checked_at": datetime.now(timezone.utc)}, upsert=True)
        except DuplicateKeyError:
            pass  # two probes raced to create the document: the store answered both
        except PyMongoError as error:
            return _unhealthy(f"MongoDB answers ping but not a write within {HEALTH_TIMEOUT_SECONDS}s: "
                              f"{error.__class__.__name__}")
        return jsonify(status="ok")

    def _unhealthy(reason):
        app.logger.warning("health check failed: %s", reason)
        return jsonify(status="unavailable", error=reason), 503

    @app.errorhandler(BadRequest)
    def bad_request(error):
        return jsonify(error=str(error)), 400

    @app.errorhandler(counts.OldLayout)
    def counts_unavailable(error):
        app.logger.warning("%s", error)
        return jsonify(error=str(error)), 503

    @app.errorhandler(PyMongoError)
    def database_unavailable(error):
        app.logger.warning("MongoDB error: %s", error)
        return jsonify(error="the database is unavailable; try again"), 503

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=error.description), error.code

    @app.errorhandler(Exception)
    def unexpected_error(error):
        app.logger.exception("unexpected error")
        return jsonify(error="internal error"), 500

    return app


class _CountsCollector:
    """The counts' own figures, read when /metrics is asked (prometheus_client's custom collector);
    process-wide, so shared by every app of the process."""

    def collect(self):
        yield CounterMetricFamily("status_api_count_reads_started_over",
                                  "Reads of the counts begun again because a folding round changed what they read",
                                  value=counts.reads_started_over())


def _time_parameter(name):
    """The parameter as an aware UTC datetime, rounded up to the next millisecond: see parse_time."""
    values = request.args.getlist(name)
    if not values:
        raise BadRequest(f"parameter '{name}' is required ({GRAMMAR} or YYYY-MM-DD, e.g. 2026-11-27T10:00:00Z)")
    if len(values) > 1:
        raise BadRequest(f"parameter '{name}' is given {len(values)} times; give it once")
    text = values[0]
    if len(text) > MAX_PARAMETER_LENGTH:
        raise BadRequest(f"parameter '{name}' is longer than {MAX_PARAMETER_LENGTH} characters")
    try:
        # Stored times are floored to the millisecond; a bound rounded up keeps start <= t < end exact.
        return parse_time(text, round_up=True, date_alone=True)
    except ValueError as error:
        hint = " (in a URL, write '+' as %2B)" if " " in text[11:] else ""
        raise BadRequest(f"parameter '{name}' is not an RFC 3339 date and time: {error}{hint}: {text!r}") from None


def _time_range():
    start = _time_parameter("start")
    end = _time_parameter("end")
    if start > end:
        raise BadRequest(f"parameter 'start' ({_format(start)}) is after parameter 'end' ({_format(end)})")
    return start, end


def _format_ms(epoch_ms):
    return _format(counts.EPOCH + timedelta(milliseconds=epoch_ms))


def _format(moment):
    precision = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=precision) + "Z"


def main():
    from waitress import serve

    argparse.ArgumentParser(description=__doc__.splitlines()[0],
                            epilog="Settings come from the environment: API_HOST, API_PORT, MONGO_URI, "
                                   "MONGO_DB, MONGO_COLLECTION (README, Configuration).").parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app()
    try:
        serve(app, host=config.API_HOST, port=config.API_PORT)  # waitress logs "Serving on ..." once bound
    except OSError as error:  # the port is taken, or the address is not this machine's
        logging.getLogger("api").error("cannot serve on %s:%d (API_HOST, API_PORT): %s",
                                       config.API_HOST, config.API_PORT, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
