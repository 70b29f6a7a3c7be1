"""HTTP API: how many messages of each status arrived between start and end, and a dashboard.

    python api.py                      # serves on API_HOST:API_PORT with waitress
    open http://localhost:5000/        # the dashboard: templates/dashboard.html, static/dashboard.js
    curl 'localhost:5000/status-count?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z'
    curl 'localhost:5000/status-series?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z&step=1h'
    curl 'localhost:5000/metrics'      # Prometheus text format
    curl 'localhost:5000/openapi.json' # the OpenAPI 3.1 document of every route: openapi.json
"""

import argparse
import hashlib
import hmac
import importlib.metadata
import logging
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pymongo
from flask import Flask, g, jsonify, render_template, request, send_file
from flask_httpauth import HTTPTokenAuth
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pymongo.errors import ConfigurationError, DuplicateKeyError, OperationFailure, PyMongoError
from werkzeug.exceptions import HTTPException

import config
import counts
from messages import GRAMMAR, STATUSES, parse_time

MAX_PARAMETER_LENGTH = 64
# Longer query strings are answered 414 before anything reads them; a whole request line and its
# headers over 256 KiB get waitress's own 431.
MAX_QUERY_BYTES = 4096
# Served without the token when API_TOKEN is set: /health, for a load balancer, and the dashboard's
# page and scripts, which hold no data and which a browser must load before the page can ask for it;
# so are the 404 and 405 of a path or method no route has.
PUBLIC_ENDPOINTS = {"health", "dashboard", "plotly_js", "static"}
TOKEN_REALM = "status API"
AUTHENTICATION_FAILED = 18  # MongoDB's error code for a refused login
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
                            MONGO_COLLECTION=config.MONGO_COLLECTION, API_TOKEN=config.API_TOKEN)
    if test_config:
        app.config.from_mapping(test_config)
    token_auth = _token_auth(app.config["API_TOKEN"])
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

    @app.before_request
    def limit_and_authenticate():
        """A long query string, or a request without the token (when API_TOKEN is set), is
        answered here: the view never runs."""
        if len(request.query_string) > MAX_QUERY_BYTES:
            longest = max(request.query_string.split(b"&"), key=len)
            name = longest.partition(b"=")[0][:SHOWN_STEP_LENGTH].decode("utf-8", "replace")
            return jsonify(error=f"the query string is {len(request.query_string)} bytes long, and at most "
                                 f"{MAX_QUERY_BYTES} are read (its longest parameter, {name!r}, is {len(longest)})"), 414
        # A path or method that no route has answers 404 or 405 as without a token: no data,
        # and openapi.json names every route anyway.
        if token_auth and request.endpoint not in PUBLIC_ENDPOINTS and request.routing_exception is None:
            return token_auth.login_required(lambda: None)()  # None when the token is right

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
            if isinstance(error, OperationFailure) and error.code == AUTHENTICATION_FAILED:
                return _unhealthy("MongoDB refused the credentials in MONGO_URI")
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


def _token_auth(token):
    """Flask-HTTPAuth's bearer scheme (RFC 6750) accepting `token` alone, or None when it is None.
    A refusal is 401 with a JSON error and `WWW-Authenticate: Bearer`, whose `error="invalid_token"`
    tells a wrong token from a missing one (RFC 6750, section 3.1)."""
    if token is None:
        return None
    auth = HTTPTokenAuth(scheme="Bearer", realm=TOKEN_REALM)
    expected = hashlib.sha256(token.encode()).digest()

    @auth.verify_token
    def verify(presented):
        # Digests compared in constant time: how long a refusal takes tells neither how much of a
        # guess was right nor how long the token is.
        digest = hashlib.sha256((presented or "").encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, expected)

    @auth.error_handler
    def refuse(status):
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # none, another scheme, or "Bearer" alone
            response = jsonify(error="this API needs a token: send the header 'Authorization: Bearer <API_TOKEN>'")
            challenge = f'Bearer realm="{TOKEN_REALM}"'
        else:
            response = jsonify(error="the bearer token is not this API's")
            challenge = f'Bearer realm="{TOKEN_REALM}", error="invalid_token"'
        response.headers["WWW-Authenticate"] = challenge
        return response, status

    return auth


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
                            epilog="Settings come from the environment: API_HOST, API_PORT, API_TOKEN, MONGO_URI, "
                                   "MONGO_DB, MONGO_COLLECTION (README, Configuration).").parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("api")
    try:
        app = create_app()
    except ConfigurationError as error:  # a mongodb+srv:// name that does not resolve, for one
        log.error("MONGO_URI %s: %s", config.redact(config.MONGO_URI), error)
        return 1
    if config.API_TOKEN:
        log.info("API_TOKEN is set: every request but /health and the dashboard's page needs its bearer token")
    elif config.API_HOST in ("127.0.0.1", "localhost", "::1"):
        log.info("API_TOKEN is not set: anyone on this machine may read the counts")
    else:
        log.warning("API_TOKEN is not set and API_HOST is %s: anyone who reaches port %d may read the counts",
                    config.API_HOST, config.API_PORT)
    try:
        serve(app, host=config.API_HOST, port=config.API_PORT)  # waitress logs "Serving on ..." once bound
    except OSError as error:  # the port is taken, or the address is not this machine's
        log.error("cannot serve on %s:%d (API_HOST, API_PORT): %s", config.API_HOST, config.API_PORT, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
