"""Exact status counts, kept up as messages are stored, whose reads do not grow with the data.

Three roles, one per class:
- `BatchWriter` (server.py's writer threads) stores a batch of messages and records the
  counts of the documents that batch created, using inserts only;
- `Folder` (one per database at a time, in server.py) folds those records into small
  per-hour (counts per second, and per minute), per-day, per-32-day and overall documents;
- `count` (api.py) answers [start, end) from those documents plus the records not yet
  folded, reading a dozen small documents by _id and never the raw collection.

Layout, for raw collection `status` (`<c>` below); the number of collections is fixed
but for six per day of data:
- `<c>_counts_intents`: per batch an intent `{_id: "i:<batch>", owner[, abandoned]}`, inserted
  before the raw insert. Apart from the log, which every count reads whole: on FerretDB each
  document a query returns costs about 50 µs, and readers need no intent.
- `<c>_counts_log`: per batch a record `{_id: "c:<batch>", entries}` of the documents the batch
  created (their millisecond times and statuses), inserted after the raw insert; `{_id: "state",
  round, records}`, the folder's current round; `lease:<slot>` documents that elect the
  one folder. Both small: the folder deletes what it has folded.
- `<c>_counts`: `{_id: "layout", version}` (LAYOUT, written by server.py before it stores
  anything), and a document per day (counts per hour), per 32-day span (counts per day) and
  `all` (counts per span), each `{_id, round, parts}`.
- `<c>_counts_<YYYYMMDD>`: a document per hour of that day, `{_id: "hour:<hour>", round,
  parts}`, counts per minute: small, so that a series by minute, which reads every hour of a
  day in one query (one decoding pass of the collection on FerretDB), reads little.
- `<c>_counts_<YYYYMMDD>_s`: a document per hour of that day, `{_id: "seconds:<hour>", round,
  seconds, minutes}`: per minute a block of counts per second with, per second, the tags of the
  fragments that hold its millisecond detail (a sparse second as its statuses, a minute's tags
  written once, see _encode_minute). A minute is the level-0 bucket; a round rewrites
  only the blocks of the minutes it touches, and a reader decodes only those of its bounds.
  `minutes` repeats the hour document's counts per minute (2 KB at 13,889 an hour), so that a
  count whose bound falls in this hour reads its whole minutes here too, not in the hour document.
- `<c>_counts_<YYYYMMDD>_ms<HH>`: the fragments `{_id: "f:<hour>:<tag>", entries}` of the
  FRAGMENT_HOURS from hour HH of that day: each
  round's millisecond times and statuses within one hour, grouped by second (tag: the
  round). Once a second is spread over more than MAX_FRAGMENTS_PER_SECOND, all of its hour's
  are merged (in an hour of over MAX_WHOLE_HOUR_ENTRIES, those of its crowded seconds), into
  pieces of MAX_COMPACTED_ENTRIES, or MAX_PIECES (tag: "<round>c<piece>"). Read only for a bound
  inside a second; FerretDB reads this collection up to the match (about 2 ns a byte).
Every raw document carries `batch`, the id of the batch that inserted it. Stored messages
without counts (an earlier version's), or counts in another layout, are refused by server.py,
readers and folders alike, until `rebuild` has kept them again from the raw documents.

The store is FerretDB 1.24 by default: it answers a lookup of one string _id from SQL,
reading its table up to the match (all of it when absent); every other filter decodes
every document of the collection; it has no transactions and no lock between an update's
read and its write, and one update command holds a connection of a 100-connection pool for
each of its statements until the command ends (several concurrent multi-statement updates
deadlock the database for good). Hence: the only atomic step used is an insert's unique _id;
writers only insert; one folder writes aggregates, one single-statement update at a time;
readers look documents up by _id in small collections.

Why every answer is exact once the batches in flight are acknowledged:
1. Records. A batch inserts its intent, then its raw documents stamped with its id, then
   its record, listing exactly the documents the unordered insert reported as new; only
   then is it acknowledged. Each raw document is created by one insert, so it is in at
   most one record. A batch that dies between intent and record leaves an open intent: the
   folder closes it with a record of the raw documents stamped with its id (a read of the
   raw collection: rare, and off the request and ingest paths), once the intent has been
   open for RECOVER_AFTER_SECONDS, or for DEAD_OWNER_GRACE_SECONDS after its owner is
   seen gone on this machine or names it given up in a later intent (a write a dead
   process sent, or one its writer stopped waiting for, may still be landing). A
   record's _id is unique, so of a late owner and the folder only one record lands. A
   batch that met duplicates (documents some earlier batch created) waits, before it is
   acknowledged, until every intent open at that moment is closed: the batch that created
   them has then its record. So an acknowledged document is in exactly one record (the
   assumption: a raw insert has ended on the store by the time its intent is recovered).
2. Rounds. The folder folds the records present at the start of round n: it first writes
   the state {round: n, records}, then adds those records into every aggregate they touch
   that is stamped with a round below n, stamping it n (fragments first), and then deletes
   their intents and them. A round cut short is finished with the same records by the next
   folder, since the state names them and the stamps tell what is done. So an aggregate
   stamped r holds exactly the records of rounds up to r that touch it, and a record still
   in the log is in no aggregate unless its round is the state's current one.
3. Reads. A reader reads the log (state and records in one query), then the aggregates it
   needs. Each piece of the range is answered by one aggregate X (whole minutes of an hour by
   its seconds document when a bound falls in that hour, whose `minutes` are written with its
   seconds, in one write) and by the logged records that X does not hold yet: those not in
   the state's round, or in it while X's round is below it. A record folded and deleted
   before the log was read is in X (X is read after it). A round that began after the log
   was read can only make this wrong by having written X first, which X's round then shows,
   or by having deleted a fragment X names; the reader starts over in either case.
4. Leases. One folder at a time holds the lease of a time slot, claimed with a unique
   insert, and writes only within the slot it holds; one that takes over from another,
   or whose write failed, first waits out QUIET_SECONDS, the deadline of any write still
   in flight; and none claims a slot below one already claimed (the assumption: clocks
   agree to within a second).
5. Rebuild. With no writer running (it waits out the last folder's lease), it marks the
   layout "rebuilding" (readers, folders and server.py refuse), drops the intents, the log and
   every aggregate, records every raw document once, folds them, and only then marks the layout
   done: an interrupted rebuild stays refused until run again.
Counts are never incremented in place, so no increment can be lost.
"""

import array
import bisect
import collections
import concurrent.futures
import contextvars
import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import bson
import pymongo
from bson.errors import InvalidDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

import messages

LOG = logging.getLogger("counts")

STATUSES = len(messages.STATUSES)  # counts are lists indexed by status
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MINUTE, HOUR, DAY, SPAN = 60, 3600, 86400, 32 * 86400  # seconds; each divides the next
LEVELS = (MINUTE, HOUR, DAY, SPAN)  # aggregate levels below `all`; a level's parts are buckets of the level below
MINUTES_AN_HOUR = HOUR // MINUTE  # a level-0 bucket is a minute; its hour's seconds document holds them all
# The hours of millisecond detail one collection holds (it divides a day). FerretDB finds a fragment
# by reading its collection up to the match, parsing every document on the way (about 2 ns a byte):
# a day's detail at the density of 10,000,000 a month is 2 to 3 MB, and the newest fragments, which
# a range ending at now asks for, come last; so do the fragments a merge reads, one lookup each.
# A quarter of a day reads a quarter of that, for 4 collections a day instead of 1.
FRAGMENT_HOURS = 6
# The layout below, marked in `<c>_counts`. Layout 1 (also a store with a state but no marker)
# kept an hour's counts per second, fragment tags and all, in one document, rewritten whole;
# layout 2 wrote each second's 7 counts and its tags in full (2.7 times the bytes at 4 a second);
# layout 3 kept an hour's counts per minute in its hour document only; layout 4 kept the intents
# in the log and a day's millisecond detail in one collection.
LAYOUT = 5
LAYOUT_RECHECK_SECONDS = 5  # a reader checks the layout again after this; a rebuild waits it out
TOP = len(LEVELS)
# timestamp() is the exact count of microseconds divided by 10**6, correctly rounded. While
# a float's spacing is at most 1 µs (below 2**33 s, years 1698..2242) that rounding cannot
# carry a time across a whole second, so its floor is the second.
FLOAT_EXACT_SECONDS = 2**33
DUPLICATE_KEY = 11000
MAX_BSON_BYTES = 16 * 1024 * 1024  # MongoDB's limit on one document
RECOVER_AFTER_SECONDS = 120  # an intent open this long is recovered even if its owner may live
DEAD_OWNER_GRACE_SECONDS = 15  # after its owner died: a write it sent may still be landing
LEASE_SECONDS = 10
FOLD_INTERVAL_SECONDS = 0.5
# A second whose detail is spread over more fragments than this has its hour's fragments
# merged into one, so that a bound inside a second costs a few lookups at most.
MAX_FRAGMENTS_PER_SECOND = 4
READ_ATTEMPTS = 20
LOG_BATCH = 10_000  # the log in one reply: FerretDB's first batch is 101 documents, and a getMore is a round trip
STEP_SECONDS = 30  # the folder's deadline for one store operation; recovery reads the raw collection:
RECOVERY_SECONDS = 3600  # minutes for tens of millions of documents on FerretDB
# A folder that takes over waits until every write of the one before it has ended (STEP_SECONDS),
# and so does a folder after a failed write: a write a client gave up on may still land.
QUIET_SECONDS = STEP_SECONDS + 2
LEASE_WINDOW = QUIET_SECONDS // LEASE_SECONDS + 2  # slots back in which a folder before may still write
# The aggregates a folder keeps after writing them: a day of backfill touches about 50 (the
# seconds and the counts of each hour), which must not be read again each round.
CACHED = 128
# A round writes every hour it touches again, so a backlog spread over days folds in as few
# rounds as memory allows (8 bytes a message while folding); the fragment of one hour written by
# one round then holds 2,000,000 entries at most, about 12 MB, below MongoDB's 16 MiB.
MAX_ROUND_ENTRIES = 2_000_000
MAX_RECORDS_PER_ROUND = 2_000  # the state names them: about 40 KB
MAX_WHOLE_HOUR_ENTRIES = 1_000_000  # an hour merged whole at most (7 MB read); a busier one's crowded seconds only
# A merged piece: up to about 25 KB. A bound inside a second reads its second's piece whole, which
# FerretDB decodes at about 28 ns a byte (besides reading its collection up to the match, about
# 2 ns a byte): with pieces of 50,000 (250 KB) the fragments a count read took 10.5 ms on average
# under 1,000 msg/s, with these 5.9 ms; one of 1,000,000 took 160 ms. But merging an hour again
# reads each of its pieces with a lookup of its own, so a merge makes no more than MAX_PIECES.
MAX_COMPACTED_ENTRIES = 5_000
MAX_PIECES = 20
WAIT_FOR_RECOVERY_SECONDS = 10 * RECOVER_AFTER_SECONDS


def epoch_seconds(moment):
    """The whole second a datetime falls in (naive means UTC), as seconds since 1970."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = moment.timestamp()  # four times faster than the exact form below, which the server pays per message
    if -FLOAT_EXACT_SECONDS < seconds < FLOAT_EXACT_SECONDS:
        return math.floor(seconds)
    return (moment - EPOCH) // timedelta(seconds=1)


def epoch_ms(moment):
    """The millisecond a datetime is stored as (BSON keeps milliseconds, dropping finer digits)."""
    return epoch_seconds(moment) * 1000 + moment.microsecond // 1000


def _collections(collection):
    database, name = collection.database, collection.name
    return database[f"{name}_counts_log"], database[f"{name}_counts"]


def _intents(collection):
    return collection.database[f"{collection.name}_counts_intents"]


def _hours_home(collection, hour):
    day = EPOCH + timedelta(hours=hour)
    return collection.database[f"{collection.name}_counts_{day.year:04d}{day.month:02d}{day.day:02d}"]


def _seconds_home(collection, hour):
    return collection.database[f"{_hours_home(collection, hour).name}_s"]


def _fragments_home(collection, hour):
    first_hour = hour % (DAY // HOUR) // FRAGMENT_HOURS * FRAGMENT_HOURS
    return collection.database[f"{_hours_home(collection, hour).name}_ms{first_hour:02d}"]


def _aggregate_id(level, bucket):
    """A level-0 bucket is a minute, kept in the seconds document of its hour with the others."""
    if level == 0:
        return f"seconds:{bucket // MINUTES_AN_HOUR}"
    return f"{('hour', 'day', 'span')[level - 1]}:{bucket}" if level < TOP else "all"


def _home(collection, level, bucket):
    if level == 0:
        return _seconds_home(collection, bucket // MINUTES_AN_HOUR)
    return _hours_home(collection, bucket) if level == 1 else _collections(collection)[1]


# Lookups run side by side: each waits on the store, and FerretDB answers them on several connections.
SEPARATE_LOOKUPS = 3
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="counts-lookup")


def _look_up(wanted, separate=SEPARATE_LOOKUPS):
    """{(collection name, _id): document} of those found among [(collection, _id)], all looked
    up at once (within the caller's pymongo.timeout): on FerretDB one _id is answered from SQL,
    which stops at the match, while several ($in) cost a decoding pass over the whole
    collection (3 to 5 times as long for two hours of a day). So up to `separate` _ids of one
    collection get a query each, and more one query together."""
    by_home = collections.defaultdict(dict)
    for home, _id in wanted:
        by_home[home.name][_id] = home
    queries = []
    for name, ids in by_home.items():
        home = next(iter(ids.values()))
        if len(ids) > separate:
            queries.append((home, {"_id": {"$in": list(ids)}}, 0))
        else:
            queries += [(home, {"_id": _id}, 1) for _id in ids]  # limit 1: the scan stops at the match

    def run(home, query, limit):
        return list(home.find(query, limit=limit))
    if len(queries) == 1:
        answers = [run(*queries[0])]
    else:
        answers = [future.result() for future in [
            _LOOKUPS.submit(contextvars.copy_context().run, run, *query) for query in queries]]
    return {(home.name, document["_id"]): document
            for (home, _, _), documents in zip(queries, answers) for document in documents}


class OldLayout(Exception):
    """The counts of a collection are kept in another layout, were never kept for the messages an
    earlier version stored, or are being rebuilt: `python server.py --rebuild-counts` keeps them
    again from the raw documents."""


def check_layout(collection):
    """Raise OldLayout unless the counts of `collection` are in LAYOUT, or there are neither counts
    nor stored messages yet. Raises PyMongoError when the store does not answer."""
    log, aggregates = _collections(collection)
    layout = aggregates.find_one({"_id": "layout"})
    if layout is None:
        if log.find_one({"_id": "state"}, {"_id": 1}) is not None:
            layout = {"version": 1}  # kept by the version before the marker, in layout 1
        elif collection.find_one({}, {"_id": 1}) is None:
            return  # nothing stored yet
        # A server.py that marked the layout after the first look may have stored and folded
        # since: the marker, written before anything is stored and never removed, settles it.
        layout = aggregates.find_one({"_id": "layout"}) or layout
        if layout is None:
            raise OldLayout(f"{collection.full_name} holds messages whose counts were never kept (an earlier "
                            f"version stored them): stop server.py and run `python server.py --rebuild-counts` to "
                            f"count them")
    if layout.get("version") != LAYOUT:
        raise OldLayout(f"the counts of {collection.full_name} were kept in layout {layout.get('version')}, not "
                        f"{LAYOUT}: stop server.py and run `python server.py --rebuild-counts` to keep them again")
    if layout.get("rebuilding"):
        raise OldLayout(f"the counts of {collection.full_name} are being rebuilt from the stored messages "
                        f"(`python server.py --rebuild-counts`, which can be run again if it was interrupted)")


def mark_layout(collection):
    """check_layout(), then mark the layout for a server.py about to store messages."""
    check_layout(collection)
    try:
        _collections(collection)[1].insert_one({"_id": "layout", "version": LAYOUT})
    except DuplicateKeyError:
        pass  # marked already


def rebuild(collection, chunk=50_000, wait_seconds=2 * LEASE_SECONDS + QUIET_SECONDS):
    """Keep the counts of `collection` again, from its raw documents; returns how many it counted.

    For a store that OldLayout names (counts never kept for messages an earlier version stored,
    or kept in another layout). Run it while no server.py writes
    to this collection: it drops the counts and reads every raw document (minutes for millions on
    FerretDB, and a list of two ints per document in memory); if interrupted, run it again.
    Readers get OldLayout until it has recorded and folded them all. Raises OldLayout when a
    folder still holds a lease after `wait_seconds` (a server.py stopped just now lets it lapse)."""
    database, (log, aggregates) = collection.database, _collections(collection)
    deadline, waiting = time.time() + wait_seconds, False
    while True:
        now = int(time.time() // LEASE_SECONDS)
        if not log.find_one({"_id": {"$in": [f"lease:{slot}" for slot in range(now, now + LEASE_WINDOW + 3)]}}):
            break
        if time.time() > deadline:
            raise OldLayout(f"a server.py is folding the counts of {collection.full_name}: stop every server.py first")
        if not waiting:
            LOG.info("waiting for the lease of a folder to lapse (a server.py stopped just now, or one still running)")
            waiting = True
        time.sleep(1)
    aggregates.replace_one({"_id": "layout"}, {"version": LAYOUT, "rebuilding": True}, upsert=True)
    time.sleep(LAYOUT_RECHECK_SECONDS + 1)  # readers that checked the layout before see it now
    for name in database.list_collection_names():
        if name.startswith(f"{collection.name}_counts_"):
            database.drop_collection(name)
    aggregates.delete_many({"_id": {"$ne": "layout"}})
    stored = array.array("q")  # ms·8 + status: compact, and sorted by time, so that each round folds a stretch of it
    for document in collection.find({}, {"timestamp": 1, "status": 1}):
        stored.append(epoch_ms(document["timestamp"]) * 8 + document["status"])
    stored = sorted(stored)
    for first in range(0, len(stored), chunk):
        entries = [(value >> 3, value & 7) for value in stored[first:first + chunk]]
        log.insert_one({"_id": f"c:rebuilt-{first}", "entries": _encode_entries(entries)})
    folder = Folder(collection, rebuilding=True)  # folded before readers are let in, or each would decode them all
    while any(record["_id"].startswith("c:") for record in log.find({}, {"_id": 1})):
        if not folder.fold_once():
            time.sleep(FOLD_INTERVAL_SECONDS)  # the end of a lease slot
    aggregates.replace_one({"_id": "layout"}, {"version": LAYOUT}, upsert=True)
    return len(stored)


# -- encodings: strings, since FerretDB stores a type schema beside every field ----------

def _encode_entries(entries):
    """Sorted [(ms, status)] -> "first|step·10+status,..." (a record's or fragment's entries)."""
    if not entries:
        return ""
    previous = entries[0][0]
    out = []
    for ms, status in entries:
        out.append(str((ms - previous) * 10 + status))
        previous = ms
    return f"{entries[0][0]}|{','.join(out)}"


def _decode_entries(text):
    """The inverse of _encode_entries: ([ms ascending], [status])."""
    if not text:
        return [], []
    first, rest = text.split("|")
    times, statuses = [], []
    ms = int(first)
    for value in rest.split(","):
        step, status = divmod(int(value), 10)
        ms += step
        times.append(ms)
        statuses.append(status)
    return times, statuses


def _encode_fragment(values):
    """Sorted [ms in hour·8 + status] -> (";second:ms in second·10+status,...;...", {second: [7
    counts]}), in one pass and without a tuple per entry (a round may hold 2,000,000 of one hour).
    The text is a fragment's: a reader finds one second's entries by a substring search."""
    text, parts, second, entries, counts = [], {}, None, [], None
    for value in values:
        ms, status = value >> 3, value & 7
        if ms // 1000 != second:
            if entries:
                text.append(f";{second}:{','.join(entries)}")
            second, entries = ms // 1000, []
            counts = parts[second] = [0] * STATUSES
        counts[status] += 1
        entries.append(str(ms % 1000 * 10 + status))
    if entries:
        text.append(f";{second}:{','.join(entries)}")
    return "".join(text), parts


def _section(text, key):
    """What follows ";<key>:" in `text` up to the next ";" (or the end), or None: one second of a
    fragment's entries, or one minute's block of a seconds document, found by a substring search."""
    start = text.find(f";{key}:")
    if start < 0:
        return None
    start += len(f";{key}:")
    end = text.find(";", start)
    return text[start:end if end >= 0 else len(text)]


def _decode_second(text, second):
    """[(ms in second, status)] of one second of a fragment."""
    values = _section(text, second)
    return [] if values is None else [divmod(int(value), 10) for value in values.split(",")]


def _encode_parts(parts):
    """{child offset: [7 counts]} -> "offset,...|cumulative counts;...": the offsets present,
    ascending, and for each the counts of every offset up to it, so that a reader sums any
    run of children from two entries."""
    offsets, running, cumulative = sorted(parts), [0] * STATUSES, []
    for offset in offsets:
        _add(running, parts[offset])
        cumulative.append(",".join(map(str, running)))
    return f"{','.join(map(str, offsets))}|{';'.join(cumulative)}" if offsets else ""


def _decode_parts(text):
    """The inverse of _encode_parts."""
    offsets, cumulative = _split_parts(text)
    parts, previous = {}, [0] * STATUSES
    for offset, entry in zip(offsets, cumulative):
        running = [int(count) for count in entry.split(",")]
        parts[offset] = [now - before for now, before in zip(running, previous)]
        previous = running
    return parts


def _split_parts(text):
    if not text:
        return [], []
    offsets, cumulative = text.split("|")
    return [int(offset) for offset in offsets.split(",")], cumulative.split(";")


def _sum_parts(split, first, last):
    """[7 counts] of the children with first <= offset < last, from _split_parts's answer."""
    offsets, cumulative = split
    low, high = bisect.bisect_left(offsets, first), bisect.bisect_left(offsets, last)
    if low >= high:
        return [0] * STATUSES
    top = [int(count) for count in cumulative[high - 1].split(",")]
    if low == 0:
        return top
    return [a - b for a, b in zip(top, (int(count) for count in cumulative[low - 1].split(",")))]


# A second holding at most this many messages is written as their statuses, one digit each, sorted
# ("0336"), not as its 7 counts ("1,0,0,2,0,0,1"): at the density of 10,000,000 over 30 days
# (about 4 a second) that and the tags written once a minute make a seconds document a third.
DIGITS_UP_TO = 12


def _encode_minute(seconds):
    """{second offset in the hour: [[7 counts], [fragment tags]]} of one minute -> one minute's
    block of a seconds document: "tag.tag|second=counts=index.index/...", ascending, where each
    second is its offset in the minute, its counts are either the statuses of its messages
    ("0336") or its 7 counts ("1000,2,0,0,0,0,1"), and its tags are indexes into the
    minute's tags (a minute's seconds are mostly folded by the same rounds)."""
    tags, entries = {}, []
    for offset, (counts, names) in sorted(seconds.items()):
        written = ("".join(str(status) * count for status, count in enumerate(counts)) if sum(counts) <= DIGITS_UP_TO
                   else ",".join(map(str, counts)))
        indexes = ".".join(str(tags.setdefault(name, len(tags))) for name in names)
        entries.append(f"{offset % MINUTE}={written}={indexes}")
    return f"{'.'.join(tags)}|{'/'.join(entries)}"


def _decode_minute(text, minute):
    """The inverse of _encode_minute, for the block of `minute` (of the hour)."""
    seconds = {}
    if not text:
        return seconds
    names, separator, entries = text.partition("|")
    if not separator:
        raise ValueError(f"not a block of layout {LAYOUT}: {text[:40]!r}")
    names = names.split(".")
    for entry in entries.split("/") if entries else ():
        offset, written, indexes = entry.split("=")
        if "," in written:
            counts = [int(count) for count in written.split(",")]
        else:
            counts = [0] * STATUSES
            for status in written:
                counts[int(status)] += 1
        seconds[minute * MINUTE + int(offset)] = [counts, [names[int(index)] for index in indexes.split(".")]
                                              if indexes else []]
    return seconds


def _split_minutes(text):
    """A seconds document's `seconds` (";minute:block;minute:block...") -> {minute: block}."""
    minutes = {}
    for section in text.split(";")[1:]:
        minute, _, block = section.partition(":")
        minutes[int(minute)] = block
    return minutes


def _join_minutes(minutes):
    """The inverse of _split_minutes; a reader finds one minute's block by _section()."""
    return "".join(f";{minute}:{block}" for minute, block in sorted(minutes.items()))


def _hour_seconds(document):
    """{second offset: [[7 counts], [fragment tags]]} of every second a seconds document holds."""
    return {offset: entry for minute, block in _split_minutes(document.get("seconds", "")).items()
            for offset, entry in _decode_minute(block, minute).items()}


def _minute_of(document, offset):
    """{second offset: [[7 counts], [fragment tags]]} of the minute of `offset` (in the hour) in a
    seconds document that a reader read (each minute decoded once per read)."""
    decoded, minute = document.setdefault("decoded", {}), offset // MINUTE
    if minute not in decoded:
        decoded[minute] = _decode_minute(_section(document.get("seconds", ""), minute) or "", minute)
    return decoded[minute]


def _add(counts, more):
    for status, number in enumerate(more):
        counts[status] += number


# -- writer side (server.py's writer threads) --------------------------------------------

def _process_start(pid):
    """The start time of a process (clock ticks since boot), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _machine():
    """This boot of this machine and this PID namespace: where a pid means one process."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


OWNER = {"machine": _machine(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _owner_is_dead(owner):
    """True only when the owner ran where this process runs and is gone; elsewhere nobody can tell."""
    if not owner or owner.get("machine") is None or owner.get("machine") != _machine():
        return False
    return _process_start(owner["pid"]) != owner.get("start")


class BatchWriter:
    """Stores batches of documents in one raw collection and records their counts.

    `write(documents)` returns ({index: reason} for documents the store refused for what
    they hold, never to be retried; the number of documents already stored, same _id: they are
    redeliveries, stored once and not refused); it raises PyMongoError when the whole write
    must be retried (an outage).
    """

    def __init__(self, collection, wait_seconds=0.05, fault_hook=None, timeout_seconds=None):
        self._raw = collection
        self._timeout_seconds = timeout_seconds  # each store step's deadline (pymongo's maxTimeMS and socket timeouts)
        self._fault_hook = fault_hook or (lambda point, detail=None: None)
        self._log, self._intents = _collections(collection)[0], _intents(collection)
        self._wait_seconds = wait_seconds
        self._abandoned = {}  # batch -> when a write of this process gave it up (monotonic)
        self._abandoned_lock = threading.Lock()
        self._marked = False  # mark_layout() done

    def mark_layout(self):
        """mark_layout() of the collection, once, before the first message stored (else its messages
        would look like an earlier version's). Raises OldLayout, or PyMongoError."""
        if not self._marked:
            with pymongo.timeout(self._timeout_seconds):
                mark_layout(self._raw)
            self._marked = True

    def write(self, documents):
        self.mark_layout()
        batch = uuid.uuid4().hex[:16]
        try:
            with pymongo.timeout(self._timeout_seconds):
                self._intents.insert_one({"_id": f"i:{batch}", "owner": OWNER, **self._abandoned_before()})
                for document in documents:
                    document["batch"] = batch
                refused, duplicates = self._insert(documents)
                self._fault_hook("after-raw-insert")
                created = sorted((epoch_ms(document["timestamp"]), document["status"])
                                 for index, document in enumerate(documents) if index not in refused and index not in duplicates)
                try:
                    self._log.insert_one({"_id": f"c:{batch}", "entries": _encode_entries(created)})
                except DuplicateKeyError:
                    pass  # the folder took this batch for dead and recorded what it stamped: the same documents
        except PyMongoError:
            with self._abandoned_lock:
                self._abandoned[batch] = time.monotonic()
            raise
        if duplicates:
            self._wait_for_open_intents(batch)
        return refused, len(duplicates)

    def _abandoned_before(self):
        """{"abandoned": [batch]}: the batches this process gave up on, named in the next intents
        so that the folder recovers them soon (their writer lives, so they would wait for
        RECOVER_AFTER_SECONDS; the retry that meets their documents waits for that recovery)."""
        with self._abandoned_lock:
            now = time.monotonic()
            self._abandoned = {batch: since for batch, since in self._abandoned.items()
                               if now - since < RECOVER_AFTER_SECONDS}
            return {"abandoned": sorted(self._abandoned)} if self._abandoned else {}

    def _insert(self, documents):
        """({index: reason} refused, {index} duplicates) of one unordered insert.

        The driver encodes the whole batch before sending it, so one document BSON cannot
        encode fails them all: those are refused alone, and the others written without them."""
        try:
            self._raw.insert_many(documents, ordered=False)
            return {}, set()
        except (InvalidDocument, UnicodeEncodeError, OverflowError):
            unencodable = _unencodable(documents, self._raw.codec_options)
            if not unencodable:
                raise
            others = [index for index in range(len(documents)) if index not in unencodable]
            refused, duplicates = self._insert([documents[index] for index in others]) if others else ({}, set())
            return ({**unencodable, **{others[index]: reason for index, reason in refused.items()}},
                    {others[index] for index in duplicates})
        except BulkWriteError as error:
            if error.details.get("writeConcernErrors") or error.timeout:  # an outage, not the documents' fault
                raise
            refused, duplicates = {}, set()
            for failure in error.details["writeErrors"]:
                if failure["code"] == DUPLICATE_KEY:
                    duplicates.add(failure["index"])
                else:
                    refused[failure["index"]] = f"MongoDB refused the document: {failure.get('errmsg', failure['code'])}"
            return refused, duplicates

    def _wait_for_open_intents(self, batch):
        """A duplicate was created by an earlier batch, whose record may still be missing:
        wait until every intent open now (but this batch's) is closed by its record."""
        with pymongo.timeout(self._timeout_seconds):
            open_now = _open_intents(_read_log(self._log, self._intents, {"_id": 1})) - {batch}
        started, logged = time.monotonic(), False
        while open_now:
            if time.monotonic() - started > WAIT_FOR_RECOVERY_SECONDS:
                raise CountsStalled(f"the counts of {len(open_now)} interrupted batches were not recovered within "
                                    f"{WAIT_FOR_RECOVERY_SECONDS}s: is a server.py (its folder) running on this database?")
            if not logged and time.monotonic() - started > 5:
                LOG.warning("waiting for the counts of %d interrupted batches to be recovered", len(open_now))
                logged = True
            time.sleep(self._wait_seconds)
            with pymongo.timeout(self._timeout_seconds):
                open_now &= _open_intents(_read_log(self._log, self._intents, {"_id": 1}))
        if logged:
            LOG.info("interrupted batches recovered after %.1fs", time.monotonic() - started)


class CountsStalled(PyMongoError):
    """No folder recovered an interrupted batch in time: handled as a store outage."""


def _unencodable(documents, codec_options):
    """{index: reason} for the documents that BSON cannot encode or that exceed its 16 MiB."""
    refused = {}
    for index, document in enumerate(documents):
        try:
            size = len(bson.encode(document, codec_options=codec_options))
        except (InvalidDocument, UnicodeEncodeError, OverflowError) as error:
            reason = f"{error.__class__.__name__}: {error}"
        else:
            if size <= MAX_BSON_BYTES:
                continue
            reason = f"it is {size} bytes as BSON, more than {MAX_BSON_BYTES}"
        # The reason becomes an AMQP header, which must be UTF-8: escape whatever is not ASCII.
        refused[index] = f"the document cannot be stored: {reason}"[:200].encode("ascii", "backslashreplace").decode()
    return refused


def _read_log(log, intents, projection=None):
    """The log, then the intents. The log first: a round deletes a batch's intent before its record,
    and sends the second delete once the first has ended, so an intent read after the log shows a
    batch not folded when the log was read, whatever deletes a folder before may still land between
    the two reads (the other way round, a batch folded between them would show open, and be
    recovered twice). A record that lands between them shows its batch open for one read; a
    recovered record then meets it."""
    return [*log.find({}, projection, batch_size=LOG_BATCH), *intents.find({}, projection, batch_size=LOG_BATCH)]


def _open_intents(documents):
    """Batch ids whose intent has no record yet, in `documents` read by _read_log."""
    ids = [document["_id"] for document in documents]
    opened = {_id[2:] for _id in ids if _id.startswith("i:")}
    return opened - {_id[2:] for _id in ids if _id.startswith("c:")}


# -- the folder (one per database at a time) ---------------------------------------------

class Folder:
    """Folds the logged records into the aggregates, and recovers interrupted batches.

    `run(stopping)` loops until the `stopping` event is set, holding the lease when it can;
    `fold_once()` runs one round if this folder holds the lease (tests and the benchmark).
    """

    def __init__(self, collection, recover_after=RECOVER_AFTER_SECONDS, dead_owner_grace=DEAD_OWNER_GRACE_SECONDS,
                 clock=time.time, rebuilding=False):
        self._raw = collection
        self._log, self._aggregates = _collections(collection)
        self._intents = _intents(collection)
        self._recover_after, self._dead_owner_grace = recover_after, dead_owner_grace
        self._clock = clock
        self._name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._slots = set()  # lease slots this folder holds
        self._quiet_until = float("-inf")  # on self._clock: no aggregate write before
        self._open_since = {}  # batch -> when this folder first saw its intent open (monotonic)
        self._recovery = None  # the thread reading the raw documents of interrupted batches, in run()
        self._found = {}  # batch -> [(ms, status)] that thread found, recorded by the next round
        self._found_lock = threading.Lock()
        self._ended_since = {}  # open batch -> when seen its writer dead or named given up (monotonic)
        self._superseded = []  # (collection, [fragment ids]) merged by the last round
        self._rebuilding = rebuilding  # the folder of rebuild(): it folds while the marker says "rebuilding"
        self._layout_ok, self._layout_error = rebuilding, None
        self._renewed_at = float("-inf")  # on self._clock: when a round last claimed the lease's next slot
        # The aggregates this folder wrote while it held the lease without a break: only it writes
        # them then, so a round need not read them again (the newest CACHED, as seconds documents are big).
        self._cache = collections.OrderedDict()

    # lease ------------------------------------------------------------------

    def _holds_lease(self):
        """Claim the current slot when free, and the next one in time; True while this folder holds one."""
        now = self._clock()
        slot = int(now // LEASE_SECONDS)
        into_slot = now - slot * LEASE_SECONDS
        # The holder claims the next slot first; the others try later, so it keeps the lease.
        wanted = [slot]
        if into_slot > LEASE_SECONDS * (0.5 if slot in self._slots else 0.8):
            wanted.append(slot + 1)
        for candidate in wanted:
            if candidate in self._slots:
                continue
            window = [f"lease:{number}" for number in range(candidate - LEASE_WINDOW, candidate + 3)]
            leases = {int(d["_id"][6:]): d["folder"] for d in self._log.find({"_id": {"$in": window}})}
            if any(number > candidate for number in leases):
                continue  # this folder's clock is behind another's: never claim what is past for it
            try:
                self._log.insert_one({"_id": f"lease:{candidate}", "folder": self._name})
            except DuplicateKeyError:
                continue
            self._slots.add(candidate)
            if candidate - 1 not in self._slots:
                self._cache.clear()
                self._layout_ok = self._rebuilding  # checked again: a rebuild may have run meanwhile
                before = [number for number, folder in leases.items() if number < candidate and folder != self._name]
                if before:  # the folder before may still have a write in flight
                    self._quiet_until = max(self._quiet_until, (max(before) + 1) * LEASE_SECONDS + QUIET_SECONDS)
                LOG.info("folding counts (lease from slot %d)", candidate)
            self._log.delete_many({"_id": {"$in": [f"lease:{old}" for old in
                                                   range(candidate - 2 * LEASE_WINDOW, candidate - LEASE_WINDOW)]}})
        self._slots = {held for held in self._slots if held >= slot}
        return slot in self._slots

    def _still_holds(self, quiet_or_not=False):
        """Writing is allowed within a held slot, but for its last second unless the next is held too
        (a write in flight, and clocks that disagree a little, must not reach another folder's slot);
        aggregates only once the quiet time has passed, records (`quiet_or_not`) before."""
        now = self._clock()
        slot = int(now // LEASE_SECONDS)
        return ((quiet_or_not or now >= self._quiet_until) and slot in self._slots
                and (now < (slot + 1) * LEASE_SECONDS - 1 or slot + 1 in self._slots))

    def _renewing(self):
        """_still_holds() within a long round (a backlog spread over weeks touches hundreds of
        hours), claiming the next slot as it comes, as a round's start does."""
        if self._clock() - self._renewed_at >= 1:
            with pymongo.timeout(STEP_SECONDS):
                self._holds_lease()
            self._renewed_at = self._clock()
        return self._still_holds()

    # rounds -----------------------------------------------------------------

    def run(self, stopping):
        """Rounds until `stopping` is set. Recovery runs beside them, in a thread of its own: on
        FerretDB it reads the whole raw collection (minutes at millions of documents), and the
        rounds must go on meanwhile, or readers would decode ever more unfolded records."""
        failures = 0
        while not stopping.is_set():
            try:
                folded = self.fold_once(recover_beside=True)
                if failures:
                    LOG.info("counts: folding again")
                failures = 0
            except Exception as error:  # noqa: BLE001 - the round is finished later, by this folder or another
                if not failures:
                    LOG.warning("counts: folding failed (%s); retrying", error, exc_info=not isinstance(error, PyMongoError))
                failures += 1
                folded = False
                self._quiet_until = self._clock() + QUIET_SECONDS  # a write given up on may still land
                self._cache.clear()
                if failures % 3 == 0:
                    self._slots.clear()  # let another folder try: the lease lapses at the end of the slot
            stopping.wait(FOLD_INTERVAL_SECONDS if folded else FOLD_INTERVAL_SECONDS / 2)

    def fold_once(self, recover_beside=False):
        """One round: True when it folded something, False otherwise. Interrupted batches due
        for recovery are first looked for in the raw collection, or with `recover_beside` in a
        thread started now, whose findings a later round records."""
        with pymongo.timeout(STEP_SECONDS):
            if not self._holds_lease() or not (self._layout_ok or self._check_layout()):
                return False
            log = _read_log(self._log, self._intents)
        recorded = self._record_recovered(log)
        with self._found_lock:
            stale = [batch for batch in self._due_for_recovery(log) if batch not in recorded and batch not in self._found]
        if stale and not recover_beside:
            self._add_found(self._find_stamped(stale))
            with pymongo.timeout(STEP_SECONDS):  # the read may have taken minutes: what is open now
                log = _read_log(self._log, self._intents)
            self._record_recovered(log)
        elif stale and not (self._recovery and self._recovery.is_alive()):
            self._recovery = threading.Thread(target=self._find_stamped_beside, args=(stale,),
                                              name="counts-recovery", daemon=True)
            self._recovery.start()
        if not self._still_holds():
            return False
        return self._round(log)

    def _check_layout(self):
        """True once the counts are known to be in LAYOUT; another layout is logged once and never folded into."""
        try:
            check_layout(self._raw)
        except OldLayout as error:
            if str(error) != self._layout_error:
                LOG.error("counts: not folding: %s", error)
                self._layout_error = str(error)
            return False
        self._layout_ok = True
        return True

    def _round(self, log):
        state = next((record for record in log if record["_id"] == "state"), {"round": 0, "records": []})
        unfinished = [record for record in log if record["_id"] in set(state["records"])]
        if unfinished:  # a round cut short: finish it with the same records
            number, records = state["round"], unfinished
        else:
            records, size = [], 0
            for record in (record for record in log if record["_id"].startswith("c:")):
                entries = record["entries"].count(",") + 1 if record["entries"] else 0
                if records and (len(records) == MAX_RECORDS_PER_ROUND or size + entries > MAX_ROUND_ENTRIES):
                    break
                records.append(record)
                size += entries
            if not records:
                return False
            number = state["round"] + 1
            if not self._still_holds():
                return False
            with pymongo.timeout(STEP_SECONDS):
                self._log.replace_one({"_id": "state"}, {"round": number, "records": [r["_id"] for r in records]},
                                      upsert=True)
            superseded = collections.defaultdict(list)  # one delete per collection: each costs a pass on FerretDB
            for home, ids in self._superseded:
                superseded[home].extend(ids)
            for home, ids in superseded.items():  # a reader that saw them started before this round: it reads again
                with pymongo.timeout(STEP_SECONDS):
                    self._raw.database[home].delete_many({"_id": {"$in": ids}})
            self._superseded = []
        try:
            self._apply(number, records)
        except _LeaseLost:
            self._cache.clear()  # what the round cut short wrote or not is read again
            return False
        if not self._still_holds():
            return False
        done = [record["_id"] for record in records]
        with pymongo.timeout(STEP_SECONDS):  # intents first: an intent without its record would look open
            self._intents.delete_many({"_id": {"$in": [f"i:{_id[2:]}" for _id in done]}})
        with pymongo.timeout(STEP_SECONDS):
            self._log.delete_many({"_id": {"$in": done}})
        return True

    def _apply(self, number, records):
        """Add the records into every aggregate they touch: the seconds day by day (each day's
        fragments first, then the seconds documents of its hours), then the hours, days, spans
        and `all` from the minutes' totals."""
        by_hour = collections.defaultdict(lambda: array.array("q"))  # hour -> ms in hour·8 + status: compact
        for record in records:
            for ms, status in zip(*_decode_entries(record["entries"])):
                hour = ms // (HOUR * 1000)
                by_hour[hour].append((ms - hour * HOUR * 1000) * 8 + status)
        days = collections.defaultdict(list)
        for hour in by_hour:
            days[hour * HOUR // DAY].append(hour)
        totals = {}  # minute -> [7 counts] this round adds
        for day in sorted(days):
            seconds, fragments = {}, collections.defaultdict(list)  # hour -> {second offset: counts}; home -> fragments
            for hour in sorted(days[day]):
                text, seconds[hour] = _encode_fragment(sorted(by_hour.pop(hour)))
                fragments[_fragments_home(self._raw, hour).name].append({"_id": f"f:{hour}:{number}", "entries": text})
            for home, documents in fragments.items():
                self._insert_once(home, documents)
            # an hour's minutes share a document
            current = self._current(0, [hour * MINUTES_AN_HOUR for hour in seconds])
            for hour, parts in seconds.items():
                if not self._renewing():
                    raise _LeaseLost()
                with pymongo.timeout(STEP_SECONDS):
                    self._merge(number, 0, hour * MINUTES_AN_HOUR, parts, current[hour * MINUTES_AN_HOUR])
                for offset, counts in parts.items():
                    _add(totals.setdefault(hour * MINUTES_AN_HOUR + offset // MINUTE, [0] * STATUSES), counts)
        level_parts = [{minute: {0: total} for minute, total in totals.items()}]  # each minute as one part: its total
        for level in range(1, TOP + 1):  # each level's parts are the totals of the level below
            child_size = LEVELS[level - 1]
            size = LEVELS[level] if level < TOP else None
            parts = {}
            for child, child_parts in level_parts[-1].items():
                total = [0] * STATUSES
                for counts in child_parts.values():
                    _add(total, counts)
                bucket = child * child_size // size if size else 0
                offset = child - bucket * (size // child_size) if size else child
                _add(parts.setdefault(bucket, {}).setdefault(offset, [0] * STATUSES), total)
            level_parts.append(parts)
        for level, buckets in enumerate(level_parts[1:], start=1):
            current = self._current(level, buckets)
            for bucket, parts in buckets.items():
                if not self._renewing():
                    raise _LeaseLost()
                with pymongo.timeout(STEP_SECONDS):
                    self._merge(number, level, bucket, parts, current[bucket])

    def _insert_once(self, home, documents):
        """Insert documents a round writes whole: those already there are the round's first attempt's."""
        try:
            with pymongo.timeout(STEP_SECONDS):
                self._raw.database[home].insert_many(documents, ordered=False)
        except BulkWriteError as error:
            if any(e["code"] != DUPLICATE_KEY for e in error.details["writeErrors"]):
                raise

    def _current(self, level, buckets):
        """{bucket: its current document} for the buckets of one level: from the cache, or one query
        per collection (on FerretDB one pass, where a lookup per document would cost one each)."""
        found, wanted = {}, collections.defaultdict(dict)
        for bucket in buckets:
            cached = self._cache.pop((level, bucket), None)
            if cached is not None:
                found[bucket] = cached
            else:
                wanted[_home(self._raw, level, bucket).name][_aggregate_id(level, bucket)] = bucket
        with pymongo.timeout(STEP_SECONDS):  # several of a collection in one pass, not one each
            documents = _look_up([(self._raw.database[name], _id) for name, by_id in wanted.items() for _id in by_id],
                                 separate=1)
        for (name, _id), document in documents.items():
            found[wanted[name][_id]] = document
        return {bucket: found.get(bucket) or {"round": 0, "parts": ""} for bucket in buckets}

    def _merge(self, number, level, bucket, parts, current):
        home, _id = _home(self._raw, level, bucket), _aggregate_id(level, bucket)
        if current["round"] >= number:
            self._remember(level, bucket, current)
            return  # done by this round's first attempt
        if level == 0:
            document = self._merge_seconds(number, bucket // MINUTES_AN_HOUR, parts, current)
        else:
            merged = _decode_parts(current["parts"])
            for offset, counts in parts.items():
                _add(merged.setdefault(offset, [0] * STATUSES), counts)
            document = {"round": number, "parts": _encode_parts(merged)}
        home.replace_one({"_id": _id}, document, upsert=True)
        self._remember(level, bucket, document)

    def _merge_seconds(self, number, hour, seconds, current):
        """The seconds document of `hour` with `seconds` ({second offset: [7 counts]}) of round `number` added.
        Only the blocks of the minutes the round touches are decoded and encoded again: a backfill
        touches a second or two of an hour that may hold all 3,600 (re-encoding a whole busy hour
        took 23 ms a round)."""
        minutes = _split_minutes(current.get("seconds", ""))
        touched = {}  # minute -> its seconds, decoded
        for offset, counts in seconds.items():
            number_of_minute = offset // MINUTE
            if number_of_minute not in touched:
                touched[number_of_minute] = _decode_minute(minutes.get(number_of_minute, ""), number_of_minute)
            entry = touched[number_of_minute].setdefault(offset, [[0] * STATUSES, []])
            _add(entry[0], counts)
            entry[1].append(str(number))
        crowded = [offset for offset in seconds if len(touched[offset // MINUTE][offset][1]) > MAX_FRAGMENTS_PER_SECOND]
        if crowded:
            every = {**{minute: _decode_minute(block, minute) for minute, block in minutes.items()}, **touched}
            every_second = {offset: entry for minute in every.values() for offset, entry in minute.items()}
            compacted = self._compact(number, hour, {offset: tags for offset, (_, tags) in every_second.items()},
                                      crowded, {offset: counts for offset, (counts, _) in every_second.items()})
            for offset, entry in every_second.items():
                entry[1] = compacted[offset]
            touched = every
        for minute, decoded in touched.items():
            minutes[minute] = _encode_minute(decoded)
        totals = _decode_parts(current.get("minutes", ""))
        for offset, counts in seconds.items():
            _add(totals.setdefault(offset // MINUTE, [0] * STATUSES), counts)
        return {"round": number, "seconds": _join_minutes(minutes), "minutes": _encode_parts(totals)}

    def _remember(self, level, bucket, document):
        self._cache[(level, bucket)] = document
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)

    def _compact(self, number, hour, fragments, crowded, by_second):
        """{second offset: [fragment tags]} once the detail of some seconds is merged: of every
        second of the hour while it holds at most MAX_WHOLE_HOUR_ENTRIES messages (so that a quiet
        day keeps few fragments), else of the `crowded` seconds only. They are merged in second
        order into pieces of at most MAX_COMPACTED_ENTRIES messages, or into MAX_PIECES if
        that makes more (a second is never split), tagged "<round>c<piece>", each second taking
        its entries from the fragments it names only; so a busy hour merged again reads at most
        MAX_PIECES pieces and the fragments written since, never a fragment per second.
        `by_second`: {second offset: [7 counts]} of the hour. This folder deletes the fragments
        no second names any more in its next round, once no reader can still be reading the seconds
        document that named them (another folder leaves them: they are never named again)."""
        home = _fragments_home(self._raw, hour)
        whole = sum(map(sum, by_second.values())) <= MAX_WHOLE_HOUR_ENTRIES
        seconds = sorted(fragments) if whole else sorted(crowded)
        tags = sorted({tag for offset in seconds for tag in fragments[offset]})
        with pymongo.timeout(STEP_SECONDS):  # each its own query: $in would decode its collection whole
            found = _look_up([(home, f"f:{hour}:{tag}") for tag in tags], separate=len(tags))
        if len(found) < len(tags):
            raise RuntimeError("a fragment that its hour names is missing")  # never deleted while named
        texts = {tag: found[(home.name, f"f:{hour}:{tag}")]["entries"] for tag in tags}
        read_up_to = dict.fromkeys(tags, 0)  # fragments list their seconds in order: each is read once, in order

        def values(tag, offset):
            text, header = texts[tag], f";{offset}:"
            start = text.index(header, read_up_to[tag]) + len(header)
            end = text.find(";", start)
            read_up_to[tag] = end = len(text) if end < 0 else end
            return text[start:end]

        sizes = [sum(by_second[offset]) for offset in seconds]
        # A piece is closed only when the next second would take it past this, so each closed one
        # holds over sum / MAX_PIECES: there are at most MAX_PIECES.
        piece_entries = max(MAX_COMPACTED_ENTRIES, -(-sum(sizes) // MAX_PIECES) + max(sizes))
        pieces, merged, size = {}, {}, 0  # tag -> [";second:values"], second offset -> its piece's tag
        for offset, entries in zip(seconds, sizes):
            if not pieces or (size and size + entries > piece_entries):
                piece_tag = f"{number}c{len(pieces)}"
                pieces[piece_tag], size = [], 0
            pieces[piece_tag].append(f";{offset}:{','.join(values(tag, offset) for tag in fragments[offset])}")
            merged[offset] = piece_tag
            size += entries
        # Written again alike by a retry of this round: the same fragments, named by the same seconds document.
        self._insert_once(home.name, [{"_id": f"f:{hour}:{tag}", "entries": "".join(piece)}
                                      for tag, piece in pieces.items()])
        compacted = {**fragments, **{offset: [tag] for offset, tag in merged.items()}}
        named = {tag for tags in compacted.values() for tag in tags}
        unnamed = set().union(*fragments.values()) - named
        if unnamed:
            self._superseded.append((home.name, [f"f:{hour}:{tag}" for tag in sorted(unnamed)]))
        return compacted

    def _find_stamped_beside(self, stale):
        try:
            self._add_found(self._find_stamped(stale))
        except Exception as error:  # noqa: BLE001 - a later round starts it again
            LOG.warning("counts: reading the raw documents of %d interrupted batches failed (%s); retrying",
                        len(stale), error, exc_info=not isinstance(error, PyMongoError))

    def _due_for_recovery(self, log):
        """The batches whose intent has been open long enough to be recovered."""
        now = time.monotonic()
        owners = {record["_id"][2:]: record.get("owner") for record in log if record["_id"].startswith("i:")}
        named = {batch for record in log if record["_id"].startswith("i:") for batch in record.get("abandoned", ())}
        open_now = _open_intents(log)
        self._open_since = {batch: self._open_since.get(batch, now) for batch in open_now}
        # Since when this folder knows the batch's writer gone or given up: remembered, as the
        # intent that names a batch given up is deleted once its own batch is folded.
        self._ended_since = {batch: self._ended_since.get(batch, now) for batch in open_now
                             if batch in self._ended_since or batch in named or _owner_is_dead(owners[batch])}
        # Aged on this folder's clock: a writer's clock may be off, and a write sent by a process
        # that died, or given up on by its writer, may still be landing.
        return [batch for batch in open_now if now - self._open_since[batch] >= self._recover_after
                or batch in self._ended_since and now - self._ended_since[batch] >= self._dead_owner_grace]

    def _find_stamped(self, stale):
        """{batch: sorted [(ms, status)]} of the raw documents each interrupted batch stamped."""
        started = time.monotonic()
        created = {batch: [] for batch in stale}
        with pymongo.timeout(RECOVERY_SECONDS):
            for document in self._raw.find({"batch": {"$in": stale}}, {"timestamp": 1, "status": 1, "batch": 1}):
                created[document["batch"]].append((epoch_ms(document["timestamp"]), document["status"]))
        LOG.warning("read the documents of %d interrupted batches (%d documents) from the raw collection in %.1fs",
                    len(stale), sum(map(len, created.values())), time.monotonic() - started)
        return {batch: sorted(entries) for batch, entries in created.items()}

    def _add_found(self, found):
        with self._found_lock:
            self._found.update(found)

    def _record_recovered(self, log):
        """Record what the raw documents showed for the interrupted batches still open in `log`;
        the set of batches handled. Only here, on the folding thread, holding the lease (its quiet
        time may still run), right after reading the log: a record folded and deleted since a read
        began must not come back. A round deletes a batch's intent before its record, so an intent
        read after the log without its record there shows a batch not folded (_read_log)."""
        with self._found_lock:
            found, self._found = self._found, {}
        if not found or not self._still_holds(quiet_or_not=True):
            self._add_found(found)
            return set()
        open_now = _open_intents(log)
        for batch, entries in found.items():
            if batch not in open_now:
                continue  # its owner wrote the record after all, or it was recovered and folded
            try:
                with pymongo.timeout(STEP_SECONDS):
                    self._log.insert_one({"_id": f"c:{batch}", "entries": _encode_entries(entries), "recovered": True})
            except DuplicateKeyError:
                pass  # its owner wrote it after all
            LOG.warning("recovered the counts of interrupted batch %s (%d documents)", batch, len(entries))
        return set(found)


class _LeaseLost(Exception):
    """The folder's lease slot ended mid-round; the next holder finishes the round."""


# -- reader side (api.py) ----------------------------------------------------------------

def raw_counts(collection, start, end):
    """[count per status] of raw documents with start <= timestamp < end: the definition.
    It reads the raw collection: for tests and verification only."""
    counts = [0] * STATUSES
    pipeline = [{"$match": {"timestamp": {"$gte": start, "$lt": end}}},
                {"$group": {"_id": "$status", "count": {"$sum": 1}}}]
    for row in collection.aggregate(pipeline):
        counts[row["_id"]] = row["count"]
    return counts


def count(collection, start, end):
    """[count per status] of the stored messages with start <= timestamp < end.

    `start` and `end` are aware datetimes; stored times are whole milliseconds, so a bound
    with finer digits must be rounded up to the next millisecond by the caller. Raises
    PyMongoError when the store does not answer."""
    low, high = _bound_ms(start), _bound_ms(end)
    return _read(collection, [(low, high)])[0] if low < high else [0] * STATUSES


def series(collection, start, end, step_seconds):
    """[(low_ms, high_ms, [count per status])] for every bucket of `step_seconds` (aligned
    to multiples of it since 1970-01-01 UTC, so to UTC midnight for any divisor of a day)
    that meets [start, end), clipped to it: each equals count() of its own bounds, and all
    come from one consistent read. Bounds as for count(); raises PyMongoError likewise."""
    low, high = _bound_ms(start), _bound_ms(end)
    step = step_seconds * 1000
    if low >= high:
        return []
    ranges = [(max(low, edge), min(high, edge + step)) for edge in range(low // step * step, high, step)]
    return [(low, high, answer) for (low, high), answer in zip(ranges, _read(collection, ranges))]


_LAYOUT_CHECKED = {}  # collection (full name) -> when this process last found its counts in LAYOUT (monotonic)
_reads_started_over = [0]
_reads_started_over_lock = threading.Lock()


def reads_started_over():
    """How many reads of this process began again because a folding round changed what they read
    (argument 3 above): each costs another read, so they show in the slowest answers.
    Process-wide: every reader of the process, whatever its collection."""
    return _reads_started_over[0]


def _read(collection, ranges):
    checking, now = None, time.monotonic()
    if now - _LAYOUT_CHECKED.get(collection.full_name, float("-inf")) > LAYOUT_RECHECK_SECONDS:
        # beside the read, not before it: one read in a hundred would otherwise wait for it
        checking = _LOOKUPS.submit(contextvars.copy_context().run, check_layout, collection)
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            with _reads_started_over_lock:
                _reads_started_over[0] += 1
        answers = _Snapshot(collection).counts(ranges)
        if answers is not None:
            break
    if checking is not None:
        checking.result()  # OldLayout: whatever was read is not an answer
        _LAYOUT_CHECKED[collection.full_name] = now  # when the check began: a rebuild waits from there
    if answers is None:
        raise _Busy("the counts changed under every read; try again")
    return answers


class _Busy(PyMongoError):
    pass


def _bound_ms(moment):
    return epoch_ms(moment) + (1 if moment.microsecond % 1000 else 0)


def _pieces(low, high, level=0):
    """Split whole seconds [low, high) into (level, bucket, low, high) pieces, each inside one
    bucket of its level and answered by that bucket's parts (`all` for the top); whole
    buckets of a level are parts of the level above, and are read there."""
    if low >= high:
        return []
    if level == TOP:
        return [(TOP, 0, low, high)]
    size = LEVELS[level]
    if low % size == 0 and high % size == 0:
        return _pieces(low, high, level + 1)
    first, last = low // size, (high - 1) // size
    if first == last:
        return [(level, first, low, high)]
    whole_low = low if low % size == 0 else (first + 1) * size
    whole_high = high if high % size == 0 else last * size
    pieces = [(level, first, low, whole_low)] if low < whole_low else []
    pieces += _pieces(whole_low, whole_high, level + 1)
    if whole_high < high:
        pieces.append((level, last, whole_high, high))
    return pieces


def _plan(low_ms, high_ms):
    """[("detail", low_ms, high_ms) inside one second, or ("piece", level, bucket, low, high)
    in whole seconds] that together make [low_ms, high_ms)."""
    if low_ms >= high_ms:
        return []
    first_second, last_second = -(-low_ms // 1000), high_ms // 1000
    if first_second > last_second:  # both bounds inside one second
        return [("detail", low_ms, high_ms)]
    plan = [("detail", low_ms, first_second * 1000)] if low_ms < first_second * 1000 else []
    plan += [("piece", *piece) for piece in _pieces(first_second, last_second)]
    if last_second * 1000 < high_ms:
        plan.append(("detail", last_second * 1000, high_ms))
    return plan


# A record never changes once inserted (its _id is unique), and a reader meets each one in every read
# until it is folded: so each is decoded once per process. Per log: {record _id: (entries, [times] per status)}.
_DECODED_RECORDS = collections.defaultdict(dict)


def _decoded_record(log_name, record):
    """[[ms] per status] of a record's entries, decoded once per process (the entries compared, not
    only the _id: a rebuild starts the log again)."""
    known = _DECODED_RECORDS[log_name].get(record["_id"])
    if known is None or known[0] != record["entries"]:
        by_status = [[] for _ in range(STATUSES)]
        for ms, status in zip(*_decode_entries(record["entries"])):
            by_status[status].append(ms)
        known = _DECODED_RECORDS[log_name][record["_id"]] = (record["entries"], by_status)
    return known[1]


def _forget_records_but(log_name, log):
    """Keeps the decoded records of `log` only: the others are folded and deleted."""
    present = {record["_id"] for record in log}
    decoded = _DECODED_RECORDS[log_name]
    for _id in list(decoded):  # a copy: other request threads add to it meanwhile
        if _id not in present:
            decoded.pop(_id, None)


class _Snapshot:
    """One consistent read: the log, then the aggregates (argument 3 above)."""

    def __init__(self, collection):
        self._raw = collection
        self._log = _collections(collection)[0]
        self._documents = {}
        self._stale = False

    def counts(self, ranges):
        """[[count per status]] of each [low_ms, high_ms) in `ranges`, or None when a round
        that began after the log was read touched what was read: then read again."""
        log = list(self._log.find({}, batch_size=LOG_BATCH))  # the state first (argument 3), then the records
        state = next((record for record in log if record["_id"] == "state"), {"round": 0, "records": []})
        self._round = state["round"]
        in_round = set(state["records"])
        # The records not folded for good, as sorted times per status: those of the state's round,
        # which an aggregate stamped with that round holds already, and the later ones.
        self._current, self._later = ([[] for _ in range(STATUSES)] for _ in range(2))
        for record in log:
            if not record["_id"].startswith("c:"):
                continue  # the state, a lease
            by_status = self._current if record["_id"] in in_round else self._later
            for times, more in zip(by_status, _decoded_record(self._log.full_name, record)):
                times.extend(more)
        _forget_records_but(self._log.full_name, log)
        for times in (*self._current, *self._later):
            times.sort()
        plans = [_plan(low, high) for low, high in ranges]
        keys = {(step[1], step[2]) if step[0] == "piece" else (0, step[1] // 1000 // MINUTE)
                for plan in plans for step in plan}
        # An hour whose seconds document is read for a bound answers its whole minutes from that
        # document's totals per minute too: one lookup less at each end of a range.
        with_seconds = {bucket // MINUTES_AN_HOUR: (0, bucket) for level, bucket in keys if level == 0}
        self._fetch({key for key in keys if key[0] != 1 or key[1] not in with_seconds})
        for level, bucket in keys:
            if level == 1 and bucket in with_seconds:
                seconds = self._documents[with_seconds[bucket]]
                self._documents[(1, bucket)] = {"round": seconds["round"], "parts": seconds.get("minutes", "")}
        self._fetch_fragments([step for plan in plans for step in plan if step[0] == "detail"])
        answers = []
        for plan in plans:
            counts = [0] * STATUSES
            for step in plan:
                if step[0] == "piece":
                    self._add_piece(counts, *step[1:])
                else:
                    self._add_detail(counts, *step[1:])
            answers.append(counts)
        # A round that began after the state was read shows as an aggregate stamped with it, or as a
        # fragment a seconds document names gone: only then can an answer mix two rounds.
        if self._stale or any(document["round"] > self._round for document in self._documents.values()):
            return None
        return answers

    def _fetch(self, keys):
        """The aggregates of `keys` ((level, bucket)), looked up at once."""
        where = {key: (_home(self._raw, *key), _aggregate_id(*key)) for key in keys}
        found = _look_up(where.values())
        for key, (home, _id) in where.items():
            self._documents[key] = found.get((home.name, _id), {"round": 0, "parts": ""})

    def _fetch_fragments(self, details):
        """The fragments the seconds documents name for the seconds of `details`, looked up at once."""
        self._fragment_ids, wanted = {}, []  # second -> (collection, [fragment _id])
        for _, low_ms, _ in details:
            second = low_ms // 1000
            hour = second // HOUR
            offset = second - hour * HOUR
            _, tags = _minute_of(self._documents[(0, second // MINUTE)], offset).get(offset, (None, []))
            home = _fragments_home(self._raw, hour)
            self._fragment_ids[second] = home, [f"f:{hour}:{tag}" for tag in tags]
            wanted += [(home, f"f:{hour}:{tag}") for tag in tags]
        # never together: six hours' detail at 1,000 msg/s is over 100 MB, which $in would decode whole
        self._fragments = _look_up(wanted, separate=len(wanted))

    def _add_pending(self, counts, since_round, low_ms, high_ms):
        for by_status in (self._later, self._current) if since_round < self._round else (self._later,):
            for status, times in enumerate(by_status):
                counts[status] += bisect.bisect_left(times, high_ms) - bisect.bisect_left(times, low_ms)

    def _add_piece(self, counts, level, bucket, low, high):
        """Whole seconds [low, high) inside one bucket of `level`."""
        document = self._documents[(level, bucket)]
        if level == 0:  # the minute's block of its hour's seconds document
            hour_base = bucket // MINUTES_AN_HOUR * HOUR
            for offset, (more, _) in _minute_of(document, low - hour_base).items():
                if low - hour_base <= offset < high - hour_base:
                    _add(counts, more)
        else:
            base = bucket * LEVELS[level] if level < TOP else 0
            first, last = (low - base) // LEVELS[level - 1], (high - base) // LEVELS[level - 1]
            if "split" not in document:
                document["split"] = _split_parts(document["parts"])
            _add(counts, _sum_parts(document["split"], first, last))
        self._add_pending(counts, document["round"], low * 1000, high * 1000)

    def _add_detail(self, counts, low_ms, high_ms):
        """Milliseconds [low_ms, high_ms) inside one second, from its hour's fragments."""
        second = low_ms // 1000
        hour = second // HOUR
        home, ids = self._fragment_ids[second]
        low, high = low_ms - second * 1000, high_ms - second * 1000
        for _id in ids:
            fragment = self._fragments.get((home.name, _id))
            if fragment is None:
                self._stale = True  # merged and deleted by a later round
                continue
            for ms, status in _decode_second(fragment["entries"], second - hour * HOUR):
                if low <= ms < high:
                    counts[status] += 1
        self._add_pending(counts, self._documents[(0, second // MINUTE)]["round"], low_ms, high_ms)
