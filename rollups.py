"""Exact status counts whose cost does not grow with the number of stored messages.

Time is cut into buckets at four levels: minute, hour, day and span (32 days); each
level's size divides the next. Two small collections sit beside the raw one:

- `<collection>_tokens`: {_id: bucket key, token}. After every batch it writes, the
  server sets a fresh random token on every bucket the batch touches, minutes first,
  then hours, days and spans (`touch`).
- `<collection>_seals`: {_id: bucket key, token, total: [7 counts], parts: {child: [7]}}.
  Written only by readers (`count`): the bucket's counts, computed under `token`.

A reader trusts a seal only while its token is the bucket's current token, and
otherwise computes the bucket again (from the raw documents for a minute, from the
children's seals above that) and seals it under the token it read first.

Why the answer is exact (no transactions, and last-writer-wins whole-document writes
are all that is assumed, which is what FerretDB 1.24 offers):
1. Every raw insert into a bucket is followed by a token write on that bucket and on
   each bucket above it, in that order, with a value never used before. A crash
   between the insert and the token writes leaves the batch unacknowledged: its
   redelivery inserts duplicates (ignored) and repeats the token writes.
2. A seal is computed from data read after its token T was read: the parent's token
   is read before its children's tokens and seals, and those before the raw documents.
   A document that landed in the bucket and is missing from what was read has its
   token write on that bucket still to come, which replaces T for good (a token value
   is never written twice), so the seal is never trusted again. Two writers racing on
   a token can only lose a token write to another token write: the value still changes.
3. Two readers sealing one bucket each write a consistent (token, counts) pair.
Counts are never incremented, so no increment can be lost. An answer can lag the raw
documents only while a batch sits between its insert and its token writes.
"""

import uuid
from datetime import datetime, timedelta, timezone

from pymongo import ReplaceOne, UpdateOne
from pymongo.errors import BulkWriteError

LEVELS = (("minute", 60), ("hour", 3600), ("day", 86400), ("span", 32 * 86400))
MINUTE, TOP = 0, len(LEVELS) - 1
STATUSES = 7
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Keys sort by time within a level: a fixed width, and an offset that keeps year 1 positive.
KEY_OFFSET = 10**11
DUPLICATE_KEY = 11000


def key(level, index):
    return f"{LEVELS[level][0]}:{index + KEY_OFFSET:012d}"


def epoch_seconds(moment):
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - EPOCH) // timedelta(seconds=1)


def tokens_of(collection):
    return collection.database[collection.name + "_tokens"]


def seals_of(collection):
    return collection.database[collection.name + "_seals"]


# -- writer side (server.py) ------------------------------------------------------

def touch(collection, documents):
    """Invalidate every bucket the documents fall in; call after inserting them, before acknowledging."""
    seconds = {epoch_seconds(document["timestamp"]) for document in documents}
    buckets = [key(level, index) for level, (_, size) in enumerate(LEVELS)
               for index in sorted({second // size for second in seconds})]
    while buckets:
        updates = [UpdateOne({"_id": bucket}, {"$set": {"token": uuid.uuid4().hex}}, upsert=True) for bucket in buckets]
        try:
            tokens_of(collection).bulk_write(updates, ordered=True)
            return
        except BulkWriteError as error:
            # Two upserts of a new key can race; the key exists now, so write them all again.
            if any(e["code"] != DUPLICATE_KEY for e in error.details["writeErrors"]):
                raise


# -- reader side (api.py) ---------------------------------------------------------

def raw_counts(collection, start, end):
    """[count per status] of raw documents with start <= timestamp < end: the definition."""
    counts = [0] * STATUSES
    pipeline = [{"$match": {"timestamp": {"$gte": start, "$lt": end}}},
                {"$group": {"_id": "$status", "count": {"$sum": 1}}}]
    for row in collection.aggregate(pipeline):
        counts[row["_id"]] = row["count"]
    return counts


def count(collection, start, end):
    """[count per status] with start <= timestamp < end, from seals where the bounds allow."""
    first_second = -(-(start - EPOCH) // timedelta(seconds=1))  # whole seconds inside the range
    last_second = epoch_seconds(end)
    if first_second >= last_second:
        return raw_counts(collection, start, end)
    counts = _Reader(collection).count(first_second, last_second)
    for edge_start, edge_end in ((start, EPOCH + timedelta(seconds=first_second)),
                                 (EPOCH + timedelta(seconds=last_second), end)):
        if edge_start < edge_end:  # a bound inside a second: the fraction comes from raw documents
            counts = [a + b for a, b in zip(counts, raw_counts(collection, edge_start, edge_end))]
    return counts


EMPTY = {"total": [0] * STATUSES, "parts": {}}


class _Reader:
    def __init__(self, collection):
        self._raw = collection
        self._tokens = tokens_of(collection)
        self._seals = seals_of(collection)

    def count(self, low, high):
        """Counts for whole seconds [low, high)."""
        counts = [0] * STATUSES
        size = LEVELS[TOP][1]
        for index in range(low // size, (high - 1) // size + 1):
            self._add_part(TOP, index, low, high, counts)
        return counts

    def _add_part(self, level, index, low, high, counts):
        size = LEVELS[level][1]
        bucket_low, bucket_high = index * size, (index + 1) * size
        low, high = max(low, bucket_low), min(high, bucket_high)
        if low >= high:
            return
        if (low, high) == (bucket_low, bucket_high):
            _add(counts, self._seal(level, index)["total"])
            return
        child_size = LEVELS[level - 1][1] if level > MINUTE else 1
        first_child, last_child = low // child_size, (high - 1) // child_size
        if level > MINUTE and last_child - first_child < 2:
            for child in range(first_child, last_child + 1):  # cheaper than this bucket's seal
                self._add_part(level - 1, child, low, high, counts)
            return
        for offset, child_counts in self._seal(level, index)["parts"].items():
            child = bucket_low // child_size + int(offset)
            child_low, child_high = child * child_size, (child + 1) * child_size
            if low <= child_low and child_high <= high:
                _add(counts, child_counts)
            elif child_low < high and low < child_high:
                self._add_part(level - 1, child, low, high, counts)

    def _seal(self, level, index):
        bucket = key(level, index)
        token = self._tokens.find_one({"_id": bucket})
        if token is None:
            return EMPTY  # no document ever landed in it
        seal = self._seals.find_one({"_id": bucket})
        if seal is not None and seal["token"] == token["token"]:
            return seal
        return self._reseal(level, index, token["token"])

    def _reseal(self, level, index, token):
        """Compute the bucket and every stale bucket below it, bottom-up, and seal them."""
        stale = {level: {index: token}}
        current = {}  # (level, index) -> trusted seal
        ratio = 1
        for child_level in range(level - 1, MINUTE - 1, -1):  # top-down: parents' tokens first
            ratio *= LEVELS[child_level + 1][1] // LEVELS[child_level][1]
            first, last = key(child_level, index * ratio), key(child_level, (index + 1) * ratio - 1)
            in_span = {"_id": {"$gte": first, "$lte": last}}
            tokens = {doc["_id"]: doc["token"] for doc in self._tokens.find(in_span)}
            seals = {doc["_id"]: doc for doc in self._seals.find(in_span)}
            for child in range(index * ratio, (index + 1) * ratio):
                child_key = key(child_level, child)
                if child_key not in tokens:
                    continue
                seal = seals.get(child_key)
                if seal is not None and seal["token"] == tokens[child_key]:
                    current[(child_level, child)] = seal
                else:
                    stale.setdefault(child_level, {})[child] = tokens[child_key]
        computed = self._seal_minutes(stale.get(MINUTE, {}))
        for stale_level in range(MINUTE + 1, level + 1):
            child_ratio = LEVELS[stale_level][1] // LEVELS[stale_level - 1][1]
            for bucket, bucket_token in stale.get(stale_level, {}).items():
                parts = {}
                for offset in range(child_ratio):
                    child = (stale_level - 1, bucket * child_ratio + offset)
                    seal = computed.get(child) or current.get(child)
                    if seal is not None and any(seal["total"]):
                        parts[str(offset)] = seal["total"]
                computed[(stale_level, bucket)] = _seal_document(bucket_token, parts)
        writes = [ReplaceOne({"_id": key(*node)}, seal, upsert=True) for node, seal in computed.items()]
        try:
            self._seals.bulk_write(writes, ordered=False)
        except BulkWriteError as error:  # another reader sealed one first: its pair is as good
            if any(e["code"] != DUPLICATE_KEY for e in error.details["writeErrors"]):
                raise
        return computed[(level, index)]

    def _seal_minutes(self, stale_minutes):
        if not stale_minutes:
            return {}
        first, last = min(stale_minutes), max(stale_minutes)
        seconds = {minute: {} for minute in stale_minutes}
        query = {"timestamp": {"$gte": EPOCH + timedelta(minutes=first), "$lt": EPOCH + timedelta(minutes=last + 1)}}
        for document in self._raw.find(query, {"timestamp": 1, "status": 1, "_id": 0}):
            second = epoch_seconds(document["timestamp"])
            per_second = seconds.get(second // 60)
            if per_second is not None:
                per_second.setdefault(str(second % 60), [0] * STATUSES)[document["status"]] += 1
        return {(MINUTE, minute): _seal_document(stale_minutes[minute], seconds[minute]) for minute in stale_minutes}


def _seal_document(token, parts):
    total = [0] * STATUSES
    for counts in parts.values():
        _add(total, counts)
    return {"token": token, "total": total, "parts": parts}


def _add(counts, more):
    for status, number in enumerate(more):
        counts[status] += number
