"""Rollup answers equal the raw aggregation: random messages, ranges, crash points, two writers."""

import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.errors import BulkWriteError

import rollups

# Midnight that starts a 32-day span, so data and ranges cross every level's boundaries.
BASE = datetime(2026, 12, 13, tzinfo=timezone.utc)
assert rollups.epoch_seconds(BASE) % rollups.LEVELS[-1][1] == 0
WINDOW_MS = 3 * 3600 * 1000

offsets_ms = st.one_of(
    st.integers(-WINDOW_MS, WINDOW_MS),
    st.integers(-3, 3).map(lambda minutes: minutes * 60_000),  # exactly on boundaries
    st.integers(-2000, 2000),  # around the span boundary, sub-second
)
messages = st.lists(st.tuples(st.integers(0, 6), offsets_ms), min_size=1, max_size=12)
ranges = st.tuples(offsets_ms, offsets_ms, st.booleans()).map(
    lambda r: (min(r[0], r[1]), max(r[0], r[1]), r[2]))
steps = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.sampled_from("AB"), messages),
    st.tuples(st.just("touch"), st.sampled_from("AB")),
    st.tuples(st.just("query"), ranges),
), min_size=1, max_size=14)


@pytest.fixture
def database(mongo):
    name = f"test_rollups_{uuid.uuid4().hex[:10]}"
    yield mongo[name]
    mongo.drop_database(name)


def moment(offset_ms, whole_seconds=True):
    if whole_seconds:
        offset_ms -= offset_ms % 1000
    return BASE + timedelta(milliseconds=offset_ms)


def check(collection, low_ms, high_ms, whole_seconds):
    start, end = moment(low_ms, whole_seconds), moment(high_ms, whole_seconds)
    assert rollups.count(collection, start, end) == rollups.raw_counts(collection, start, end), (start, end)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps, final_ranges=st.lists(ranges, min_size=1, max_size=4))
def test_rollups_equal_raw_counts_through_crashes_and_two_writers(database, steps, final_ranges):
    collection = database[f"status_{uuid.uuid4().hex[:8]}"]
    pending = {"A": [], "B": []}  # written, not yet followed by their token writes (a crash would leave them so)
    serial = 0
    for step in steps:
        if step[0] == "insert":
            _, writer, batch = step
            documents = []
            for status, offset in batch:
                serial += 1
                documents.append({"_id": f"m{serial}", "status": status, "timestamp": moment(offset, False)})
            if pending[writer] and len(documents) > 1:  # a redelivery: part of the batch is already stored
                documents[0] = dict(pending[writer][0])
            try:
                collection.insert_many([dict(d) for d in documents], ordered=False)
            except BulkWriteError:
                pass  # duplicates from the redelivery
            pending[writer] += documents
        elif step[0] == "touch":
            rollups.touch(collection, pending[step[1]])
            pending[step[1]] = []
        else:
            low, high, whole = step[1]
            if not pending["A"] and not pending["B"]:
                check(collection, low, high, whole)
            else:  # a query between a crash and its redelivery may see old seals; it must not keep them
                rollups.count(collection, moment(low, whole), moment(high, whole))
    for writer in "AB":  # the redelivery of whatever was not acknowledged
        rollups.touch(collection, pending[writer])
    for low, high, whole in final_ranges:
        check(collection, low, high, whole)
    check(collection, -40 * 86400 * 1000, 40 * 86400 * 1000, True)  # more than a whole span


def test_sealed_answers_read_few_documents(database):
    """Once sealed, a 30-day count reads a handful of bucket documents, whatever the data."""
    collection = database["status"]
    documents = [{"_id": f"m{i}", "status": i % 7, "timestamp": BASE - timedelta(seconds=37 * i)} for i in range(5000)]
    collection.insert_many(documents)
    rollups.touch(collection, documents)
    start, end = BASE - timedelta(days=30, seconds=-7), BASE - timedelta(seconds=13)
    expected = rollups.raw_counts(collection, start, end)
    assert rollups.count(collection, start, end) == expected  # seals everything it needs
    calls = []
    reader = rollups._Reader(collection)
    original_seal = reader._seal
    reader._seal = lambda level, index: calls.append((level, index)) or original_seal(level, index)
    reader._reseal = lambda *bucket: pytest.fail(f"bucket {bucket} computed again")
    first, last = rollups.epoch_seconds(start), rollups.epoch_seconds(end)
    assert reader.count(first, last) == expected
    assert len(calls) <= 12


def test_writers_racing_on_new_buckets(database):
    """Several writer threads create the same buckets' tokens at once (FerretDB answers the
    losing upserts with duplicate-key errors); every write still lands and counts stay exact."""
    collection = database["status"]
    failures = []

    def writer(number):
        try:
            for batch in range(20):
                documents = [{"_id": f"w{number}-{batch}-{i}", "status": i % 7,
                              "timestamp": BASE + timedelta(minutes=batch, seconds=i)} for i in range(5)]
                collection.insert_many(documents)
                rollups.touch(collection, documents)
        except Exception as error:  # noqa: BLE001 - reported below, with the thread that saw it
            failures.append((number, error))

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    check(collection, -3600 * 1000, 3 * 3600 * 1000, True)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
    lambda naive: naive.replace(tzinfo=timezone.utc)))
def test_epoch_seconds_is_the_exact_second(moment):
    exact = (moment - rollups.EPOCH) // timedelta(seconds=1)
    assert rollups.epoch_seconds(moment) == exact
    last_microsecond = moment.replace(microsecond=999_999)  # where a rounded float would carry into the next second
    assert rollups.epoch_seconds(last_microsecond) == exact
    assert rollups.epoch_seconds(moment.replace(tzinfo=None)) == exact


@pytest.mark.parametrize("seconds", [2**33 - 1, 2**33, -(2**33), -(2**33) + 1, 2**37, -1, 0])
def test_epoch_seconds_at_the_float_bound(seconds):
    for microsecond in (0, 1, 999_999):
        moment = rollups.EPOCH + timedelta(seconds=seconds, microseconds=microsecond)
        assert rollups.epoch_seconds(moment) == seconds
