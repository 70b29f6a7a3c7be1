"""The README's screenshot of the dashboard, docs/dashboard.png (`make screenshot`).

An hour of demo messages goes into a database of its own (MONGO_URI, as configured), written
as server.py writes them; api.py's app serves it in a thread and Debian's headless Chromium
takes the picture, as tests/test_dashboard.py does. The database is dropped afterwards.

    .venv/bin/python scripts/screenshot.py [--output docs/dashboard.png]
"""

import argparse
import math
import random
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pymongo

import config
from api import create_app
from browser import LiveServer, chromium
from counts import BatchWriter, Folder

WEIGHTS = [34, 22, 14, 11, 9, 6, 4]  # how often each status 0..6 comes, roughly
DEADLINE_SECONDS = 60


def demo_messages(now, seed=7):
    """An hour of a fleet, minute by minute: a steady rate with a busier spell, and a spell in
    which status 5 comes more often."""
    rng = random.Random(seed)
    messages = []
    for minute in range(60):
        rate = 45 + 25 * math.exp(-((minute - 38) / 6) ** 2) + rng.uniform(-8, 8)
        weights = WEIGHTS[:5] + [WEIGHTS[5] * (5 if 20 <= minute < 27 else 1)] + WEIGHTS[6:]
        for _ in range(int(rate)):
            moment = now - timedelta(minutes=60 - minute) + timedelta(milliseconds=rng.randrange(60000))
            messages.append({"status": rng.choices(range(7), weights)[0], "timestamp": moment, "received_at": moment})
    return messages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()

    database = f"dashboard_screenshot_{uuid.uuid4().hex[:8]}"
    mongo = pymongo.MongoClient(config.MONGO_URI, tz_aware=True, serverSelectionTimeoutMS=5000)
    collection = mongo[database]["status"]
    app = server = browser = None
    try:
        messages = demo_messages(datetime.now(timezone.utc))
        writer = BatchWriter(collection)
        for first in range(0, len(messages), 2000):
            writer.write(messages[first:first + 2000])
        folder = Folder(collection)
        while folder.fold_once():
            pass
        app = create_app({"MONGO_URI": config.MONGO_URI, "MONGO_DB": database})
        server = LiveServer(app)
        browser = chromium(width=1100, height=540)
        browser.get(server.url)
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not browser.execute_script('return document.body.dataset.refreshes >= 1 && '
                                         'document.getElementById("chart").getAttribute("aria-busy") === "false"'):
            if time.monotonic() > deadline:
                sys.exit(f"screenshot: the dashboard drew nothing within {DEADLINE_SECONDS}s")
            time.sleep(0.1)
        problem = browser.execute_script('const m = document.getElementById("message"); return m.hidden ? null : m.textContent')
        if problem:
            sys.exit(f"screenshot: the dashboard says: {problem}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.output))
        print(f"screenshot: {len(messages)} demo messages, {args.output} ({args.output.stat().st_size:,} bytes)")
    finally:
        if browser:
            browser.quit()
        if server:
            server.stop()
        if app:
            app.extensions["mongo"].close()
        mongo.drop_database(database)
        mongo.close()


if __name__ == "__main__":
    main()
