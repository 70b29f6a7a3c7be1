"""Settings shared by client.py, server.py and api.py.

Every setting comes from the environment variable of the same name, else
from `.env` (docker compose's file, which `.env.example` shows), else from
`.data/secrets.env` (the passwords `scripts/services up` generated); the
defaults reach the services of both on localhost, as the users of
rabbitmq/definitions.json. A bad value stops the program at import time with
one line naming the variable, before any connection is tried.
"""

import math
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from dotenv import load_dotenv

ROOT = Path(__file__).resolve().parent
# Neither overrides what the environment says; the first file read wins over the second.
for _settings in (ROOT / ".env", ROOT / ".data" / "secrets.env"):
    try:
        load_dotenv(_settings)
    except OSError as error:  # .data/secrets.env is its owner's only
        sys.exit(f"config error: cannot read {_settings} ({error.strerror}): run as its owner, "
                 f"or set the passwords in the environment")


def _fail(name, value, expected):
    sys.exit(f"config error: {name}={value!r} is not {expected}")


# Query options whose values a URL shown in an error may keep: pika's URL parameters and MongoDB's
# connection string options that never hold a secret. Every other option's value is shown as ***.
_SHOWN_OPTIONS = frozenset(option.lower() for option in (
    "heartbeat", "connection_attempts", "retry_delay", "socket_timeout", "stack_timeout",
    "blocked_connection_timeout", "channel_max", "frame_max", "locale",
    "replicaSet", "tls", "ssl", "tlsCAFile", "authSource", "authMechanism", "directConnection", "readPreference", "w",
    "journal", "wTimeoutMS", "retryWrites", "retryReads", "appName", "compressors", "serverSelectionTimeoutMS",
    "connectTimeoutMS", "socketTimeoutMS", "timeoutMS", "maxPoolSize", "minPoolSize", "loadBalanced"))


def _redacted(url):
    """(`url` as it may be shown, [what it hides, as written and percent-decoded])."""
    hidden = []
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    # Everything up to the last @ is user information, whatever it holds: a password may hold an
    # unescaped @, /, ? or #, and a mistyped scheme (amqp:/) leaves no "://" to start from.
    userinfo, at, rest = rest.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        hidden.append(password)
        userinfo = f"{user}:***"
    path, question, query = rest.partition("?")
    if question:
        pairs = []
        for pair in query.replace(";", "&").split("&"):
            option, equals, value = pair.partition("=")
            if equals and unquote(option).lower() not in _SHOWN_OPTIONS:
                hidden.append(value)
                value = "***"
            pairs.append(f"{option}{equals}{value}")
        query = "&".join(pairs)
    hidden = [text for value in hidden for text in {value, unquote(value)} if text]
    return f"{scheme}{separator}{userinfo}{at}{path}{question}{query}", hidden


def redact(url):
    """`url` with its password, and the value of every query option that may hold a secret (any but
    _SHOWN_OPTIONS), as ***: what a log line or an error may show of it (amqp://pipeline:***@host/)."""
    return _redacted(url)[0]


def _url(name, default, schemes, check=None, value=None):
    """A URL of one of `schemes` that `check(value)`, if given, accepts (it raises whatever its
    library raises), or `default` when unset. `value`: one of several that `name` holds, instead
    of `name`'s own. Errors show the URL redacted, and the library's message without what it hides."""
    value = os.environ.get(name) if value is None else value
    if not value:
        return default
    shown, hidden = _redacted(value)
    try:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            _fail(name, shown, f"a URL of the form {schemes[0]}://host[:port]/...")
        if "," not in parts.netloc or "mongodb" not in schemes:  # a replica set's hosts: `check` reads their ports
            parts.port
    except ValueError:
        hint = (" (in a password, write / ? # @ : as %2F %3F %23 %40 %3A: urllib.parse.quote(password, safe=''))"
                if hidden else "")
        _fail(name, shown, f"a URL of the form {schemes[0]}://host[:port]/... with a numeric port{hint}")
    if check:
        try:
            check(value)
        except Exception as error:  # pika raises ValueError, TypeError or SyntaxError, pymongo its own
            reason = f"{error.__class__.__name__}: {error}"
            for text in sorted(hidden, key=len, reverse=True):
                reason = reason.replace(text, "***")
            _fail(name, shown, f"a URL {check.__doc__} ({reason})")
    return value


def _amqp_url(value):
    """pika accepts"""
    import pika  # here: api.py, which needs no AMQP, imports this module too

    pika.URLParameters(value)


def _mongodb_uri(value):
    """pymongo accepts"""
    if value.startswith("mongodb+srv://"):
        return  # parsing one resolves DNS: MongoClient says what is wrong, when it connects
    from pymongo import uri_parser

    uri_parser.parse_uri(value)


def _bearer_token(name):
    """None when unset or empty; else a token that RFC 6750's b64token grammar allows (what a client
    may send after "Bearer "), at least 16 characters long before any trailing =. An error never shows it."""
    value = os.environ.get(name, "")
    if not value:
        return None
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/")
    if len(value.rstrip("=")) < 16 or not set(value.rstrip("=")) <= allowed:
        _fail(name, "***", "a bearer token of at least 16 characters, of letters, digits and -._~+/ "
                           "(RFC 6750), = at the end only; e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
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


def _name(name, default, forbidden="", most=120):
    value = os.environ.get(name, default)
    if not value or len(value) > most or not value.isprintable() or " " in value or set(value) & set(forbidden):
        _fail(name, value, f"a non-empty name of at most {most} characters, without spaces"
                           + (f" or any of {forbidden}" if forbidden else ""))
    return value


def _flag(name):
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        _fail(name, value, "0 or 1")
    return value == "1"


def _ca_file(name, default):
    """A readable file of CA certificates (PEM); `default` (a path or None) when unset; None when
    set empty (no TLS)."""
    value = os.environ[name] if name in os.environ else default
    if value and not os.access(value, os.R_OK):
        _fail(name, value, "a readable file of CA certificates (PEM)")
    return value


# TLS (README "Security"). With a CA file, the default URLs below are the TLS listeners of
# scripts/services and docker-compose.yml, whose certificates are verified against it: by default
# the local CA that scripts/services generated, when there is one.
_LOCAL_CA = ROOT / ".data" / "tls" / "ca.pem"  # docker-compose.yml's services show its certificate too
TLS_CA_FILE = _ca_file("TLS_CA_FILE", str(_LOCAL_CA) if _LOCAL_CA.exists() else None)
# 1: a URL or an MQTT connection without TLS is a config error (scripts/services, given the same,
# turns its plain-text listeners off).
REQUIRE_TLS = _flag("REQUIRE_TLS")


def _local_mongodb_uri():
    """The MongoDB user `app` of scripts/services (FerretDB) and docker-compose.yml (mongo:7),
    whose password is MONGO_APP_PASSWORD, without one no user; in plain text on 127.0.0.1, or with
    REQUIRE_TLS over TLS (port 27018) against TLS_CA_FILE (README "Security": why not by default)."""
    password = os.environ.get("MONGO_APP_PASSWORD")
    user = f"app:{quote(password, safe='')}@" if password else ""
    options = ["authSource=admin"] if password else []
    if TLS_CA_FILE and REQUIRE_TLS:
        return f"mongodb://{user}localhost:27018/?" + "&".join(options + ["tls=true", f"tlsCAFile={quote(TLS_CA_FILE)}"])
    return f"mongodb://{user}localhost:27017/" + ("?" + "&".join(options) if options else "")


def _over_tls(name, value, uses_tls):
    if REQUIRE_TLS and value and not uses_tls:
        _fail(name, redact(value), "a URL over TLS, which REQUIRE_TLS=1 asks for (amqps://, or mongodb:// with tls=true)")
    return value


def _split_urls(value):
    return [url.strip() for url in re.split(r",\s*(?=amqps?://)", value.strip())]


def _amqp_urls(name):
    """The URLs of `name`, separated by commas: the nodes of a cluster, tried in turn. A comma starts
    a new URL only before amqp:// or amqps://, so one inside a URL (pika's ssl_options written out,
    a password) stays in it. Unset: None."""
    value = os.environ.get(name)
    if not value:
        return None
    urls = _split_urls(value)
    if not all(urls):
        _fail(name, ",".join(redact(url) for url in urls), "one URL, or several separated by commas, none of them empty")
    for url in urls:
        try:
            path = urlsplit(url).path
        except ValueError:  # _url() below says what is wrong with it
            path = ""
        if "," in path or path.count("/") > 1:  # a URL without its scheme, or a stray comma, run into the vhost
            _fail(name, ",".join(redact(url) for url in urls), "one URL, or several separated by commas, each "
                  "starting with amqp:// or amqps:// and naming one vhost (a / or , in it written %2F, %2C)")
        _url(name, None, ("amqp", "amqps"), _amqp_url, value=url)  # each checked, and shown in an error, alone
        _over_tls(name, url, url.startswith("amqps://"))
    return ",".join(urls)


# Set, every program logs in to RabbitMQ with it; unset, each as its own user (rabbitmq_url()).
RABBITMQ_URL = _amqp_urls("RABBITMQ_URL")
MONGO_URI = _url("MONGO_URI", _local_mongodb_uri(), ("mongodb", "mongodb+srv"), _mongodb_uri)
_MONGO_OPTIONS = [option.lower() for option in urlsplit(MONGO_URI).query.split("&")]
_over_tls("MONGO_URI", MONGO_URI, not {"tls=false", "ssl=false"} & set(_MONGO_OPTIONS) and (
    MONGO_URI.startswith("mongodb+srv://") or {"tls=true", "ssl=true"} & set(_MONGO_OPTIONS)))  # +srv: TLS by default
# MongoDB's own rules for names ("Naming Restrictions"): a database name has at most 64 characters
# and none of /\. "$; a collection name no $ (and the counts add at most 20 characters to it).
MONGO_DB = _name("MONGO_DB", "iot", forbidden='/\\."$', most=63)
MONGO_COLLECTION = _name("MONGO_COLLECTION", "status", forbidden="$", most=100)
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
# Set: every request but /health and the dashboard's page and scripts needs "Authorization: Bearer <it>".
API_TOKEN = _bearer_token("API_TOKEN")
# server.py's Prometheus metrics, served by its first process for all of them; 0: not served.
# Next to API_PORT: 9100, the first of Prometheus' exporter ports, is node_exporter's on many hosts.
METRICS_HOST = _name("METRICS_HOST", "127.0.0.1")
METRICS_PORT = _port_or_zero("METRICS_PORT", 5001)
# Set (by default TLS_CA_FILE), MQTT goes over TLS, the broker's certificate verified against it.
MQTT_TLS_CA = _ca_file("MQTT_TLS_CA", TLS_CA_FILE)
MQTT_PORT = _whole_number("MQTT_PORT", 8883 if MQTT_TLS_CA else 1883, 65535, "a port number")


def _host_ports(name, default, port):
    """[(host, port)] from `name`: comma-separated host or host:port ([v6]:port), `port` where
    none is given; the nodes of a cluster, tried in turn."""
    value = os.environ.get(name, default)
    pairs = []
    for item in value.split(","):
        item = item.strip()
        host, colon, number = item.rpartition(":") if not item.endswith("]") else ("", "", "")
        if not colon or ":" in host and not host.startswith("["):  # no port, or a bare IPv6 address
            host, number = item, str(port)
        if host.startswith("[") != host.endswith("]") or "/" in host:
            host = ""  # an IPv6 address opened and never closed, or a URL (mqtt://host)
        host = host.removeprefix("[").removesuffix("]")
        if (not host or " " in host or not host.isprintable() or not (number.isascii() and number.isdigit())
                or not 1 <= int(number) <= 65535):
            _fail(name, value, "host or host:port, several separated by commas (localhost:1883,localhost:1884)")
        pairs.append((host, int(number)))
    return pairs


# MQTT_HOST=localhost, or the nodes of a cluster: localhost:1883,localhost:1884,localhost:1885.
MQTT_HOSTS = _host_ports("MQTT_HOST", "localhost", MQTT_PORT)
MQTT_HOST, MQTT_PORT = MQTT_HOSTS[0]
# A device's user (scripts/services add-device NAME), which may publish to devices/NAME/status only.
MQTT_USERNAME = _name("MQTT_USERNAME", "") if os.environ.get("MQTT_USERNAME") else None
MQTT_PASSWORD = os.environ.get("MQTT_PASSWORD", "")


def rabbitmq_url(user):
    """RABBITMQ_URL when set (one URL, or several separated by commas); else the local broker (localhost:5672, or amqps on 5671 with
    TLS_CA_FILE; vhost /) as `user` of rabbitmq/definitions.json: admin, publisher (client.py) or
    pipeline (server.py), with the password in RABBITMQ_<USER>_PASSWORD. Neither set: exits with a
    config error saying what to do."""
    if RABBITMQ_URL:
        return RABBITMQ_URL
    variable = f"RABBITMQ_{user.upper()}_PASSWORD"
    password = os.environ.get(variable)
    if not password:
        sys.exit(f"config error: RABBITMQ_URL is not set, nor is {variable} for the user {user}: run "
                 f"scripts/services up (it writes .data/secrets.env), or set them (.env.example)")
    if REQUIRE_TLS and not TLS_CA_FILE:
        sys.exit("config error: REQUIRE_TLS=1, and there is neither RABBITMQ_URL nor TLS_CA_FILE to reach RabbitMQ over TLS")
    return local_amqp_url(user, password)


def amqp_parameters(urls):
    """pika.URLParameters for each of `urls`, comma-separated (rabbitmq_url()'s): the nodes to try in turn."""
    import pika

    return [pika.URLParameters(url) for url in _split_urls(urls)]


def node_name(parameters):
    """host:port of a pika.ConnectionParameters, as logs show a node ([v6]:port for an IPv6 address)."""
    host = f"[{parameters.host}]" if ":" in parameters.host else parameters.host
    return f"{host}:{parameters.port}"


def local_amqp_url(user, password, vhost="/"):
    """The local broker's URL for `user`: amqps on 5671, its certificate verified against
    TLS_CA_FILE (pika's ssl_options hold the CA and the name), or without a CA amqp on 5672."""
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    if TLS_CA_FILE:
        ssl_options = quote(repr({"ca_certs": TLS_CA_FILE, "server_hostname": "localhost"}), safe="")
        return f"amqps://{credentials}@localhost:5671/{quote(vhost, safe='')}?ssl_options={ssl_options}"
    return f"amqp://{credentials}@localhost:5672/{quote(vhost, safe='')}"
