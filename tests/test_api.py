"""GET /status-count, /status-series and /health over a fresh real database per test."""

from datetime import datetime, timezone

import pytest

import counts as counts_module
from counts import BatchWriter, Folder
from api import create_app


@pytest.fixture
def app(fresh_app):
    return fresh_app()


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


def test_other_query_parameters_are_ignored(app, client):
    store(app, (4, utc(2026, 11, 27, 10)))
    plain = client.get("/status-count?start=2026-11-27&end=2026-11-28")
    extra = client.get("/status-count?_=1764500000000&start=2026-11-27&end=2026-11-28&step=1h&Start=x")
    assert plain.status_code == extra.status_code == 200
    assert plain.get_json() == extra.get_json() and extra.get_json()["counts"] == counts((4, 1))


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


@pytest.mark.parametrize("digits", range(7, 16))
def test_bounds_finer_than_a_millisecond_round_up_exactly_whatever_their_length(app, client, digits):
    """Stored times are whole milliseconds; a bound with finer digits rounds up to the next one,
    so start <= t < end holds for the stored t. Digits past the sixth count too."""
    store(app, (2, utc(2026, 11, 27, 12, 0, 0, 1000)))  # 12:00:00.001

    def total(start, end):
        response = client.get(f"/status-count?start={start}&end={end}")
        assert response.status_code == 200, response.get_json()
        return response.get_json()["total"]

    just_after = "001" + "0" * (digits - 4) + "1"  # 12:00:00.001 and a last nonzero digit
    exactly = "001" + "0" * (digits - 3)
    just_before = "000" + "9" * (digits - 3)
    assert total(f"2026-11-27T12:00:00.{just_after}Z", "2026-11-27T12:00:01Z") == 0
    assert total("2026-11-27T12:00:00Z", f"2026-11-27T12:00:00.{just_after}Z") == 1
    assert total(f"2026-11-27T12:00:00.{exactly}Z", "2026-11-27T12:00:01Z") == 1
    assert total("2026-11-27T12:00:00Z", f"2026-11-27T12:00:00.{exactly}Z") == 0
    assert total(f"2026-11-27T12:00:00.{just_before}Z", "2026-11-27T12:00:01Z") == 1
    assert total("2026-11-27T12:00:00Z", f"2026-11-27T12:00:00.{just_before}Z") == 0
    assert total(f"2026-11-27T13:00:00.{just_after}%2B01:00", "2026-11-27T06:30:01-05:30") == 0
    assert total("2026-11-27T06:30:00-05:30", f"2026-11-27T13:00:00.{just_after}%2B01:00") == 1
    answer = client.get(f"/status-count?start=2026-11-27T12:00:00.{just_after}Z&end=2026-11-28").get_json()
    assert answer["start"] == "2026-11-27T12:00:00.002Z"


def test_every_rfc_3339_form_and_a_date_alone_are_accepted(app, client):
    store(app, (1, utc(2026, 11, 27, 10)), (2, utc(2026, 11, 27, 23, 59, 59, 999000)))
    for start, end in [("2026-11-27", "2026-11-28"), ("2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z"),
                       ("2026-11-27t00:00:00z", "2026-11-28t00:00:00z"), ("2026-11-27 00:00:00", "2026-11-28+00:00:00"),
                       ("2026-11-27T00:00:00-00:00", "2026-11-28T00:00:00.000000000Z"),
                       ("2026-11-26T19:00:00-05:00", "2026-11-28T05:30:00%2B05:30"),
                       ("2026-11-26T00:01:00-23:59", "2026-11-28T23:59:00%2B23:59")]:
        answer = client.get(f"/status-count?start={start}&end={end}").get_json()
        assert answer.get("total") == 2, (start, end, answer)
        assert (answer["start"], answer["end"]) == ("2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z")


@pytest.mark.parametrize("value, words", [
    ("2026-11-27T10.5Z", "fraction of an hour"),
    ("2026-11-27T10:30.5Z", "fraction of an hour or a minute"),
    ("2026-11-27T10:00:00,5Z", "decimal sign"),
    ("2026-W48-5", "week dates"),
    ("2026-W48-5T10:00:00Z", "week dates"),
    ("2026-331", "ordinal dates"),
    ("20261127", "basic format"),
    ("20261127T100000Z", "basic format"),
    ("2026-11-27T100000Z", "basic format"),
    ("2026-11", "a month alone"),
    ("2026-11-27T24:00:00Z", "hour must be in 0..23"),
    ("2016-12-31T23:59:60Z", "leap second"),
    ("2026-11-27T10:00:00%2B24:00", "offset +24:00"),
    ("2026-11-27T10:00:00-00:60", "offset -00:60"),
    ("2026-11-27T10:00:00Z%2B01:00", "follows the time"),
    ("2026-11-27T10:00:00%2B0100", "follows the time"),
    ("2026-11-27T10:00:00%2B01:00:00", "follows the time"),
    ("2026-11-27T10:00:00+01:00", "write '+' as %2B"),
    ("2026-11-27T10:00:00.5+01:00", "write '+' as %2B"),
    ("2026-11-27T10:00:00UTC", "follows the time"),
    ("2026-11-27T10:00:00Zjunk", "follows the time"),
    ("2026-11-27T10:00:00Z%0A", "follows the time"),
    ("2026-11-27T10:00:00.", "follows the time"),
    ("2026-11-27Z", "follows the date"),
    ("2026-11-27T", "follows the date"),
    ("2026-11-27T10:00Z", "seconds are required"),
    ("2026-11-27T10", "seconds are required"),
    ("%D9%A2%D9%A0%D9%A2%D9%A6-11-27", "not ASCII"),  # Arabic-Indic digits
    ("2026-11-27T%EF%BC%91%EF%BC%90:00:00Z", "not ASCII"),  # fullwidth digits
    ("10000-01-01", "four digits"),
    ("-2026-11-27", "four digits"),
    ("0000-01-01", "year 0"),
    ("2026-02-29", "day is out of range"),
    ("2026-00-10", "month must be in 1..12"),
    ("0001-01-01T00:00:00%2B00:01", "outside years"),
    ("9999-12-31T23:59:59.9991Z", "outside years"),
    ("27/11/2026", "not of the form"),
    ("Fri, 27 Nov 2026 10:00:00 GMT", "not of the form"),
    ("now", "not of the form"),
])
@pytest.mark.parametrize("parameter", ["start", "end"])
def test_forms_that_only_look_like_rfc_3339_are_400_with_the_reason(client, parameter, value, words):
    other = {"start": "end=2026-12-01", "end": "start=2026-11-01"}[parameter]
    response = client.get(f"/status-count?{parameter}={value}&{other}")
    assert response.status_code == 400 and response.is_json
    error = response.get_json()["error"]
    assert f"parameter '{parameter}'" in error and words in error, error


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
    assert f"parameter '{parameter}'" in response.get_json()["error"]


@pytest.mark.parametrize("query, parameter", [
    ("start=" + "2" * 10000 + "&end=2026-11-28", "start"),
    ("start=2026-11-27&end=2026-11-28&" + "x" * 5000, "x" * 16),
    ("&".join(["start=2026-11-27", "end=2026-11-28", *["_=1"] * 2000]), "start"),  # the longest of many short ones
])
def test_an_over_long_query_string_is_414_naming_its_longest_parameter(client, query, parameter):
    response = client.get(f"/status-count?{query}")
    assert response.status_code == 414
    assert f"(its longest parameter, '{parameter}', is" in response.get_json()["error"]


def test_series_has_every_aligned_bucket_with_zeros_and_each_equals_status_count(app, client):
    store(app, (1, utc(2026, 11, 27, 10, 0, 0, 5000)), (1, utc(2026, 11, 27, 10, 4, 59, 999000)),
          (6, utc(2026, 11, 27, 10, 5)), (3, utc(2026, 11, 27, 10, 17, 30)), (0, utc(2026, 11, 27, 10, 20)))
    response = client.get("/status-series?start=2026-11-27T10:00:00.002Z&end=2026-11-27T10:20:00Z&step=5m")
    assert response.status_code == 200
    answer = response.get_json()
    assert (answer["start"], answer["end"], answer["step"]) == ("2026-11-27T10:00:00.002Z", "2026-11-27T10:20:00Z", "5m")
    assert [(b["start"], b["end"], b["total"]) for b in answer["buckets"]] == [
        ("2026-11-27T10:00:00.002Z", "2026-11-27T10:05:00Z", 2), ("2026-11-27T10:05:00Z", "2026-11-27T10:10:00Z", 1),
        ("2026-11-27T10:10:00Z", "2026-11-27T10:15:00Z", 0), ("2026-11-27T10:15:00Z", "2026-11-27T10:20:00Z", 1)]
    assert answer["buckets"][2]["counts"] == counts()
    for bucket in answer["buckets"]:
        single = client.get(f"/status-count?start={bucket['start']}&end={bucket['end']}").get_json()
        assert (bucket["counts"], bucket["total"]) == (single["counts"], single["total"])


@pytest.mark.parametrize("step, seconds", [("1m", 60), ("15m", 900), ("1h", 3600), ("6h", 21600), ("1d", 86400)])
def test_series_buckets_are_aligned_to_utc(app, client, step, seconds):
    store(app, *[(hour % 7, utc(2026, 11, 26, hour, hour)) for hour in range(24)])
    answer = client.get(f"/status-series?start=2026-11-26T00:00:00Z&end=2026-11-27T00:00:00Z&step={step}").get_json()
    assert len(answer["buckets"]) == 86400 // seconds
    assert sum(bucket["total"] for bucket in answer["buckets"]) == 24
    assert answer["buckets"][-1]["start"] == datetime.fromtimestamp(
        utc(2026, 11, 27).timestamp() - seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def test_series_of_an_empty_range_has_no_buckets(client):
    answer = client.get("/status-series?start=2026-11-27T10:00:00Z&end=2026-11-27T10:00:00Z&step=1h").get_json()
    assert answer["buckets"] == []


@pytest.mark.parametrize("query, parameter", [
    ("start=2026-11-27&end=2026-11-28", "step"),
    ("start=2026-11-27&end=2026-11-28&step=", "step"),
    ("start=2026-11-27&end=2026-11-28&step=2m", "step"),
    ("start=2026-11-27&end=2026-11-28&step=60", "step"),
    ("start=2026-11-27&end=2026-11-28&step=1H", "step"),
    ("start=2026-11-27&end=2026-11-28&step=1h&step=1d", "step"),
    ("start=2026-11-27&end=2026-11-28&step=" + "1" * 4000, "step"),
    ("start=2026-11-01&end=2026-11-28&step=1m", "step"),  # 38,880 buckets
    ("start=2000-01-01&end=2026-11-28&step=1d", "step"),  # 9,828 buckets
    ("start=2026-11-28&end=2026-11-27&step=1h", "start"),
    ("start=yesterday&end=2026-11-27&step=1h", "start"),
    ("start=2026-11-27&end=2026-11-28T25:00:00&step=1h", "end"),
    ("end=2026-11-28&step=1h", "start"),
])
def test_invalid_series_request_is_400_naming_the_parameter(client, query, parameter):
    response = client.get(f"/status-series?{query}")
    assert response.status_code == 400 and response.is_json
    assert f"'{parameter}'" in response.get_json()["error"] or f"{parameter} (" in response.get_json()["error"]


def test_an_over_long_step_is_shown_cut_short_saying_so(client):
    error = client.get("/status-series?start=2026-11-27&end=2026-11-28&step=" + "1" * 4000).get_json()["error"]
    assert "'1111111111111111' (first 16 of 4000 characters)" in error


def test_metrics_export_the_reads_of_the_counts_begun_again(client, monkeypatch):
    monkeypatch.setattr(counts_module, "_reads_started_over", [3])
    assert "\nstatus_api_count_reads_started_over_total 3.0\n" in client.get("/metrics").get_data(as_text=True)


def test_health_answers_200_when_mongodb_answers(client):
    assert client.get("/health").status_code == 200


def test_unreachable_database_is_503_not_500():
    app = create_app({"TESTING": True, "MONGO_URI": "mongodb://127.0.0.1:9/"})
    client = app.test_client()
    assert client.get("/health").status_code == 503
    response = client.get("/status-count?start=2026-11-27&end=2026-11-28")
    assert response.status_code == 503 and "unavailable" in response.get_json()["error"]
    assert client.get("/status-count?start=x&end=y").status_code == 400
    assert client.get("/status-series?start=2026-11-27&end=2026-11-28&step=1h").status_code == 503


def test_messages_stored_without_counts_are_503_naming_the_command(app, client):
    app.collection.insert_one({"status": 1, "timestamp": utc(2026, 11, 27, 10)})  # as a version that kept no counts
    response = client.get("/status-count?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z")
    assert response.status_code == 503
    assert "python server.py --rebuild-counts" in response.get_json()["error"]


def test_unknown_route_and_method_answer_json(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").is_json
    assert client.post("/status-count").status_code == 405
