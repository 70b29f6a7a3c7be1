"""Who may ask the API, and what no output may show: the bearer token of API_TOKEN (RFC 6750)
over a fresh real database per test and through the real api.py (waitress); the size limit of a
query string; and passwords in URLs, which no config error, log line or answer shows."""

import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone

import pytest

import config
from api import MAX_QUERY_BYTES
from conftest import MONGO_URI, RABBITMQ_URL, ROOT, free_port, wait_until
from counts import BatchWriter, Folder

TOKEN = "tZ3v-9Qe_Lk2.xR8~mW4+pN7/aB1cD6="  # every character RFC 6750's b64token allows
COUNT = "/status-count?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z"
SERIES = "/status-series?start=2026-11-27T00:00:00Z&end=2026-11-28T00:00:00Z&step=1h"
SECRET = "Pw-0f-th3-t3st5"  # the password put in every URL below: it must never be shown


@pytest.fixture
def app(fresh_app):
    app = fresh_app(API_TOKEN=TOKEN)
    moment = datetime(2026, 11, 27, 10, tzinfo=timezone.utc)
    BatchWriter(app.collection).write([{"status": 4, "timestamp": moment, "received_at": moment}])
    Folder(app.collection).fold_once()
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.mark.parametrize("authorization, invalid", [
    (None, False),
    (f"Bearer {TOKEN[:-1]}A", True),  # differs in the last character only
    (f"Bearer {TOKEN[1:]}", True),
    (f"Bearer {TOKEN}x", True),
    (f"Bearer {TOKEN.upper()}", True),
    (f"Bearer {TOKEN} {TOKEN}", True),
    ("Bearer", False),  # no token after the scheme: as if none were sent
    ("Bearer ", False),
    ("Bearer tökén-with-non-ascii-characters", True),
    (f"Basic {TOKEN}", False),  # another scheme: as if none were sent
    (TOKEN, False),
])
@pytest.mark.parametrize("path", [COUNT, SERIES, "/metrics", "/openapi.json"])
def test_without_the_right_token_every_endpoint_but_the_public_ones_is_401(client, path, authorization, invalid):
    response = client.get(path, headers={"Authorization": authorization} if authorization else {})
    assert response.status_code == 401
    assert "token" in response.get_json()["error"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="status API"')
    assert ('error="invalid_token"' in challenge) == invalid
    assert TOKEN not in response.get_data(as_text=True)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])  # a scheme is case-insensitive (RFC 9110, 11.1)
def test_the_right_token_answers(client, scheme):
    response = client.get(COUNT, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200
    assert response.get_json()["counts"]["4"] == 1 and response.get_json()["total"] == 1
    assert client.get(SERIES, headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/", "/static/dashboard.js", "/plotly.min.js"])
def test_health_and_the_dashboard_page_need_no_token(client, path):
    """They hold no data; a browser loads the page before the page can ask for the token."""
    assert client.get(path).status_code == 200


def test_a_path_or_method_no_route_has_is_404_or_405_without_the_token(client):
    assert client.get("/no-such-path").status_code == 404
    assert client.post("/health").status_code == 405 and client.post(COUNT).status_code == 405


def test_without_api_token_no_token_is_asked(fresh_app):
    client = fresh_app(API_TOKEN=None).test_client()
    assert client.get(COUNT).status_code == 200
    assert client.get(COUNT, headers={"Authorization": "Bearer anything"}).status_code == 200


@pytest.mark.parametrize("extra_bytes", [MAX_QUERY_BYTES, 20_000, 200_000])
def test_a_query_string_over_the_limit_is_414_before_the_token_is_checked(client, extra_bytes):
    response = client.get(f"{COUNT}&pad={'a' * extra_bytes}")
    assert response.status_code == 414
    assert f"at most {MAX_QUERY_BYTES}" in response.get_json()["error"]


def test_a_query_string_at_the_limit_is_read(client):
    query = COUNT.partition("?")[2]
    padded = f"{query}&pad={'a' * (MAX_QUERY_BYTES - len(query) - len('&pad='))}"
    assert len(padded) == MAX_QUERY_BYTES
    assert client.get(f"/status-count?{padded}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def http_get(url, headers=None):
    """(status, {lower-case header name: value}, body)"""
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        return response.status, {name.lower(): value for name, value in response.headers.items()}, response.read().decode()


def test_the_real_api_asks_for_the_token_and_never_logs_it(mongo, tmp_path):
    """python api.py, as a user starts it, with API_TOKEN in its environment."""
    port, database = free_port(), f"test_security_{uuid.uuid4().hex[:10]}"
    log = tmp_path / "api.log"
    env = {**os.environ, "API_PORT": str(port), "API_TOKEN": TOKEN, "MONGO_URI": MONGO_URI, "MONGO_DB": database}
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "api.py")], env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "Serving on" in log.read_text(), 30, "api.py to serve")
        status, headers, body = http_get(base + COUNT)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer") and '"error"' in body
        assert http_get(base + COUNT, {"Authorization": f"Bearer {TOKEN[:-1]}B"})[0] == 401
        assert http_get(base + COUNT, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert http_get(base + "/health")[0] == 200
        assert http_get(f"{base}{COUNT}&pad={'a' * 10_000}")[0] == 414
        status, _, _ = http_get(f"{base}{COUNT}&pad={'a' * 300_000}")  # past waitress's own limit
        assert 400 <= status < 500
    finally:
        process.terminate()
        process.wait(30)
        mongo.drop_database(database)
    assert TOKEN not in log.read_text()


def run_script(script, env):
    return subprocess.run([sys.executable, str(ROOT / script), *(["--count", "1"] if script == "client.py" else [])],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("url, shown", [
    (f"amqp://pipeline:{SECRET}@rabbit:5671/%2F", "amqp://pipeline:***@rabbit:5671/%2F"),
    (f"amqp://pipeline:a/{SECRET}@rabbit/", "amqp://pipeline:***@rabbit/"),  # unescaped / # ? @ in a password
    (f"amqp://pipeline:a#{SECRET}@rabbit/", "amqp://pipeline:***@rabbit/"),
    (f"amqp://pipeline:a?{SECRET}@rabbit/", "amqp://pipeline:***@rabbit/"),
    (f"amqp://pipeline:a@{SECRET}@rabbit/", "amqp://pipeline:***@rabbit/"),
    (f"amqp:/pipeline:{SECRET}@rabbit/", "amqp:***@rabbit/"),  # a mistyped scheme
    (f"pipeline:{SECRET}@rabbit", "pipeline:***@rabbit"),
    (f"mongodb://app:{SECRET}@db1:27017,db2:27017/iot?replicaSet=rs0&authSource=admin",
     "mongodb://app:***@db1:27017,db2:27017/iot?replicaSet=rs0&authSource=admin"),
    (f"mongodb://db/?authMechanismProperties=AWS_SESSION_TOKEN:{SECRET}&tls=true",
     "mongodb://db/?authMechanismProperties=***&tls=true"),
    (f"mongodb://db/?tlsCertificateKeyFile%50assword={SECRET};w=1", "mongodb://db/?tlsCertificateKeyFile%50assword=***&w=1"),
    (f"amqps://db/?ssl_options=%7B%27password%27%3A%27{SECRET}%27%7D&heartbeat=5", "amqps://db/?ssl_options=***&heartbeat=5"),
    ("amqp://guest@localhost/", "amqp://guest@localhost/"),  # nothing to hide
    ("mongodb://localhost:27017/", "mongodb://localhost:27017/"),
])
def test_redact_hides_the_password_and_every_option_that_may_hold_a_secret(url, shown):
    assert config.redact(url) == shown


@pytest.mark.parametrize("variable, value", [
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@:5672/"),  # no host
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@localhost:port/"),
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@localhost/?heartbeat=soon"),  # pika refuses the option
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@localhost/?no_such_option=1"),
    ("RABBITMQ_URL", f"pipeline:{SECRET}@localhost:5672"),  # no scheme
    ("RABBITMQ_URL", f"amqp:/pipeline:{SECRET}@localhost/"),
    ("RABBITMQ_URL", f"amqp://pipeline:a/{SECRET}@localhost/"),
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@[::1/"),
    ("RABBITMQ_URL", f"amqp://pipeline:pw@localhost/?ssl_options=%7B%27password%27%3A%27{SECRET}%27"),  # a SyntaxError
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@localhost/?ssl_options=1"),  # a TypeError
    ("RABBITMQ_URL", f"amqp://pipeline:{SECRET}@localhost:5681/%2F,pipeline:{SECRET}@localhost:5682/%2F"),  # a scheme left out
    ("MONGO_URI", f"mongodb://pipeline:{SECRET}@localhost/?tls=perhaps"),  # pymongo refuses the option
    ("MONGO_URI", f"mongodb://pipeline:{SECRET}@x@localhost/"),  # an @ not escaped
    ("MONGO_URI", f"mongodb://pipeline:{SECRET}@h1:27017,h2:x/?replicaSet=rs"),
    ("MONGO_URI", f"mongodb://pipeline:pw@localhost/?tlsCertificateKeyFilePassword={SECRET}&tls=perhaps"),
    ("MONGO_URI", f"http://pipeline:{SECRET}@localhost/"),
    ("MONGO_URI", f"mongodb://localhost/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{SECRET}"
                  "&tls=perhaps"),
    ("API_TOKEN", SECRET[:8]),  # too short
    ("API_TOKEN", f"{SECRET} {SECRET}"),  # a space
    ("API_TOKEN", f"{SECRET}é{SECRET}"),
    ("API_TOKEN", f"{SECRET[:4]}" + "=" * 20),  # long only with its padding
])
@pytest.mark.parametrize("script", ["server.py", "client.py", "api.py"])
def test_a_bad_setting_holding_a_secret_is_one_line_that_hides_it(script, variable, value):
    result = run_script(script, {variable: value})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"config error: {variable}=")
    assert "***" in result.stderr
    assert SECRET not in result.stdout + result.stderr and SECRET[:8] not in result.stderr


def test_a_replica_set_uri_is_accepted():
    """Several hosts, as users of a MongoDB replica set write them."""
    result = subprocess.run([sys.executable, "-c", "import config; print(config.redact(config.MONGO_URI))"],
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin", "MONGO_URI":
                                           f"mongodb://app:{SECRET}@db1:27017,db2:27017,db3:27017/iot?replicaSet=rs0"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mongodb://app:***@db1:27017,db2:27017,db3:27017/iot?replicaSet=rs0"


@pytest.mark.parametrize("script", ["server.py", "client.py"])
def test_a_wrong_rabbitmq_password_is_said_once_and_exits_without_showing_it(script):
    parts = urllib.parse.urlsplit(RABBITMQ_URL)
    wrong = parts._replace(netloc=f"{parts.username}:{SECRET}@{parts.hostname}:{parts.port or 5672}").geturl()
    result = run_script(script, {"RABBITMQ_URL": wrong, "MONGO_URI": MONGO_URI, "METRICS_PORT": "0",
                                 "MONGO_DB": f"test_security_{uuid.uuid4().hex[:10]}", "SERVER_PROCESSES": "1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert output.count("RabbitMQ refused the credentials in RABBITMQ_URL") == 1, output
    assert SECRET not in output


def test_a_wrong_mqtt_password_is_said_once_and_exits_without_showing_it():
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--transport", "mqtt", "--count", "3"],
                            env={"PATH": "/usr/bin:/bin", "MQTT_USERNAME": "some-device", "MQTT_PASSWORD": SECRET},
                            capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("MQTT broker refused the connection: Bad user name or password") == 1, output
    assert SECRET not in output


def test_a_refused_mongodb_login_is_said_once_and_stops_the_server_and_shows_in_health(fresh_app):
    """The user `app` of scripts/services, with a wrong password."""
    parts = urllib.parse.urlsplit(MONGO_URI)
    uri = parts._replace(netloc=f"app:{SECRET}@{parts.hostname}:{parts.port}").geturl()
    result = run_script("server.py", {"MONGO_URI": uri, "METRICS_PORT": "0", "SERVER_PROCESSES": "1",
                                      "MONGO_DB": f"test_security_{uuid.uuid4().hex[:10]}"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("MongoDB refused the credentials in MONGO_URI") == 1, output
    assert SECRET not in output
    response = fresh_app(MONGO_URI=uri).test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json()["error"] == "MongoDB refused the credentials in MONGO_URI"


@pytest.mark.parametrize("script", ["server.py", "api.py"])
def test_a_mongodb_srv_name_that_does_not_resolve_is_one_line(script):
    result = run_script(script, {"MONGO_URI": f"mongodb+srv://pipeline:{SECRET}@nohost.invalid/", "METRICS_PORT": "0"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "MONGO_URI mongodb+srv://pipeline:***@nohost.invalid/" in output
    assert SECRET not in output


def test_a_rabbitmq_host_that_does_not_resolve_is_an_outage_not_a_crash(tmp_path):
    log = tmp_path / "server.log"
    env = {"PATH": "/usr/bin:/bin", "RABBITMQ_URL": f"amqp://pipeline:{SECRET}@nohost.invalid:5672/%2F",
           "MONGO_URI": MONGO_URI, "MONGO_DB": f"test_security_{uuid.uuid4().hex[:10]}", "METRICS_PORT": "0"}
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--processes", "1"], env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "cannot connect to RabbitMQ" in log.read_text(), 30, "the server to say it cannot connect")
        assert process.poll() is None  # it keeps trying, as for any outage
    finally:
        process.terminate()
        assert process.wait(30) == 0
    assert "Traceback" not in log.read_text() and SECRET not in log.read_text()
