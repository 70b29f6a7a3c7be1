"""openapi.json, the API's contract: it names every route of api.py, api.py serves it as it is, and
the real api.py (waitress, over a fresh database holding some messages) keeps it under
schemathesis's generated requests.

Schemathesis reads openapi.json (the file the running API serves: the fixture checks they are the
same) and, for each JSON operation and the page, sends the documented examples, boundary values,
other methods and up to FUZZ_EXAMPLES generated requests, valid and invalid; every response must be
no 5xx, of a documented status code and content type, and match its schema (so a 400 must name the
parameter). /metrics, /plotly.min.js and the static files are documented but not fuzzed: they take
no parameters worth generating, and their bodies are not JSON.

The schema is read from the file at collection time, not from the running API through
schemathesis.pytest.from_fixture: that loader renames pytest's test items through an attribute
that pytest 9 no longer has.
"""

import collections
import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from api import OPENAPI_DOCUMENT, create_app
from conftest import MONGO_URI, ROOT, free_port, wait_until
from counts import BatchWriter, Folder

FUZZ_EXAMPLES = 50  # generated requests per operation at most, beside examples and boundaries: about 20 s in all
NOT_FUZZED = ["/metrics", "/plotly.min.js", "/static/{filename}"]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Status codes answered during the fuzzing, per operation: each JSON operation must have answered 200.
ANSWERED = collections.defaultdict(collections.Counter)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def live_api(mongo, tmp_path_factory):
    """`python api.py` (waitress) on a free port over a database of its own, holding messages of
    every status around 2026-11-27 (the documented examples' day) stored as server.py stores them."""
    database = f"test_openapi_{uuid.uuid4().hex[:10]}"
    collection = mongo[database]["status"]
    day = datetime(2026, 11, 27, tzinfo=timezone.utc)
    rows = [(index % 7, day + timedelta(minutes=37 * index, milliseconds=index)) for index in range(60)]
    BatchWriter(collection).write([{"status": status, "timestamp": moment, "received_at": moment}
                                   for status, moment in rows])
    Folder(collection).fold_once()
    port = free_port()
    log_path = tmp_path_factory.mktemp("openapi") / "api.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "api.py")], cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "MONGO_URI": MONGO_URI, "MONGO_DB": database, "MONGO_COLLECTION": "status",
             "API_HOST": "127.0.0.1", "API_PORT": str(port)})
    url = f"http://127.0.0.1:{port}"

    def answers():
        assert process.poll() is None, f"api.py exited early:\n{log_path.read_text(errors='replace')}"
        try:
            return get(f"{url}/health")[0] == 200
        except OSError:
            return False

    try:
        wait_until(answers, timeout=30, what="api.py to answer /health")
        status, answer = get(f"{url}/status-count?start=2026-11-27&end=2026-11-29")
        assert (status, answer["total"]) == (200, len(rows))
        assert get(f"{url}/openapi.json") == (200, json.loads(OPENAPI_DOCUMENT.read_text()))
        yield url
    finally:
        process.terminate()
        process.wait(15)
        mongo.drop_database(database)


schema = schemathesis.openapi.from_path(OPENAPI_DOCUMENT).exclude(path=NOT_FUZZED)


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_keeps_the_contract(live_api, case):
    response = case.call(base_url=live_api, timeout=30)
    ANSWERED[case.operation.label][response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


def test_every_json_operation_answered_200_to_some_request():
    """Run after the fuzzing above (pytest keeps the file's order): a contract met only by errors
    would prove little."""
    operations = ["GET /status-count", "GET /status-series", "GET /health", "GET /openapi.json"]
    assert set(operations) <= set(ANSWERED), f"fuzzed: {dict(ANSWERED)}; run the whole file"
    for operation in operations:
        assert ANSWERED[operation][200] > 0, (operation, ANSWERED[operation])
    assert ANSWERED["GET /status-count"][400] > 0 and ANSWERED["GET /status-series"][400] > 0, dict(ANSWERED)


def test_the_document_is_valid_openapi_3_1_and_names_every_route_and_nothing_else():
    app = create_app({"TESTING": True, "MONGO_URI": "mongodb://127.0.0.1:9/"})  # no request reaches it
    try:
        client = app.test_client()
        response = client.get("/openapi.json")
        assert response.status_code == 200 and response.mimetype == "application/json"
        document = response.get_json()
        assert document == json.loads(OPENAPI_DOCUMENT.read_text())
        routes = {(re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method)
                  for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
        documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
        assert routes == documented
        assert document["openapi"] == "3.1.0"
        schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 meta-schema
    finally:
        app.extensions["mongo"].close()
