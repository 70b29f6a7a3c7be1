"""GET /status-count and /health over a fresh real database per test."""

import uuid
from datetime import datetime, timezone

import pytest

from counts import BatchWriter, Folder
from api import create_app
from conftest import MONGO_URI


@pytest.fixture
def app(mongo):
    database = f"test_api_{uuid.uuid4().hex[:10]}"
    app = create_app({"TESTING": True, "MONGO_URI": MONGO_URI, "MONGO_DB": database, "MONGO_COLLECTION": "status"})
    app.collection = mongo[database]["status"]
    yield app
    app.extensions["mongo"].close()
    mongo.drop_database(database)


@pytest.fixture
def client(app):
    return app.test_client()


def utc(*parts):
    return datetime(*parts, tzinfo=timezone.utc)


def store(app, *rows):
    """rows: (status, timestamp), written as server.py writes them."""
    documents = [{"status": status, "timestamp": moment, "received_at": moment} for status, moment in rows]
    BatchWriter(app.collection).write(documents)
    Folder(app.collection).fold_once()


def counts(*pairs):
    result = {str(status): 0 for status in range(7)}
    for status, count in pairs:
        result[str(status)] = count
    return result


def test_counts_every_status_in_a_half_open_range(app, client):
    store(app, (0, utc(2026, 11, 27, 10)), (3, utc(2026, 11, 27, 10, 30)), (3, utc(2026, 11, 27, 10, 59, 59, 999000)),
          (6, utc(2026, 11, 27, 11)), (5, utc(2026, 11, 27, 9, 59, 59, 999000)))
    response = client.get("/status-count?start=2026-11-27T10:00:00Z&end=2026-11-27T11:00:00Z")
    assert response.status_code == 200
    assert response.get_json() == {"start": "2026-11-27T10:00:00Z", "end": "2026-11-27T11:00:00Z",
                                   "counts": counts((0, 1), (3, 2)), "total": 3}


def test_offsets_are_honoured_and_naive_times_are_utc(app, client):
    store(app, (1, utc(2026, 11, 27, 10)), (2, utc(2026, 11, 27, 12)))
    answer = client.get("/status-count?start=2026-11-27T11:00:00%2B01:00&end=2026-11-27T07:00:01-05:00").get_json()
    assert (answer["start"], answer["end"]) == ("2026-11-27T10:00:00Z", "2026-11-27T12:00:01Z")
    assert answer["counts"] == counts((1, 1), (2, 1))
    answer = client.get("/status-count?start=2026-11-27T10:00:00&end=2026-11-27T12:00:00").get_json()
    assert answer["counts"] == counts((1, 1)) and answer["start"] == "2026-11-27T10:00:00Z"


def test_empty_range_and_empty_database_answer_zeros(app, client):
    store(app, (4, utc(2026, 11, 27, 10)))
    for query in ("start=2026-11-27T10:00:00Z&end=2026-11-27T10:00:00Z", "start=2020-01-01&end=2020-01-02"):
        answer = client.get(f"/status-count?{query}").get_json()
        assert answer["counts"] == counts() and answer["total"] == 0


def test_sub_millisecond_bounds_keep_the_half_open_meaning(app, client):
    store(app, (2, utc(2026, 11, 27, 10, 0, 0, 1000)))  # stored precision is 1 ms
    included = client.get("/status-count?start=2026-11-27T10:00:00.0005Z&end=2026-11-27T10:00:00.0015Z").get_json()
    excluded = client.get("/status-count?start=2026-11-27T10:00:00.0011Z&end=2026-11-27T10:00:01Z").get_json()
    assert (included["total"], excluded["total"]) == (1, 0)


@pytest.mark.parametrize("query, parameter", [
    ("", "start"),
    ("end=2026-11-27T00:00:00Z", "start"),
    ("start=2026-11-27T00:00:00Z", "end"),
    ("start=&end=2026-11-27", "start"),
    ("start=yesterday&end=2026-11-27", "start"),
    ("start=2026-11-27&end=2026-13-01", "end"),
    ("start=2026-11-27&end=2026-11-28T25:00:00", "end"),
    ("start=1732700000&end=2026-11-27", "start"),
    ("start=2026-11-27&start=2026-11-26&end=2026-11-28", "start"),
    ("start=2026-11-27&end=2026-11-28&end=2026-11-29", "end"),
    ("start[$gt]=&end=2026-11-28", "start"),
    ("start=" + "2" * 10000 + "&end=2026-11-28", "start"),
    ("start=2026-11-27T00:00:00%2B24:00&end=2026-11-28", "start"),
    ("start=2026-11-27T00:00:00-25:30&end=2026-11-28", "start"),
    ("start=0000-01-01T00:00:00Z&end=2026-11-28", "start"),
    ("start=2026-11-27&end=10000-01-01T00:00:00Z", "end"),
    ("start=0001-01-01T00:00:00%2B01:00&end=2026-11-28", "start"),
    ("start=2026-11-27&end=9999-12-31T23:59:59.9999Z", "end"),
    ("start=2026-11-27&end=9999-12-31T23:00:00-01:00", "end"),
    ("start=2026-11-27%00&end=2026-11-28", "start"),
    ("start=%FF%FE&end=2026-11-28", "start"),
    ("start=2026-11-28T00:00:00Z&end=2026-11-27T00:00:00Z", "start"),
])
def test_invalid_request_is_400_naming_the_parameter(client, query, parameter):
    response = client.get(f"/status-count?{query}")
    assert response.status_code == 400
    assert response.is_json
    assert parameter in response.get_json()["error"]


def test_health_answers_200_when_mongodb_answers(client):
    assert client.get("/health").status_code == 200


def test_unreachable_database_is_503_not_500():
    app = create_app({"TESTING": True, "MONGO_URI": "mongodb://127.0.0.1:9/"})
    client = app.test_client()
    assert client.get("/health").status_code == 503
    response = client.get("/status-count?start=2026-11-27&end=2026-11-28")
    assert response.status_code == 503 and "unavailable" in response.get_json()["error"]
    assert client.get("/status-count?start=x&end=y").status_code == 400


def test_unknown_route_and_method_answer_json(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").is_json
    assert client.post("/status-count").status_code == 405
