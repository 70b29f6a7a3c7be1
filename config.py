"""Settings shared by client.py, server.py and api.py.

Every setting comes from the environment variable of the same name; the
defaults reach the services of both `docker compose up` and
`scripts/services up` on localhost. A bad value stops the program at import
time with one line naming the variable, before any connection is tried.
"""

import math
import os
import sys
from urllib.parse import urlsplit


def _fail(name, value, expected):
    sys.exit(f"config error: {name}={value!r} is not {expected}")


def _url(name, default, schemes):
    value = os.environ.get(name, default)
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        _fail(name, value, f"a URL of the form {schemes[0]}://host[:port]/...")
    try:
        parts.port
    except ValueError:
        _fail(name, value, "a URL with a numeric port")
    return value


def _whole_number(name, default, most, kind="a whole number"):
    value = os.environ.get(name, str(default))
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= most:
        _fail(name, value, f"{kind} between 1 and {most}")
    return int(value)


def _port_or_zero(name, default):
    value = os.environ.get(name, str(default))
    if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= 65535:
        _fail(name, value, "a port number, or 0 for none")
    return int(value)


def _seconds(name, default, most, least=0):
    """A number of seconds above 0, at least `least` and at most `most`."""
    value = os.environ.get(name, str(default))
    try:
        seconds = float(value) if value.isascii() else math.nan
    except ValueError:
        seconds = math.nan
    if not (0 < seconds and least <= seconds <= most):  # also refuses nan and inf
        _fail(name, value, f"a number of seconds {f'from {least:g}' if least else 'above 0'} and at most {most}")
    return seconds


def _usable_cores():
    """The cores this process may use: its CPU affinity, within a container's CPU quota."""
    cores = len(os.sched_getaffinity(0))
    try:  # cgroup v2, else v1
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
    except OSError:
        try:
            quota = open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read().strip()
            period = open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().strip()
        except OSError:
            return cores
    if quota in ("max", "-1"):
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def _name(name, default):
    value = os.environ.get(name, default)
    if not value or len(value) > 120 or not value.isprintable() or " " in value:
        _fail(name, value, "a non-empty name without spaces")
    return value


RABBITMQ_URL = _url("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/%2F", ("amqp", "amqps"))
MONGO_URI = _url("MONGO_URI", "mongodb://localhost:27017/", ("mongodb", "mongodb+srv"))
MONGO_DB = _name("MONGO_DB", "iot")
MONGO_COLLECTION = _name("MONGO_COLLECTION", "status")
EXCHANGE = _name("EXCHANGE", "status_exchange")
ROUTING_KEY = _name("ROUTING_KEY", "status_topic")
QUEUE = _name("QUEUE", "status_queue")
# One Python process keeps about one core busy; past a few, the queue itself is the limit.
SERVER_PROCESSES = _whole_number("SERVER_PROCESSES", min(_usable_cores(), 4), 64)
# Liveness bounds of server.py (README "Guarantees"); tests shorten them.
RABBITMQ_HEARTBEAT_SECONDS = _whole_number("RABBITMQ_HEARTBEAT_SECONDS", 30, 3600)
RABBITMQ_BLOCKED_SECONDS = _seconds("RABBITMQ_BLOCKED_SECONDS", 60, 86400)
# Well above a loaded store's slowest write: a write given up on is recovered by reading the raw
# collection, minutes per million documents on FerretDB, and batches meeting its documents wait.
# At least a second: below a store's ordinary latency every write would fail and be retried forever.
MONGO_WRITE_TIMEOUT_SECONDS = _seconds("MONGO_WRITE_TIMEOUT_SECONDS", 30, 3600, least=1)
MONGO_STARTUP_TIMEOUT_SECONDS = _seconds("MONGO_STARTUP_TIMEOUT_SECONDS", 600, 86400)
MONGO_OUTAGE_EXIT_SECONDS = _seconds("MONGO_OUTAGE_EXIT_SECONDS", 300, 86400)
API_HOST = _name("API_HOST", "127.0.0.1")
API_PORT = _whole_number("API_PORT", 5000, 65535, "a port number")
# server.py's Prometheus metrics, served by its first process for all of them; 0: not served.
# Next to API_PORT: 9100, the first of Prometheus' exporter ports, is node_exporter's on many hosts.
METRICS_HOST = _name("METRICS_HOST", "127.0.0.1")
METRICS_PORT = _port_or_zero("METRICS_PORT", 5001)
MQTT_HOST = _name("MQTT_HOST", "localhost")
MQTT_PORT = _whole_number("MQTT_PORT", 1883, 65535, "a port number")
MQTT_USERNAME = _name("MQTT_USERNAME", "guest")
MQTT_PASSWORD = os.environ.get("MQTT_PASSWORD", "guest")
