"""TLS on every hop: the listeners of scripts/services (AMQP 5671, MQTT 8883, the MongoDB wire
protocol 27018) show a certificate that the local CA of .data/tls signed for localhost and
127.0.0.1. Each client verifies it: a CA it does not know, even one of the same name, fails the
handshake, and the programs say so once and exit 1. With REQUIRE_TLS=1 (`make test` runs this
file that way too) the plain-text listeners are off and a plain-text URL is a config error."""

import os
import socket
import ssl
import subprocess
import sys
import urllib.parse

import pytest

import config
from conftest import ROOT

TLS_PORTS = {"AMQP": 5671, "MQTT": 8883, "MongoDB": 27018}
PLAIN_PORTS = {"AMQP": 5672, "MQTT": 1883, "MongoDB": 27017}


@pytest.fixture(scope="session")
def unknown_ca(tmp_path_factory):
    """A CA of the same name as the local one, with a key of its own."""
    path = tmp_path_factory.mktemp("unknown-ca") / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-keyout", str(path.with_suffix(".key")), "-out", str(path),
                    "-subj", "/CN=status-pipeline local CA"], check=True, capture_output=True, timeout=60)
    return str(path)


def handshake(port, cafile, server_hostname="localhost"):
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        with context.wrap_socket(connection, server_hostname=server_hostname) as tls:
            return tls.version()


def test_the_programs_use_tls_by_default_with_the_local_ca():
    assert config.TLS_CA_FILE == str(ROOT / ".data" / "tls" / "ca.pem")
    assert config.rabbitmq_url("publisher").startswith("amqps://publisher:")
    # MongoDB: plain text on 127.0.0.1 unless REQUIRE_TLS (README "Security": FerretDB's TLS listener under load)
    assert ("tls=true" in config.MONGO_URI and ":27018/" in config.MONGO_URI) == config.REQUIRE_TLS
    assert (config.MQTT_TLS_CA, config.MQTT_PORT) == (config.TLS_CA_FILE, 8883)


@pytest.mark.parametrize("protocol", TLS_PORTS)
def test_every_tls_listener_fails_an_unknown_ca_and_works_with_the_local_one(protocol, unknown_ca):
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate|certificate verify failed"):
        handshake(TLS_PORTS[protocol], unknown_ca)
    assert handshake(TLS_PORTS[protocol], config.TLS_CA_FILE) in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("protocol", TLS_PORTS)
def test_the_certificate_names_localhost_and_127_0_0_1_and_no_other_host(protocol):
    assert handshake(TLS_PORTS[protocol], config.TLS_CA_FILE, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|IP address mismatch"):
        handshake(TLS_PORTS[protocol], config.TLS_CA_FILE, "rabbitmq.example.com")


@pytest.mark.parametrize("protocol", PLAIN_PORTS)
def test_plain_text_listeners_are_off_with_require_tls_and_on_localhost_without(protocol):
    if config.REQUIRE_TLS:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", PLAIN_PORTS[protocol]), timeout=10).close()
    else:
        socket.create_connection(("127.0.0.1", PLAIN_PORTS[protocol]), timeout=10).close()


def run(script, env, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("transport", ["amqp", "mqtt"])
def test_the_client_with_an_unknown_ca_says_so_once_and_exits_1(transport, unknown_ca):
    result = run("client.py", {"TLS_CA_FILE": unknown_ca, "MQTT_USERNAME": "some-device", "MQTT_PASSWORD": "x"},
                 "--transport", transport, "--count", "1")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("certificate verify failed") == 1, output


def test_the_server_with_an_unknown_ca_for_rabbitmq_says_so_once_and_exits_1(unknown_ca):
    result = run("server.py", {"TLS_CA_FILE": unknown_ca, "MONGO_URI": config.MONGO_URI, "METRICS_PORT": "0"},
                 "--processes", "1")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "certificate verify failed" in output
    assert "Traceback" not in output


def test_the_api_with_an_unknown_ca_for_mongodb_is_unhealthy(fresh_app, unknown_ca):
    password = urllib.parse.quote(os.environ["MONGO_APP_PASSWORD"], safe="")
    uri = f"mongodb://app:{password}@localhost:27018/?authSource=admin&tls=true&tlsCAFile={urllib.parse.quote(unknown_ca)}"
    response = fresh_app(MONGO_URI=uri).test_client().get("/health")
    assert response.status_code == 503


@pytest.mark.parametrize("variable, value", [
    ("RABBITMQ_URL", "amqp://publisher:pw@localhost:5672/%2F"),
    ("MONGO_URI", "mongodb://app:pw@localhost:27017/?authSource=admin"),
    ("MONGO_URI", "mongodb://app:pw@localhost:27018/?tls=false"),
])
def test_with_require_tls_a_plain_text_url_is_a_config_error(variable, value):
    result = run("client.py" if variable == "RABBITMQ_URL" else "api.py", {"REQUIRE_TLS": "1", variable: value},
                 "--help")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"config error: {variable}=") and "REQUIRE_TLS=1" in result.stderr
    assert ":pw@" not in result.stderr
