"""Counts equal the raw aggregation: random messages, ranges, duplicates, redeliveries, a crash
between every two writes, folders cut short, two writers, and readers racing writers. And
no count reads the raw collection."""

import random
import re
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pymongo
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pymongo import monitoring

import counts
from conftest import MONGO_URI, wait_until

# Midnight that starts a 32-day span, so data and ranges cross every level's boundaries.
BASE = datetime(2026, 12, 13, tzinfo=timezone.utc)
assert counts.epoch_seconds(BASE) % counts.SPAN == 0
WINDOW_MS = 2 * 86400 * 1000


class Clock:
    """Wall-clock time that a test can move forward, to hand the folder's lease on."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return datetime.now(timezone.utc).timestamp() + self.offset


class Crash(Exception):
    """A process dying at that point."""


class FolderCutShort(counts.Folder):
    """A folder that dies after `merges` aggregate writes of its next round."""

    def __init__(self, collection, merges, **options):
        super().__init__(collection, **options)
        self._merges_left = merges

    def _merge(self, *arguments):
        if self._merges_left == 0:
            raise Crash()
        self._merges_left -= 1
        super()._merge(*arguments)


@pytest.fixture
def database(mongo):
    name = f"test_counts_{uuid.uuid4().hex[:10]}"
    yield mongo[name]
    mongo.drop_database(name)


def moment(offset_ms):
    return BASE + timedelta(milliseconds=offset_ms)


offsets_ms = st.one_of(
    st.integers(-WINDOW_MS, WINDOW_MS),
    st.integers(-3, 3).map(lambda hours: hours * 3_600_000),  # exactly on boundaries
    st.integers(-2500, 2500),  # around the span boundary, inside seconds
)
batches = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), offsets_ms), min_size=1, max_size=10)
ranges = st.tuples(offsets_ms, offsets_ms, st.integers(0, 999)).map(
    lambda r: (min(r[0], r[1]), max(r[0], r[1]) + r[2] // 500))
steps = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(["acknowledged", "crash-after-raw-insert", "crash-before-ack"]), batches),
    st.tuples(st.just("fold"), st.integers(0, 12)),  # merges before the folder dies; 12: it finishes
    st.tuples(st.just("query"), ranges),
), min_size=1, max_size=16)


def check(collection, low_ms, high_ms):
    start, end = moment(low_ms), moment(high_ms)
    assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end), (start, end)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps, final_ranges=st.lists(ranges, min_size=1, max_size=4),
       merging=st.sampled_from([(counts.MAX_FRAGMENTS_PER_SECOND, counts.MAX_WHOLE_HOUR_ENTRIES,
                                 counts.MAX_COMPACTED_ENTRIES), (1, 10**6, 10**6), (1, 0, 0), (1, 10**6, 3)]))
def test_counts_equal_raw_counts_through_crashes_redeliveries_and_folders_cut_short(database, steps, final_ranges,
                                                                                    merging, monkeypatch):
    """`merging`: a second's detail is merged once it is in more fragments than the first, the
    whole hour's while it holds at most the second's messages, else that second's alone, into
    pieces of at most the third's."""
    monkeypatch.setattr(counts, "MAX_FRAGMENTS_PER_SECOND", merging[0])
    monkeypatch.setattr(counts, "MAX_WHOLE_HOUR_ENTRIES", merging[1])
    monkeypatch.setattr(counts, "MAX_COMPACTED_ENTRIES", merging[2])
    collection = database[f"status_{uuid.uuid4().hex[:8]}"]
    clock = Clock()
    writer = counts.BatchWriter(collection)
    unacknowledged = []  # batches that died before their ack: the broker redelivers them
    unrecorded = 0  # of those, the ones that died between their raw insert and their record

    def crash_after_raw_insert(point, detail=None):
        if point == "after-raw-insert":
            raise Crash()

    def redeliver():
        """The broker hands the unacknowledged batches to a live server, while a folder starts a
        little later: a batch meeting the duplicates of a dead one must wait for its recovery."""
        nonlocal unrecorded
        folder = threading.Timer(0.3, fold, args=(counts.Folder(collection, recover_after=0, clock=clock),))
        folder.start()
        while unacknowledged:
            writer.write(unacknowledged.pop())
        if unrecorded:
            check(collection, -3 * WINDOW_MS, 3 * WINDOW_MS)  # all acknowledged: exact, recovered or not yet folded
        folder.join()
        unrecorded = 0

    def fold(folder):
        """A folder process's life: it folds what there is, or dies; then its lease runs out."""
        try:
            while folder.fold_once():
                pass
        except Crash:
            pass
        clock.offset += (counts.LEASE_WINDOW + 1) * counts.LEASE_SECONDS  # past its writes in flight too

    for step in steps:
        if step[0] == "write":
            _, outcome, messages = step
            documents = list({f"m{number}": {"_id": f"m{number}", "status": status, "timestamp": moment(offset)}
                              for number, status, offset in messages}.values())
            if outcome == "crash-after-raw-insert":
                try:
                    counts.BatchWriter(collection, fault_hook=crash_after_raw_insert).write([dict(d) for d in documents])
                except Crash:
                    unacknowledged.append(documents)
                    unrecorded += 1
            else:
                if unrecorded:
                    redeliver()  # else this batch, meeting their duplicates, would wait for them
                writer.write([dict(d) for d in documents])
                if outcome == "crash-before-ack":
                    unacknowledged.append(documents)
        elif step[0] == "fold":
            fold(FolderCutShort(collection, step[1], clock=clock) if step[1] < 12 else counts.Folder(collection, clock=clock))
        else:
            low, high = step[1]
            answer = counts.count(collection, moment(low), moment(high))
            if not unrecorded:  # a batch recorded but not acknowledged is counted already
                assert answer == counts.raw_counts(collection, moment(low), moment(high))
    redeliver()
    for low, high in final_ranges:
        check(collection, low, high)
    check(collection, -40 * 86400 * 1000, 40 * 86400 * 1000)  # more than a whole span
    fold(counts.Folder(collection, clock=clock))
    for low, high in final_ranges:
        check(collection, low, high)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(st.integers(0, 6), offsets_ms), max_size=60), merges=st.integers(0, 12),
       bounds=ranges, step=st.sampled_from([1, 60, 300, 900, 3600, 21600, 86400]))
def test_series_buckets_are_aligned_contiguous_and_exact(database, messages, merges, bounds, step):
    """Half the messages folded (by a folder that may die mid-round), half only recorded:
    every bucket of a series equals the messages inside its own bounds."""
    collection = database[f"status_{uuid.uuid4().hex[:8]}"]
    documents = [{"_id": f"m{index}", "status": status, "timestamp": moment(offset)}
                 for index, (status, offset) in enumerate(messages)]
    writer = counts.BatchWriter(collection)
    if documents[::2]:
        writer.write(documents[::2])
    try:
        FolderCutShort(collection, merges).fold_once()
    except Crash:
        pass
    if documents[1::2]:
        writer.write(documents[1::2])
    low, high = bounds[0], min(bounds[1], bounds[0] + 400 * step * 1000)
    buckets = counts.series(collection, moment(low), moment(high), step)
    base = counts.epoch_ms(BASE)
    edges = [low + base] + [bucket_high for _, bucket_high, _ in buckets]
    assert [bucket_low for bucket_low, _, _ in buckets] == edges[:-1]
    assert edges[-1] == (high + base if low < high else low + base)
    for bucket_low, bucket_high, answer in buckets:
        assert bucket_low < bucket_high
        assert bucket_low == low + base or bucket_low % (step * 1000) == 0  # aligned, but the first
        assert bucket_high - bucket_low <= step * 1000
        expected = [0] * counts.STATUSES
        for document in documents:
            if bucket_low <= counts.epoch_ms(document["timestamp"]) < bucket_high:
                expected[document["status"]] += 1
        assert answer == expected, (bucket_low, bucket_high)


def test_readers_racing_writers_and_the_folder_see_every_acknowledged_message(database):
    """Two writer threads, a folder thread and a reader thread at once: every answer holds at
    least what was acknowledged before the read began and at most what was written before it
    ended; and once all is acknowledged, answers equal the raw aggregation."""
    collection = database["status"]
    start, end = BASE - timedelta(hours=2), BASE + timedelta(hours=2)
    acknowledged = [0] * 7  # messages inside [start, end), per status
    attempted = [0] * 7
    lock = threading.Lock()
    stop_folding, failures = threading.Event(), []
    rng = random.Random(5)
    plans = [[[{"_id": f"w{writer}-{batch}-{index}", "status": rng.randrange(7),
                "timestamp": BASE + timedelta(milliseconds=rng.randrange(-3 * 3_600_000, 3 * 3_600_000))}
               for index in range(50)] for batch in range(30)] for writer in range(2)]

    def inside(document):
        return start <= document["timestamp"] < end

    def write(plan):
        writer = counts.BatchWriter(collection)
        try:
            for documents in plan:
                with lock:
                    for document in filter(inside, documents):
                        attempted[document["status"]] += 1
                writer.write(documents)
                with lock:
                    for document in filter(inside, documents):
                        acknowledged[document["status"]] += 1
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)

    writers = [threading.Thread(target=write, args=(plan,)) for plan in plans]
    folder = threading.Thread(target=counts.Folder(collection).run, args=(stop_folding,))
    folder.start()
    for thread in writers:
        thread.start()
    reads = 0
    while any(thread.is_alive() for thread in writers) or reads < 5:
        with lock:
            before = list(acknowledged)
        answer = counts.count(collection, start, end)
        with lock:
            after = list(attempted)
        assert all(low <= value <= high for low, value, high in zip(before, answer, after)), (before, answer, after)
        reads += 1
    stop_folding.set()
    folder.join(30)
    for thread in writers:
        thread.join(30)
    assert failures == []
    assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end) == acknowledged


def test_a_read_that_a_round_overtakes_begins_again_and_is_counted(database, monkeypatch):
    """A round that writes an aggregate between a reader's log and its aggregates makes the
    reader begin again (argument 3): the answer stays exact, and the read is counted."""
    collection = database["status"]
    writer, folder = counts.BatchWriter(collection), counts.Folder(collection)
    writer.write([{"_id": "a", "status": 1, "timestamp": BASE + timedelta(seconds=1)}])
    wait_until(folder.fold_once, what="the first round")
    writer.write([{"_id": "b", "status": 2, "timestamp": BASE + timedelta(seconds=2)}])
    fetch, overtaken = counts._Snapshot._fetch, []

    def fetch_after_a_round(snapshot, keys):
        if not overtaken:
            overtaken.append(folder.fold_once())  # after the reader's log, before its aggregates
        fetch(snapshot, keys)

    monkeypatch.setattr(counts._Snapshot, "_fetch", fetch_after_a_round)
    before = counts.reads_started_over()
    start, end = BASE, BASE + timedelta(hours=1)
    assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end) == [0, 1, 1, 0, 0, 0, 0]
    assert overtaken == [True] and counts.reads_started_over() == before + 1


def test_a_write_given_up_on_is_recovered_soon_once_the_retry_names_it(database):
    """A write that times out after its raw insert leaves an open intent whose writer lives on:
    the retry meets those documents and waits for their recovery, which must not wait for
    RECOVER_AFTER_SECONDS (an hour here) since the retry's intent names the batch given up."""
    collection = database["status"]
    documents = [{"_id": f"m{index}", "status": index % 7, "timestamp": BASE + timedelta(seconds=index)}
                 for index in range(50)]
    failures = iter([pymongo.errors.ExecutionTimeout("operation exceeded time limit")])

    def time_out_once_after_the_raw_insert(point, detail=None):
        if point == "after-raw-insert":
            error = next(failures, None)
            if error:
                raise error

    writer = counts.BatchWriter(collection, fault_hook=time_out_once_after_the_raw_insert)
    with pytest.raises(pymongo.errors.ExecutionTimeout):
        writer.write([dict(document) for document in documents])
    stopping = threading.Event()
    folder = threading.Thread(target=counts.Folder(collection, recover_after=3600, dead_owner_grace=0.5).run,
                              args=(stopping,))
    folder.start()
    retry = threading.Thread(target=writer.write, args=([dict(document) for document in documents],))
    retry.start()
    retry.join(60)
    stopping.set()
    folder.join(30)
    assert not retry.is_alive(), "the retry still waits for the recovery of the batch given up"
    start, end = BASE - timedelta(hours=1), BASE + timedelta(hours=1)
    assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end) == [8, 7, 7, 7, 7, 7, 7]


def test_a_late_finding_of_the_recovery_thread_is_not_recorded_twice(database):
    """The raw read of a recovery runs beside the rounds, for minutes on FerretDB: by the time it
    ends, the batch may have been recovered and folded already (by an earlier read, or another
    folder). Its finding must then be dropped, not recorded again."""
    collection = database["status"]
    documents = [{"_id": f"m{index}", "status": index % 7, "timestamp": BASE + timedelta(seconds=index)}
                 for index in range(30)]

    def crash_after_raw_insert(point, detail=None):
        if point == "after-raw-insert":
            raise Crash()

    with pytest.raises(Crash):
        counts.BatchWriter(collection, fault_hook=crash_after_raw_insert).write(documents)
    batch = next(d["_id"][2:] for d in database["status_counts_intents"].find())
    folder = counts.Folder(collection, recover_after=0)
    late = folder._find_stamped([batch])  # a read that will end late
    assert len(late[batch]) == 30
    for _ in range(3):  # reads again and records; then folds and deletes the record and its intent
        folder.fold_once()
    assert database["status_counts_intents"].count_documents({}) == database["status_counts_log"].count_documents(
        {"_id": f"c:{batch}"}) == 0
    counts.BatchWriter(collection).write([{"_id": "later", "status": 6, "timestamp": BASE}])
    for _ in range(2):  # a round after the one that folded the recovered record
        folder.fold_once()
    folder._add_found(late)  # the late read hands its finding in now
    while folder.fold_once():
        pass
    start, end = BASE - timedelta(hours=1), BASE + timedelta(hours=1)
    assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end) == [5, 5, 4, 4, 4, 4, 5]


class ReadThenLand:
    """A collection whose first whole read (find({})) is followed, once it has returned, by `land`:
    writes of another process that reach the store between a folder's two reads."""

    def __init__(self, collection, land):
        self._collection, self._land = collection, land

    def find(self, query=None, *args, **kwargs):
        found = list(self._collection.find(query, *args, **kwargs))
        if query == {} and self._land:
            land, self._land = self._land, None
            land()
        return found

    def __getattr__(self, name):
        return getattr(self._collection, name)


def test_a_folded_batch_is_not_recovered_again_when_late_deletes_land_between_the_two_reads(database):
    """A folder that folded a batch may lose its lease while its deletes (the intent, then the
    record) are still on their way, and they may land between the next folder's read of the log
    and its read of the intents. A finding of that batch's recovery, handed in then, must not be
    recorded again: the batch would be counted twice."""
    collection = database["status"]
    documents = [{"_id": f"m{index}", "status": index % 7, "timestamp": BASE + timedelta(seconds=index)}
                 for index in range(21)]
    counts.BatchWriter(collection).write(documents)
    intent = database["status_counts_intents"].find_one()
    record = database["status_counts_log"].find_one({"_id": {"$regex": "^c:"}})
    batch = record["_id"][2:]
    folder = counts.Folder(collection, recover_after=0)
    wait_until(folder.fold_once, what="the round that folds the batch")
    # as if that round's deletes had not landed yet: they land between the next round's two reads
    database["status_counts_intents"].insert_one(intent)
    database["status_counts_log"].insert_one(record)

    def deletes_land():
        database["status_counts_intents"].delete_one({"_id": intent["_id"]})
        database["status_counts_log"].delete_one({"_id": record["_id"]})

    # another batch, so that the next round is a new one: a record recovered beside it would be folded again later
    counts.BatchWriter(collection).write([{"_id": f"later{status}", "status": status, "timestamp": BASE}
                                          for status in range(7)])
    # both: the deletes land after whichever of the two is read first, so the test fails for either wrong order
    folder._log = ReadThenLand(folder._log, deletes_land)
    folder._intents = ReadThenLand(folder._intents, deletes_land)
    folder._add_found({batch: sorted((counts.epoch_ms(d["timestamp"]), d["status"]) for d in documents)})
    while folder.fold_once():
        pass
    start, end = BASE - timedelta(hours=1), BASE + timedelta(hours=1)
    assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end) == [4] * 7


class CommandLog(monitoring.CommandListener):
    def __init__(self):
        self.commands = []

    def started(self, event):
        collection = event.command.get(event.command_name)
        self.commands.append((event.command_name, collection if isinstance(collection, str) else None,
                              event.database_name))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


READS = {"find", "aggregate", "count", "distinct", "getMore", "findAndModify", "update", "delete"}


def test_no_count_and_no_steady_state_write_reads_the_raw_collection(database):
    """Every command of the writer's batches, the folder's rounds and the reader's answers,
    recorded by pymongo's command monitoring: none reads the raw collection."""
    log = CommandLog()
    client = pymongo.MongoClient(MONGO_URI, tz_aware=True, event_listeners=[log])
    try:
        collection = client[database.name]["status"]
        writer, folder = counts.BatchWriter(collection), counts.Folder(collection)
        rng = random.Random(3)
        for batch in range(5):
            writer.write([{"_id": f"m{batch}-{index}", "status": rng.randrange(7),
                           "timestamp": BASE + timedelta(milliseconds=rng.randrange(-WINDOW_MS, WINDOW_MS))}
                          for index in range(100)])
            folder.fold_once()
        bounds = [(BASE - timedelta(days=40), BASE + timedelta(days=40)),
                  (BASE - timedelta(hours=1, milliseconds=-7), BASE + timedelta(seconds=3.5)),
                  (BASE + timedelta(milliseconds=100), BASE + timedelta(milliseconds=900)),
                  (BASE - timedelta(days=1, microseconds=1), BASE + timedelta(days=1, microseconds=999)),
                  (BASE + timedelta(days=300), BASE + timedelta(days=301))]
        del log.commands[:]
        for start, end in bounds:
            counts.count(collection, start, end)
        reader_commands = list(log.commands)
        assert [c for c in log.commands if c[1] == "status" and c[0] in READS] == []
        assert [c for c in log.commands if c[1] == "status_counts_intents"] == []  # readers need no intent
        assert len(reader_commands) <= 30 * len(bounds)
    finally:
        client.close()
    assert [c for c in reader_commands if c[0] not in ("find",)] == []


def test_a_thirty_day_count_reads_a_few_small_documents(database):
    """Once folded, a 30-day count with bounds inside seconds looks up about a dozen documents by _id;
    the whole minutes of each bound's hour come from the seconds document read for the bound, not
    from the hour document."""
    log = CommandLog()
    client = pymongo.MongoClient(MONGO_URI, tz_aware=True, event_listeners=[log])
    try:
        collection = client[database.name]["status"]
        documents = [{"_id": f"m{i}", "status": i % 7, "timestamp": BASE - timedelta(seconds=37 * i, milliseconds=i % 1000)}
                     for i in range(5000)]
        counts.BatchWriter(collection).write(documents)
        counts.Folder(collection).fold_once()
        start, end = BASE - timedelta(days=30, seconds=-7, milliseconds=250), BASE - timedelta(seconds=37, milliseconds=500)
        del log.commands[:]
        answer = counts.count(collection, start, end)
        commands = list(log.commands)
        assert answer == counts.raw_counts(collection, start, end)
    finally:
        client.close()
    assert len(commands) <= 14, commands
    hour_documents = [name for _, name, _ in commands if re.fullmatch(r"status_counts_\d{8}", name or "")]
    assert hour_documents == []
    # the millisecond detail of the end's second (23:59:22, which holds a message) from the
    # collection of its six hours; a day's detail is kept in four
    assert {name for _, name, _ in commands if "_ms" in (name or "")} == {"status_counts_20261212_ms18"}
    assert {name for name in database.list_collection_names() if name.startswith("status_counts_20261212_ms")} == {
        f"status_counts_20261212_ms{hour:02d}" for hour in (0, 6, 12, 18)}


class FolderLosingLease(counts.Folder):
    """A folder whose round finds its lease lost at the `check`th check, and which keeps the lease
    for the next round (the same process, its slot renewed in time)."""

    def __init__(self, collection, check):
        super().__init__(collection)
        self._checks_left = check

    def _renewing(self):
        self._checks_left -= 1
        return self._checks_left != 0 and super()._renewing()


@pytest.mark.parametrize("check", [1, 2, 3, 4])
def test_a_round_cut_short_and_finished_by_the_same_folder_is_exact(database, check):
    """Cut before the first aggregate of a round is written, or between two: what the folder
    remembers of the round cut short must not pass for written."""
    collection = database["status"]
    writer = counts.BatchWriter(collection)
    moments = [BASE + timedelta(seconds=seconds) for seconds in (1.5, 2.5, 3600 * 30 + 7.25, 86400 * 3 + 61.5)]
    writer.write([{"_id": f"a{i}", "status": i % 7, "timestamp": moment} for i, moment in enumerate(moments)])
    folder = FolderLosingLease(collection, check=0)
    wait_until(folder.fold_once, what="the first round")
    writer.write([{"_id": f"b{i}", "status": (i + 3) % 7, "timestamp": moment + timedelta(milliseconds=250)}
                  for i, moment in enumerate(moments)])
    folder._checks_left = check
    assert folder.fold_once() is False  # cut short
    wait_until(folder.fold_once, what="the round finished by the same folder")
    writer.write([{"_id": "c", "status": 6, "timestamp": moments[0] + timedelta(milliseconds=1)}])
    wait_until(folder.fold_once, what="a round over the same minute")
    for start, end in [(BASE, BASE + timedelta(days=4)), (BASE + timedelta(seconds=1), BASE + timedelta(seconds=4)),
                       (moments[2] - timedelta(milliseconds=1), moments[2] + timedelta(seconds=1)),
                       (moments[3], moments[3] + timedelta(milliseconds=251))]:
        assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end), (start, end)


@pytest.mark.parametrize("whole_hours_up_to, piece_entries, max_pieces",
                         [(10**6, 10**6, 20), (50, 50, 20), (10**6, 7, 20), (10**6, 7, 3)],
                         ids=["whole hour merged", "busy hour: crowded seconds", "whole hour in small pieces",
                              "whole hour in at most 3 pieces"])
def test_seconds_spread_over_many_rounds_are_merged_into_a_few_pieces_and_stay_exact(
        database, monkeypatch, whole_hours_up_to, piece_entries, max_pieces):
    """Rounds that each touch the same ten seconds (and another second of the hour): their
    detail is merged so that no second is named in more than MAX_FRAGMENTS_PER_SECOND fragments,
    into pieces of at most MAX_COMPACTED_ENTRIES messages, or MAX_PIECES if that makes more (so
    a busy hour names a few pieces, not one per second), the fragments no second names any more
    are deleted, and every bound inside those seconds stays exact."""
    monkeypatch.setattr(counts, "MAX_WHOLE_HOUR_ENTRIES", whole_hours_up_to)
    monkeypatch.setattr(counts, "MAX_COMPACTED_ENTRIES", piece_entries)
    monkeypatch.setattr(counts, "MAX_PIECES", max_pieces)
    collection = database["status"]
    writer, folder = counts.BatchWriter(collection), counts.Folder(collection)
    hour = counts.epoch_seconds(BASE) // counts.HOUR
    fragments = counts._fragments_home(collection, hour)
    for number in range(3 * (counts.MAX_FRAGMENTS_PER_SECOND + 1)):
        writer.write([{"_id": f"m{number}-{index}", "status": (number + index) % 7,
                       "timestamp": BASE + timedelta(milliseconds=index * 250 + number)} for index in range(40)]
                     + [{"_id": f"o{number}", "status": number % 7, "timestamp": BASE + timedelta(seconds=60 + number)}])
        wait_until(folder.fold_once, what=f"round {number}")
        for low_ms in range(0, 10_500, 97):
            start, end = BASE + timedelta(milliseconds=low_ms), BASE + timedelta(milliseconds=low_ms + 333)
            assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end), (number, low_ms)
        document = counts._seconds_home(collection, hour).find_one({"_id": f"seconds:{hour}"})
        named = {offset: tags for offset, (_, tags) in counts._hour_seconds(document).items()}
        assert max(map(len, named.values())) <= counts.MAX_FRAGMENTS_PER_SECOND
        pieces = {tag for offset in range(10) for tag in named[offset]}  # the ten seconds every round touches
        assert len(pieces) <= 40 * (number + 1) // piece_entries + 1 + counts.MAX_FRAGMENTS_PER_SECOND
        if whole_hours_up_to == 10**6:  # the whole hour's pieces are those of its last merge
            assert len({tag for tags in named.values() for tag in tags if "c" in tag}) <= max_pieces
    named_tags = {tag for tags in named.values() for tag in tags}
    writer.write([{"_id": "later", "status": 1, "timestamp": BASE + timedelta(hours=2)}])
    wait_until(folder.fold_once, what="a round that deletes what the last merge superseded")
    kept = {document["_id"] for document in fragments.find({}, {"_id": 1}) if document["_id"].startswith(f"f:{hour}:")}
    assert kept == {f"f:{hour}:{tag}" for tag in named_tags}


def messages(rng, prefix, number):
    return [{"_id": f"{prefix}{index}", "status": rng.randrange(7),
             "timestamp": BASE + timedelta(milliseconds=rng.randrange(-WINDOW_MS, WINDOW_MS))}
            for index in range(number)]


def test_a_record_is_decoded_once_per_process_and_again_if_its_entries_differ(database, monkeypatch):
    """A record never changes once inserted, so a reader decodes each once (at 1,000 msg/s a read
    meets a hundred of them); one whose entries differ under the same _id (a log begun again) is
    decoded anew, and one folded away is forgotten."""
    collection = database["status"]
    counts.BatchWriter(collection).write(messages(random.Random(8), "a", 30))
    start, end = BASE - timedelta(days=3), BASE + timedelta(days=3)
    decoded, decode = [], counts._decode_entries
    monkeypatch.setattr(counts, "_decode_entries", lambda text: decoded.append(text) or decode(text))
    for _ in range(3):
        assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end)
    assert len(decoded) == 1
    log = database["status_counts_log"]
    record = log.find_one({"_id": {"$regex": "^c:"}})
    log.replace_one({"_id": record["_id"]}, {"entries": counts._encode_entries([(counts.epoch_ms(BASE), 3)])})
    assert counts.count(collection, start, end) == [0, 0, 0, 1, 0, 0, 0]
    assert len(decoded) == 2
    log.delete_one({"_id": record["_id"]})
    assert counts.count(collection, start, end) == [0] * counts.STATUSES
    assert record["_id"] not in counts._DECODED_RECORDS[log.full_name]


def test_messages_stored_without_counts_are_refused_until_rebuilt(database, caplog):
    """Messages an earlier version stored without keeping counts (before batches were recorded):
    readers, folders and writers refuse them, naming the command; `rebuild` counts them all."""
    collection = database["status"]
    rng = random.Random(5)
    collection.insert_many(messages(rng, "unstamped", 50))
    with pytest.raises(counts.OldLayout, match="never kept.*--rebuild-counts"):
        counts.count(collection, BASE, BASE + timedelta(days=1))
    with pytest.raises(counts.OldLayout, match="--rebuild-counts"):
        counts.BatchWriter(collection).write(messages(rng, "a", 10))
    assert counts.Folder(collection).fold_once() is False
    assert "--rebuild-counts" in caplog.text
    database["status_counts_log"].delete_many({"_id": {"$regex": "^lease:"}})  # that server stopped a while ago
    assert counts.rebuild(collection, chunk=16) == 50
    counts.BatchWriter(collection).write(messages(rng, "b", 20))  # counted from its record until folded
    for start, end in [(BASE - timedelta(days=3), BASE + timedelta(days=3)), (moment(-86_399_999), moment(7_777)),
                       (moment(-61_000), moment(59_001)), (moment(1), moment(999))]:
        assert counts.count(collection, start, end) == counts.raw_counts(collection, start, end)


@pytest.mark.parametrize("stored", ["stored and folded", "stored"])
def test_a_marker_written_between_two_looks_is_taken(database, monkeypatch, stored):
    """A reader that looks for the marker of a new store just before a server.py marks it, and
    then finds the state or a stored message the server.py wrote since, takes the marker."""
    collection = database["status"]
    counts.BatchWriter(collection).write([{"_id": "m", "status": 3, "timestamp": BASE}])
    if stored == "stored and folded":
        wait_until(counts.Folder(collection).fold_once, what="a round")
    real = counts._collections
    looks = []

    class FirstLookMissesTheMarker:
        def __init__(self, aggregates):
            self._aggregates = aggregates

        def find_one(self, query, *args, **kwargs):
            looks.append(query)
            if len(looks) == 1:
                return None  # as before the server.py marked the store
            return self._aggregates.find_one(query, *args, **kwargs)

    monkeypatch.setattr(counts, "_collections", lambda c: (real(c)[0], FirstLookMissesTheMarker(real(c)[1])))
    counts.check_layout(collection)
    assert looks == [{"_id": "layout"}, {"_id": "layout"}]


@pytest.mark.parametrize("earlier", ["layout 1, before the marker", "another layout"])
def test_counts_of_an_earlier_layout_are_refused_until_rebuilt(database, earlier):
    collection = database["status"]
    rng = random.Random(6)
    counts.BatchWriter(collection).write(messages(rng, "a", 100))
    wait_until(counts.Folder(collection).fold_once, what="a round")
    assert database["status_counts"].find_one({"_id": "layout"})["version"] == counts.LAYOUT
    if earlier == "another layout":
        database["status_counts"].replace_one({"_id": "layout"}, {"version": counts.LAYOUT + 1})
        version = counts.LAYOUT + 1
    else:
        database["status_counts"].delete_one({"_id": "layout"})  # as the version before the marker left them
        version = 1
    for check in (counts.check_layout, counts.mark_layout, lambda c: counts.count(c, BASE, BASE + timedelta(days=1))):
        with pytest.raises(counts.OldLayout, match=f"layout {version}, not {counts.LAYOUT}.*--rebuild-counts"):
            check(collection)
    database["status_counts_log"].delete_many({"_id": {"$regex": "^lease:"}})
    assert counts.rebuild(collection) == 100
    assert database["status_counts"].find_one({"_id": "layout"}) == {"_id": "layout", "version": counts.LAYOUT}
    assert counts.count(collection, BASE - timedelta(days=3), BASE + timedelta(days=3)) == \
        counts.raw_counts(collection, BASE - timedelta(days=3), BASE + timedelta(days=3))


def test_a_rebuild_is_refused_while_a_server_folds(database):
    collection = database["status"]
    counts.BatchWriter(collection).write([{"_id": "m", "status": 3, "timestamp": BASE}])
    folder = counts.Folder(collection)
    wait_until(folder.fold_once, what="a round")
    with pytest.raises(counts.OldLayout, match="stop every server.py"):
        counts.rebuild(collection, wait_seconds=0)
    counts.check_layout(collection)  # untouched


def test_an_interrupted_rebuild_is_refused_until_run_again(database):
    collection = database["status"]
    counts.BatchWriter(collection).write([{"_id": "m", "status": 3, "timestamp": BASE}])
    database["status_counts"].replace_one({"_id": "layout"}, {"version": counts.LAYOUT, "rebuilding": True}, upsert=True)
    with pytest.raises(counts.OldLayout, match="being rebuilt"):
        counts.check_layout(collection)
    assert counts.rebuild(collection) == 1
    assert counts.count(collection, BASE, BASE + timedelta(seconds=1)) == [0, 0, 0, 1, 0, 0, 0]


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
    lambda naive: naive.replace(tzinfo=timezone.utc)))
def test_epoch_seconds_is_the_exact_second(moment):
    exact = (moment - counts.EPOCH) // timedelta(seconds=1)
    assert counts.epoch_seconds(moment) == exact
    last_microsecond = moment.replace(microsecond=999_999)  # where a rounded float would carry into the next second
    assert counts.epoch_seconds(last_microsecond) == exact
    assert counts.epoch_seconds(moment.replace(tzinfo=None)) == exact
    assert counts.epoch_ms(moment) == (moment - counts.EPOCH) // timedelta(milliseconds=1)


@pytest.mark.parametrize("seconds", [2**33 - 1, 2**33, -(2**33), -(2**33) + 1, 2**37, -1, 0])
def test_epoch_seconds_at_the_float_bound(seconds):
    for microsecond in (0, 1, 999_999):
        moment = counts.EPOCH + timedelta(seconds=seconds, microseconds=microsecond)
        assert counts.epoch_seconds(moment) == seconds


@given(st.lists(st.tuples(st.integers(-(10**13), 10**13), st.integers(0, 6)), max_size=50))
def test_entries_encode_and_decode(entries):
    entries = sorted(entries)
    times, statuses = counts._decode_entries(counts._encode_entries(entries))
    assert list(zip(times, statuses)) == entries


@given(st.dictionaries(st.integers(0, 3599), st.lists(st.integers(0, 10**6), min_size=7, max_size=7), max_size=40),
       st.integers(0, 3600), st.integers(0, 3600))
def test_parts_encode_decode_and_sum_any_run(parts, first, last):
    text = counts._encode_parts(parts)
    assert counts._decode_parts(text) == parts
    expected = [sum(parts[offset][status] for offset in parts if first <= offset < last) for status in range(7)]
    assert counts._sum_parts(counts._split_parts(text), first, last) == expected


TAGS = st.lists(st.from_regex(r"[0-9]{1,6}(c[0-9]{1,3})?", fullmatch=True), max_size=4)
COUNTS = st.one_of(st.lists(st.integers(0, 3), min_size=7, max_size=7),  # around DIGITS_UP_TO
                   st.lists(st.integers(0, 10**6), min_size=7, max_size=7))


@given(st.dictionaries(st.integers(0, 3599), st.tuples(COUNTS, TAGS), max_size=60), st.integers(0, 3599))
@example({660: ([0, 1, 0, 0, 0, 0, 0], ["7"]), 60: ([2, 0, 0, 0, 0, 0, 1], ["5", "45c0"]),
          1260: ([0, 0, 0, 0, 0, 0, 9], ["9"])}, 60)  # minutes 1, 11 and 21: a key that ends another
@example({7: ([0, 0, 0, 0, 0, 0, 0], []), 8: ([12, 0, 0, 0, 0, 0, 0], ["3", "2"]), 9: ([13, 0, 0, 0, 0, 0, 0], ["2"]),
          10: ([0, 0, 0, 10, 0, 0, 0], ["2", "3"])}, 8)  # as digits up to 12 messages, as counts from 13
def test_an_hours_seconds_encode_decode_and_each_minute_is_found_alone(seconds, offset):
    """A seconds document as _merge_seconds writes it: every second's counts and tags come back,
    and the block of one minute is found alone."""
    by_minute = {}
    for second, (counts_, tags) in seconds.items():
        by_minute.setdefault(second // 60, {})[second] = [counts_, tags]
    document = {"seconds": counts._join_minutes({minute: counts._encode_minute(block)
                                                 for minute, block in by_minute.items()})}
    assert counts._hour_seconds(document) == {second: [c, t] for second, (c, t) in seconds.items()}
    for second in (*seconds, offset):
        assert counts._minute_of(dict(document), second) == by_minute.get(second // 60, {})
