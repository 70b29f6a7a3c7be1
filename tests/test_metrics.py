"""Prometheus metrics: api.py's GET /metrics, and server.py's on METRICS_PORT, summed over its processes."""

import os
import re
import socket
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_until
from messages import INVALID_KINDS
from test_processes import consuming_pids


def scrape(port, path="/metrics"):
    """{(sample name, ((label, value), ...)): value} of one scrape, or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_api_counts_requests_by_endpoint_and_code_and_times_them(pipeline):
    port = free_port()
    api = pipeline.start("api.py", env={"API_PORT": str(port)})
    wait_until(lambda: scrape(port) is not None or api.poll() is not None, timeout=30, what="api.py to answer")
    assert api.poll() is None, pipeline.log(api)

    day = "start=2026-11-27&end=2026-11-28"
    assert [get(port, f"/status-count?{day}"), get(port, f"/status-count?{day}"),
            get(port, "/status-count?start=yesterday&end=2026-11-28"), get(port, f"/status-series?{day}"),
            get(port, "/health"), get(port, "/nope")] == [200, 200, 400, 400, 200, 404]

    samples = scrape(port)
    requests = {labels: value for (name, labels), value in samples.items() if name == "status_api_requests_total"}
    assert requests == {
        (("code", "200"), ("endpoint", "/status-count")): 2,
        (("code", "400"), ("endpoint", "/status-count")): 1,
        (("code", "400"), ("endpoint", "/status-series")): 1,
        (("code", "200"), ("endpoint", "/health")): 1,
        (("code", "404"), ("endpoint", "unmatched")): 1,
        (("code", "200"), ("endpoint", "/metrics")): 1,  # the scrape that waited for api.py
    }, requests
    histogram = "status_api_request_duration_seconds"
    assert samples[(f"{histogram}_count", (("endpoint", "/status-count"),))] == 3
    assert samples[(f"{histogram}_bucket", (("endpoint", "/status-count"), ("le", "+Inf")))] == 3
    assert 0 < samples[(f"{histogram}_sum", (("endpoint", "/status-count"),))] < 30
    assert samples[(f"{histogram}_count", (("endpoint", "/health"),))] == 1
    assert samples[("status_api_count_reads_started_over_total", ())] == 0  # nothing folds here
    assert scrape(port)[("status_api_requests_total", (("code", "200"), ("endpoint", "/metrics")))] == 2


# Invalid messages and the kind each is counted under.
INVALID = [
    (b"status=3", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"status": 9}', "invalid_status"),
    (b'{"status": 1, "timestamp": "2999-01-01T00:00:00Z"}', "future_timestamp"),
    (b'{"status": 1, "device_id": 42}', "invalid_device_id"),
]


def server_sums(port):
    """The server's counters: received, stored, duplicate and {reason: dead-lettered}, or None."""
    samples = scrape(port)
    if samples is None:
        return None
    return (samples[("status_server_messages_received_total", ())],
            samples[("status_server_messages_stored_total", ())],
            samples[("status_server_messages_duplicate_total", ())],
            {dict(labels)["reason"]: value for (name, labels), value in samples.items()
             if name == "status_server_messages_dead_lettered_total"})


def test_server_metrics_add_up_over_its_processes(pipeline):
    port = free_port()
    server = pipeline.start_server(env={"SERVER_PROCESSES": "2", "METRICS_PORT": str(port)})
    wait_until(lambda: len(consuming_pids(pipeline, server)) == 2, timeout=30, what="both processes to consume")
    directory = re.search(r"serving metrics on http://127\.0\.0\.1:\d+/metrics, .* in (\S+)", pipeline.log(server))[1]
    started = time.time()

    client = pipeline.run_client("--count", 3000, "--interval", 0)
    assert client.returncode == 0, pipeline.log(client)
    for raw, _ in INVALID:
        pipeline.publish(raw)
    pipeline.publish({"status": 1}, routing_key="no.such.binding")
    pipeline.publish({"status": 2, "message_id": "published-twice"})
    pipeline.publish({"status": 2, "message_id": "published-twice"})

    dead = dict.fromkeys(INVALID_KINDS + ("unroutable", "store_refused", "server_error"), 0)
    for _, kind in INVALID:
        dead[kind] += 1
    dead["unroutable"] = 1
    expected = (3000 + len(INVALID) + 1 + 2, 3001, 1, dead)
    deadline = time.monotonic() + 60
    while (sums := server_sums(port)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sums == expected

    samples = scrape(port)
    assert samples[("status_server_rabbitmq_up", ())] == 1
    assert samples[("status_server_mongodb_up", ())] == 1
    assert started <= samples[("status_server_last_stored_timestamp_seconds", ())] <= time.time()
    writes = samples[("status_server_batch_write_duration_seconds_count", ())]
    assert writes >= 2 and samples[("status_server_batch_write_duration_seconds_bucket", (("le", "+Inf"),))] == writes
    assert 0 < samples[("status_server_batch_write_duration_seconds_sum", ())] < 60 * writes

    assert pipeline.stop(server) == 0, pipeline.log(server)
    # Both processes did part of the work, so the sums above were over both.
    stored = [int(count) for count in re.findall(r"stopped: (\d+) stored", pipeline.log(server))]
    assert len(stored) == 2 and min(stored) > 0 and sum(stored) == 3001 + 1, stored
    assert not os.path.exists(directory)


def test_a_metrics_port_in_use_stops_the_server_with_one_line(pipeline):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = pipeline.start("server.py", env={"METRICS_PORT": str(port)})
        assert server.wait(30) == 1, pipeline.log(server)
    log = pipeline.log(server)
    assert f"cannot serve metrics on 127.0.0.1:{port} (METRICS_HOST, METRICS_PORT; 0 serves none)" in log
    assert "Traceback" not in log and "consuming" not in log
