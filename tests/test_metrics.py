"""Prometheus metrics: api.py's GET /metrics."""

import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    assert scrape(port)[("status_api_requests_total", (("code", "200"), ("endpoint", "/metrics")))] == 2
