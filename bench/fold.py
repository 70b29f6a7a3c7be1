"""Fold benchmark: how long the folder takes to count a backlog spread over days, by round size.

    .venv/bin/python bench/fold.py                          # 1,000,000 messages over 30 days
    .venv/bin/python bench/fold.py --messages 50000 --days 2   # quick

The same messages (timestamps spread over the last --days, in random order, as a fleet
flushing what it buffered) are written twice, to two databases, the way server.py writes
them (counts.BatchWriter, batches of 2,000). Then each is folded to the end by one folder:
(r) with the rounds as shipped (counts.MAX_ROUND_ENTRIES messages at most), and (s) with
rounds of at most --small-records records, the baseline. A round rewrites every hour it
touches, so on a spread backlog the number of rounds sets the cost. Prints the time, rounds
and peak memory (tracemalloc) of each, checks a few ranges against the raw documents, and
writes bench/results/fold.json.
"""

import argparse
import json
import random
import sys
import time
import tracemalloc
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pymongo  # noqa: E402

import config  # noqa: E402
import counts  # noqa: E402


def fold_all(collection, max_records):
    """(seconds, rounds, peak MiB) of one folder folding every record, with rounds of at most `max_records`."""
    saved = counts.MAX_RECORDS_PER_ROUND
    counts.MAX_RECORDS_PER_ROUND = max_records
    log = collection.database[f"{collection.name}_counts_log"]
    folder = counts.Folder(collection)
    tracemalloc.start()
    began, rounds = time.perf_counter(), 0
    try:
        while any(record["_id"].startswith("c:") for record in log.find({}, {"_id": 1})):
            if folder.fold_once():
                rounds += 1
            else:
                time.sleep(0.2)  # the end of a lease slot
        return time.perf_counter() - began, rounds, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
        counts.MAX_RECORDS_PER_ROUND = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--small-records", type=int, default=200, help="records per round of the baseline (s)")
    parser.add_argument("--output", default=str(ROOT / "bench/results/fold.json"))
    args = parser.parse_args()
    rng = random.Random(5)
    now = datetime.now(timezone.utc)
    span_ms = int(args.days * 86_400_000)
    documents = [{"_id": uuid.UUID(int=rng.getrandbits(128)).hex, "status": rng.randrange(7),
                  "timestamp": now - timedelta(milliseconds=rng.randrange(span_ms))} for _ in range(args.messages)]
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)
    run = uuid.uuid4().hex[:8]
    kinds = {"r": ("rounds as shipped", counts.MAX_RECORDS_PER_ROUND), "s": ("baseline", args.small_records)}
    collections = {kind: mongo[f"bench_fold_{kind}_{run}"]["status"] for kind in kinds}
    results = {}
    try:
        for collection in collections.values():
            writer = counts.BatchWriter(collection)
            for first in range(0, len(documents), 2000):
                writer.write([dict(document) for document in documents[first:first + 2000]])
        for kind, collection in collections.items():
            seconds, rounds, peak = fold_all(collection, kinds[kind][1])
            end = datetime.now(timezone.utc)
            for days in (1, 7, args.days + 1):
                start = end - timedelta(days=days, milliseconds=-3)
                if counts.count(collection, start, end) != counts.raw_counts(collection, start, end):
                    raise SystemExit(f"({kind}) a count over {days} days differs from the raw documents")
            results[kind] = {"what": kinds[kind][0], "max_records_per_round": kinds[kind][1],
                             "seconds": round(seconds, 1), "rounds": rounds, "peak_mib": round(peak)}
    finally:
        for collection in collections.values():
            mongo.drop_database(collection.database.name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"messages": args.messages, "days": args.days, **results}, indent=2) + "\n")
    print(f"folding {args.messages:,} messages spread over {args.days:g} days, in random order")
    print(f"{'':<56}{'seconds':>10}{'rounds':>8}{'peak MiB':>10}")
    for kind, result in results.items():
        label = f"({kind}) {result['what']}, {result['max_records_per_round']} records a round at most"
        print(f"{label:<56}{result['seconds']:>10}{result['rounds']:>8}{result['peak_mib']:>10}")
    print(f"(s) / (r) time: {results['s']['seconds'] / results['r']['seconds']:.2f}; every count checked equal to the raw documents")


if __name__ == "__main__":
    main()
