"""Query benchmark: /status-count's kept-up counts against the naive aggregation, on the same data.

    .venv/bin/python bench/query.py                    # 1,000,000 messages over 30 days (make bench)
    .venv/bin/python bench/query.py --messages 20000 --queries 10   # quick

Loads the messages the way server.py writes them (counts.BatchWriter in batches of 2,000,
then the folder's rounds), then times a mix of ranges (30 days, 7 days with unaligned
millisecond bounds, 1 hour, 1 minute, empty) through counts.count, in two passes (the first
timed on its own as the warm-up, though nothing is computed on a read). For ranges that end
at now while messages arrive, see bench/live.py. The naive aggregation over the raw documents
is timed on the first --naive ranges of at most a day (on FerretDB 1.24 each one reads the whole
collection, about 47 s per million documents here, and holds in memory every document its $match
passes: a 30-day range over 10,000,000 took over 24 GB, and the kernel killed FerretDB), and
those answers must equal it; every answer is also checked against one pass over all the raw
documents. Prints a table and writes bench/results/query.json.

    .venv/bin/python bench/query.py --messages 10000000 --queries 20 --naive 1   # 10M
"""

import argparse
import bisect
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pymongo  # noqa: E402

import config  # noqa: E402
import counts  # noqa: E402
from server import create_indexes  # noqa: E402

END = datetime(2026, 11, 1, tzinfo=timezone.utc)
DAYS = 30


def load(collection, count):
    started = time.perf_counter()
    step = DAYS * 86400 / count
    writer, folder = counts.BatchWriter(collection), counts.Folder(collection)
    create_indexes(collection)  # as server.py does
    for first in range(0, count, 2000):
        documents = [{"_id": f"m{index}", "status": index % 7,
                      "timestamp": END - timedelta(days=DAYS) + timedelta(seconds=round(index * step, 3)),
                      "received_at": END}
                     for index in range(first, min(first + 2000, count))]
        writer.write(documents)
        if first % 100_000 == 0:
            folder.fold_once()
    while folder.fold_once():
        pass
    return time.perf_counter() - started


def mix(rng, queries):
    """(kind, start, end) ranges inside the data; all but the 30-day ones have millisecond bounds."""
    start_of_data = END - timedelta(days=DAYS)
    kinds = {"30 days": timedelta(days=30), "7 days unaligned": timedelta(days=7, seconds=3601 + 17),
             "1 hour": timedelta(hours=1), "1 minute": timedelta(minutes=1), "empty": timedelta(0)}
    ranges = []
    for index in range(queries):
        kind = list(kinds)[index % len(kinds)]
        length = kinds[kind]
        room = int((END - start_of_data - length).total_seconds())
        start = start_of_data + timedelta(seconds=rng.randrange(max(room, 1)) + (0 if kind == "30 days" else 7),
                                          milliseconds=0 if kind == "30 days" else rng.randrange(1000))
        ranges.append((kind, start, start + length))
    return ranges


def one_pass(collection, ranges):
    """(documents, [count per status] for every range) from one scan of the raw documents:
    the same definition as counts.raw_counts, start <= timestamp < end."""
    times = [[] for _ in range(counts.STATUSES)]  # epoch milliseconds, per status
    for document in collection.find({}, {"timestamp": 1, "status": 1, "_id": 0}, batch_size=10_000):
        times[document["status"]].append((document["timestamp"] - counts.EPOCH) // timedelta(milliseconds=1))
    for values in times:
        values.sort()
    answers = []
    for _, start, end in ranges:
        low, high = ((moment - counts.EPOCH) // timedelta(milliseconds=1) for moment in (start, end))
        answers.append([bisect.bisect_left(values, high) - bisect.bisect_left(values, low) for values in times])
    return sum(map(len, times)), answers


def store_name(mongo):
    info = mongo.server_info()
    return f"FerretDB {info['ferretdbVersion']}" if "ferretdbVersion" in info else f"MongoDB {info['version']}"


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=50, help="ranges in the mix")
    parser.add_argument("--naive", type=int, default=5, help="how many of them also run as the naive aggregation")
    parser.add_argument("--output", default=str(ROOT / "bench/results/query.json"))
    parser.add_argument("--keep", metavar="DATABASE", help="load into (or reuse) this database and keep it")
    args = parser.parse_args()
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True)
    database = mongo[args.keep or f"bench_query_{uuid.uuid4().hex[:8]}"]
    collection = database["status"]
    try:
        if args.keep and collection.name in database.list_collection_names():
            load_seconds = 0.0  # loaded by an earlier run (counting it here would scan it; one_pass checks it)
        else:
            mongo.drop_database(database.name)
            load_seconds = load(collection, args.messages)
        ranges = mix(random.Random(7), args.queries)
        warm_up, counts_ms_list, naive_ms, by_kind = [], [], [], {}
        for kind, start, end in ranges:  # first pass
            began = time.perf_counter()
            counts.count(collection, start, end)
            warm_up.append((time.perf_counter() - began) * 1000)
        answers = []
        for kind, start, end in ranges:
            began = time.perf_counter()
            answers.append(counts.count(collection, start, end))
            elapsed = (time.perf_counter() - began) * 1000
            counts_ms_list.append(elapsed)
            by_kind.setdefault(kind, []).append(elapsed)
        short = [(step, answer) for step, answer in zip(ranges, answers) if step[2] - step[1] <= timedelta(days=1)]
        for (kind, start, end), answer in short[:args.naive]:
            began = time.perf_counter()
            expected = counts.raw_counts(collection, start, end)
            naive_ms.append((time.perf_counter() - began) * 1000)
            if answer != expected:
                raise SystemExit(f"wrong answer for {kind} {start}..{end}: {answer} != {expected} (naive)")
        stored, expected_answers = one_pass(collection, ranges)
        if stored != args.messages:
            raise SystemExit(f"the collection holds {stored} documents, not {args.messages}")
        for (kind, start, end), answer, expected in zip(ranges, answers, expected_answers):
            if answer != expected:
                raise SystemExit(f"wrong answer for {kind} {start}..{end}: {answer} != {expected} (one pass)")
    finally:
        if not args.keep:
            mongo.drop_database(database.name)

    result = {
        "machine": {"cores": os.cpu_count(), "store": store_name(mongo)},
        "messages": args.messages, "days": DAYS, "queries": len(ranges), "naive_queries": len(naive_ms), "load_seconds": round(load_seconds, 1),
        "warm_up_ms": {"total": round(sum(warm_up)), "max": round(max(warm_up))},
        "counts_ms": {"p50": round(percentile(counts_ms_list, 0.5), 2), "p99": round(percentile(counts_ms_list, 0.99), 2)},
        "naive_ms": {"p50": round(percentile(naive_ms, 0.5), 1), "p99": round(percentile(naive_ms, 0.99), 1)},
        "p50_speedup": round(percentile(naive_ms, 0.5) / percentile(counts_ms_list, 0.5)),
        "counts_p50_ms_by_kind": {kind: round(statistics.median(values), 2) for kind, values in by_kind.items()},
        "all_answers_equal_raw": True,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"query, {args.messages:,} messages over {DAYS} days, {len(ranges)} ranges, store {result['machine']['store']}")
    print(f"{'':<28}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'kept-up counts':<28}{result['counts_ms']['p50']:>10}{result['counts_ms']['p99']:>10}")
    print(f"{'naive aggregation':<28}{result['naive_ms']['p50']:>10}{result['naive_ms']['p99']:>10}")
    print(f"p50 speed-up {result['p50_speedup']}x; every answer equal to the raw documents' "
          f"({len(naive_ms)} checked against the naive aggregation, all against one pass)")
    print(f"first pass: {result['warm_up_ms']['total']} ms in all; load {load_seconds:.0f} s")
    print("counts p50 by kind (ms): " + ", ".join(f"{k} {v}" for k, v in result["counts_p50_ms_by_kind"].items()))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
