"""Exact status counts whose cost does not grow with the number of stored messages.

Time is cut into buckets at four levels: minute, hour, day and span (32 days); each
level's size divides the next. Every bucket has two small documents, kept beside those
of its siblings, under its parent bucket (`<collection>_rollup_hour_<n>` holds the
tokens of the 60 minutes of hour n and `<collection>_rollup_hour_<n>_seals` their
seals, and so on up to `<collection>_rollup_all` for the spans):

- its token, `{_id: "token:<bucket>", token}`: after every batch it writes, the server
  sets a fresh random token on every bucket the batch touches, minutes first, then
  hours, days and spans (`touch`);
- its seal, `{_id: "seal:<bucket>", token, total: [7 counts], parts: "child:7 counts;..."}`:
  the bucket's counts computed under that token, written only by readers (`count`).

A reader uses a seal only while its token is the bucket's current token; otherwise it
computes the bucket again (from the raw documents for a minute, from its children's
seals above that) and seals it under the token it read first. Collections stay small
(at most 60 documents; the spans' gain about 11 a year) because FerretDB 1.24 on
SQLite finds even `{_id: value}` by scanning its table: every lookup and update costs
the bytes of its collection. For the
same reason tokens, which the server rewrites after every batch, are kept apart from the
bigger seals, and a seal's parts are one string rather than a document of 60 fields
(FerretDB stores a type schema beside every field: ten times the bytes).

Why the answer is exact (no transactions, and last-writer-wins whole-document writes
are all that is assumed, which is what FerretDB 1.24 offers):
1. Every raw insert into a bucket is followed by a token write on that bucket and on
   each bucket above it, in that order, with a value never used before. A crash
   between the insert and the token writes leaves the batch unacknowledged: its
   redelivery inserts duplicates (ignored) and repeats the token writes.
2. A seal is computed from data read after its token T was read: a bucket's token
   (kept under its parent) is read before its children's tokens and seals (kept under
   it), and those before the raw documents. A document that landed in the bucket and
   is missing from what was read has its token write on the bucket still to come,
   which replaces T for good (no token value is written twice), so the seal is never
   trusted again. Tokens and seals are separate documents, so a writer's token write
   and a reader's seal write never overwrite each other; two writers racing on a token
   can only lose a token write to another token write, and the value still changes.
3. Two readers sealing the same bucket each write a consistent (token, counts) pair.
Counts are never incremented, so no increment can be lost. An answer can lag the raw
documents only while a batch sits between its insert and its token writes.
"""

import math
import uuid
from datetime import datetime, timedelta, timezone

from pymongo.errors import OperationFailure

import messages

LEVELS = (("minute", 60), ("hour", 3600), ("day", 86400), ("span", 32 * 86400))
MINUTE, TOP = 0, 3
STATUSES = len(messages.STATUSES)  # counts are lists indexed by status
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# timestamp() is the exact count of microseconds divided by 10**6, correctly rounded. While
# a float's spacing is at most 1 µs (below 2**33 s, years 1698..2242) that rounding cannot
# carry a time across a whole second, so its floor is the second.
FLOAT_EXACT_SECONDS = 2**33
KEY_OFFSET = 10**11  # keeps the bucket numbers of year 1 positive
DUPLICATE_KEY = 11000
EMPTY = {"total": [0] * STATUSES, "parts": {}}
TOKENS, SEALS = "", "_seals"  # collection name suffixes


def bucket_name(level, index):
    return f"{LEVELS[level][0]}_{index + KEY_OFFSET}"


def epoch_seconds(moment):
    """The whole second a datetime falls in (naive means UTC), as seconds since 1970."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = moment.timestamp()  # four times faster than the exact form below, which the server pays per message
    if -FLOAT_EXACT_SECONDS < seconds < FLOAT_EXACT_SECONDS:
        return math.floor(seconds)
    return (moment - EPOCH) // timedelta(seconds=1)


def children_of(collection, level, index, kind=TOKENS):
    """The collection that holds the tokens (or seals) of the children of one bucket (level None: the spans)."""
    parent = "all" if level is None else bucket_name(level, index)
    return collection.database[f"{collection.name}_rollup_{parent}{kind}"]


def home_of(collection, level, index, kind=TOKENS):
    """The collection that holds one bucket's token (or seal): under its parent."""
    if level == TOP:
        return children_of(collection, None, None, kind)
    ratio = LEVELS[level + 1][1] // LEVELS[level][1]
    return children_of(collection, level + 1, index // ratio, kind)


def _upsert_all(target, statements):
    """Run the update `statements()` in order, as one command; an upsert that raced another
    on a new _id fails as a duplicate and runs again, since the _id exists now. A raw command,
    because FerretDB 1.24 answers such a race without the counts pymongo's bulk API expects."""
    concern = {"writeConcern": target.write_concern.document} if target.write_concern.document else {}
    while True:
        reply = target.database.command("update", target.name, updates=statements(), ordered=True, **concern)
        errors = reply.get("writeErrors", [])
        if "writeConcernError" in reply or any(e["code"] != DUPLICATE_KEY for e in errors):
            raise OperationFailure(f"rollup write to {target.name} failed", details=reply)
        if not errors:
            return


# -- writer side (server.py) ------------------------------------------------------

def touch(collection, documents):
    """Invalidate every bucket the documents fall in; call after inserting them, before acknowledging."""
    seconds = {epoch_seconds(document["timestamp"]) for document in documents}
    for level, (_, size) in enumerate(LEVELS):  # minutes first: see the argument above
        by_home = {}
        for index in sorted({second // size for second in seconds}):
            by_home.setdefault(home_of(collection, level, index).name, []).append(f"token:{bucket_name(level, index)}")
        for name, tokens in by_home.items():
            _upsert_all(collection.database[name], lambda: [
                {"q": {"_id": _id}, "u": {"$set": {"token": uuid.uuid4().hex}}, "upsert": True} for _id in tokens])


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
    if start >= end:
        return [0] * STATUSES
    if first_second >= last_second:
        return raw_counts(collection, start, end)
    counts = _Reader(collection).count(first_second, last_second)
    for edge_start, edge_end in ((start, EPOCH + timedelta(seconds=first_second)),
                                 (EPOCH + timedelta(seconds=last_second), end)):
        if edge_start < edge_end:  # a bound inside a second: the fraction comes from raw documents
            counts = [a + b for a, b in zip(counts, raw_counts(collection, edge_start, edge_end))]
    return counts


class _Reader:
    def __init__(self, collection):
        self._raw = collection

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
        name = bucket_name(level, index)
        token = home_of(self._raw, level, index).find_one({"_id": f"token:{name}"})
        if token is None:
            return EMPTY  # no document ever landed in it
        seal = home_of(self._raw, level, index, SEALS).find_one({"_id": f"seal:{name}"})
        if seal is not None and seal["token"] == token["token"]:
            return dict(seal, parts=_decode_parts(seal["parts"]))
        return self._reseal(level, index, token["token"])

    def _reseal(self, level, index, token):
        """Compute the bucket and every stale bucket below it, and seal them bottom-up."""
        stale = {}  # (level, index) -> token it is computed under
        trusted = {}  # (level, index) -> its current seal
        self._find_stale(level, index, token, stale, trusted)
        computed = self._seal_minutes({i: t for (l, i), t in stale.items() if l == MINUTE})
        for stale_level in range(MINUTE + 1, level + 1):
            ratio = LEVELS[stale_level][1] // LEVELS[stale_level - 1][1]
            for (node_level, bucket), bucket_token in stale.items():
                if node_level == stale_level:
                    parts = {}
                    for offset in range(ratio):
                        child = (stale_level - 1, bucket * ratio + offset)
                        seal = computed.get(child) or trusted.get(child)
                        if seal is not None and any(seal["total"]):
                            parts[str(offset)] = seal["total"]
                    computed[(stale_level, bucket)] = _seal_document(bucket_token, parts)
        by_home = {}
        for (node_level, bucket), seal in computed.items():
            home = home_of(self._raw, node_level, bucket, SEALS).name
            by_home.setdefault(home, {})[f"seal:{bucket_name(node_level, bucket)}"] = seal
        for home, seals in by_home.items():
            _upsert_all(self._raw.database[home], lambda: [
                {"q": {"_id": _id}, "u": dict(seal, parts=_encode_parts(seal["parts"])), "upsert": True}
                for _id, seal in seals.items()])
        return computed[(level, index)]

    def _find_stale(self, level, index, token, stale, trusted):
        """Top-down: this bucket's token was read; now its children's tokens and seals, then theirs."""
        stale[(level, index)] = token
        if level == MINUTE:
            return
        documents = {d["_id"]: d for d in children_of(self._raw, level, index).find()}
        documents.update((d["_id"], d) for d in children_of(self._raw, level, index, SEALS).find({}, {"parts": 0}))
        ratio = LEVELS[level][1] // LEVELS[level - 1][1]
        for child in range(index * ratio, (index + 1) * ratio):
            name = bucket_name(level - 1, child)
            child_token = documents.get(f"token:{name}")
            if child_token is None:
                continue
            seal = documents.get(f"seal:{name}")
            if seal is not None and seal["token"] == child_token["token"]:
                trusted[(level - 1, child)] = seal
            else:
                self._find_stale(level - 1, child, child_token["token"], stale, trusted)

    def _seal_minutes(self, stale_minutes):
        """One read of the raw documents for all the stale minutes."""
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


def _encode_parts(parts):
    """{"offset": [7 counts]} -> "offset:c0,...,c6;..." """
    return ";".join(f"{offset}:{','.join(map(str, counts))}" for offset, counts in parts.items())


def _decode_parts(text):
    pairs = (part.split(":") for part in text.split(";") if part)
    return {offset: [int(count) for count in counts.split(",")] for offset, counts in pairs}


def _seal_document(token, parts):
    total = [0] * STATUSES
    for counts in parts.values():
        _add(total, counts)
    return {"token": token, "total": total, "parts": parts}


def _add(counts, more):
    for status, number in enumerate(more):
        counts[status] += number
