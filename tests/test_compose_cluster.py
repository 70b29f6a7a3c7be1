"""docker-compose.cluster.yml cannot run here (no Docker engine): what can be checked without it is
that it agrees with itself and with the repository (tests/test_compose.py checks that the files it
mounts exist, as for docker-compose.yml): its images are
official ones of a pinned major version, every password it asks for is one that `make .env` fills,
the RabbitMQ nodes that peer discovery lists are its RabbitMQ services, the replica set it initiates
is its MongoDB services on the ports they publish, and the settings its header gives the programs
reach those ports."""

import re
import subprocess
from urllib.parse import urlsplit

import pika
import pytest
import yaml
from pymongo import uri_parser

from conftest import ROOT

TEXT = (ROOT / "docker-compose.cluster.yml").read_text()
COMPOSE = yaml.safe_load(TEXT)
SERVICES = COMPOSE["services"]
SINGLE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
EXAMPLE = (ROOT / ".env.example").read_text()
HEADER = "\n".join(line for line in TEXT.splitlines() if line.startswith("#"))

RABBITMQ = [name for name, service in SERVICES.items() if service.get("image", "").startswith("rabbitmq:")]
MONGO = [name for name, service in SERVICES.items()
         if service.get("image", "").startswith("mongo:") and service.get("command", [""])[0] == "mongod"]
# Official Docker Hub images (no namespace, or docker.io/library/) with a tag that starts with a major version.
OFFICIAL_PINNED = re.compile(r"(?:docker\.io/library/)?[a-z0-9]+(?:[._-][a-z0-9]+)*:[0-9]+(?:[.-][A-Za-z0-9_.-]*)?")


def published(service):
    """[(host address, host port, container port)] of a service's ports, short syntax or long."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((port.get("host_ip"), int(port["published"]), int(port["target"])))
        else:
            address, host, container = (["", ""] + str(port).split("/")[0].split(":"))[-3:]
            ports.append((address, int(host) if host else None, int(container)))
    return ports


def host_port(service, container):
    (port,) = [host for _, host, inside in published(SERVICES[service]) if inside == container]
    return port


def option(command, name):
    return command[command.index(name) + 1]


def replica_set_script():
    return SERVICES["mongo-replica-set"]["command"][-1]


def test_three_rabbitmq_nodes_and_three_mongodb_members():
    assert RABBITMQ == ["rabbitmq1", "rabbitmq2", "rabbitmq3"]
    assert MONGO == ["mongo1", "mongo2", "mongo3"]


@pytest.mark.parametrize("image", ["rabbitmq:3-management", "mongo:7", "python:3.12-alpine", "docker.io/library/mongo:7.0"])
def test_an_official_image_of_a_pinned_major_version_passes(image):
    assert OFFICIAL_PINNED.fullmatch(image)


@pytest.mark.parametrize("image", ["mongo", "mongo:latest", "rabbitmq:management", "prom/prometheus:v3.5.0",
                                   "bitnami/rabbitmq:3", "docker.io/bitnami/mongo:7", "ghcr.io/owner/mongo:7",
                                   "mongo@sha256:" + "0" * 64])
def test_an_image_of_another_publisher_or_without_a_major_version_fails(image):
    assert not OFFICIAL_PINNED.fullmatch(image)


def test_every_image_is_an_official_one_of_a_pinned_major_version():
    for name, service in SERVICES.items():
        assert OFFICIAL_PINNED.fullmatch(service.get("image", "")), f"{name}: {service.get('image')}"


def test_every_variable_it_needs_is_in_env_example():
    needed = set(re.findall(r"\$\{(\w+):\?", TEXT))
    assert {"RABBITMQ_ERLANG_COOKIE_PASSWORD", "MONGO_REPLICA_SET_KEY_PASSWORD"} <= needed
    assert needed <= set(re.findall(r"(?m)^(\w+)=", EXAMPLE)), needed


def test_every_dollar_is_a_variable_of_env_or_escaped_for_the_shell():
    """Compose substitutes $NAME and ${NAME} itself: what the containers' shells expand is written $$."""
    rest = re.sub(r"\$\$|\$\{\w+:[?-][^}]*\}", "", TEXT)
    assert "$" not in rest, rest[rest.index("$") - 60:rest.index("$") + 20]


def test_make_env_fills_every_password_it_needs_each_with_its_own(tmp_path):
    subprocess.run(["cp", "-r", "Makefile", ".env.example", "scripts", str(tmp_path)], cwd=ROOT, check=True)
    subprocess.run(["make", "-s", ".env"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    env = dict(re.findall(r"(?m)^(\w+)=(.*)$", (tmp_path / ".env").read_text()))
    needed = set(re.findall(r"\$\{(\w+):\?", TEXT))
    assert all(len(env[variable]) >= 32 for variable in needed), {variable: len(env[variable]) for variable in needed}
    assert len({env[variable] for variable in needed}) == len(needed)


def test_every_node_writes_the_shared_cookie_and_every_member_the_shared_keyfile():
    for name in RABBITMQ:
        service = SERVICES[name]
        assert service["environment"]["RABBITMQ_ERLANG_COOKIE_PASSWORD"] == \
            "${RABBITMQ_ERLANG_COOKIE_PASSWORD:?is not set: make .env}", name
        script = service["entrypoint"][2]
        assert re.search(r'"\$\$RABBITMQ_ERLANG_COOKIE_PASSWORD".*> /var/lib/rabbitmq/\.erlang\.cookie', script), name
        assert "chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie" in script
        assert "chmod 600 /var/lib/rabbitmq/.erlang.cookie" in script
        assert script.endswith('exec docker-entrypoint.sh "$$@"') and service["entrypoint"][-1] == "--"
    for name in MONGO:
        service = SERVICES[name]
        assert service["environment"]["MONGO_REPLICA_SET_KEY_PASSWORD"] == \
            "${MONGO_REPLICA_SET_KEY_PASSWORD:?is not set: make .env}", name
        keyfile = option(service["command"], "--keyFile")
        script = service["entrypoint"][2]
        assert re.search(rf'"\$\$MONGO_REPLICA_SET_KEY_PASSWORD".*> {re.escape(keyfile)}\)', script), name
        assert f"chmod 400 {keyfile}" in script and "chown -R mongodb:mongodb /etc/mongo-keyfile" in script
        assert keyfile.startswith("/etc/mongo-keyfile/")
        assert script.endswith('exec docker-entrypoint.sh "$$@"') and service["entrypoint"][-1] == "--"


def test_the_classic_config_nodes_are_the_rabbitmq_services():
    conf = (ROOT / "rabbitmq/cluster-docker.conf").read_text()
    nodes = re.findall(r"(?m)^cluster_formation\.classic_config\.nodes\.(\d+)\s*=\s*(\S+)\s*$", conf)
    assert sorted(int(number) for number, _ in nodes) == list(range(1, len(RABBITMQ) + 1))
    # A node is rabbit@<its hostname>, and its peers reach that name through the service's name.
    assert sorted(node for _, node in nodes) == sorted(f"rabbit@{name}" for name in RABBITMQ)
    assert all(SERVICES[name]["hostname"] == name for name in RABBITMQ)
    assert re.search(r"(?m)^cluster_formation\.peer_discovery_backend\s*=\s*classic_config\s*$",
                     (ROOT / "rabbitmq/cluster.conf").read_text())


def test_every_node_has_the_configuration_of_docker_compose_yml_and_the_cluster_s():
    single = {volume for volume in SINGLE["services"]["rabbitmq"]["volumes"] if volume.startswith("./")}
    cluster = {"./rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/50-cluster.conf:ro",
               "./rabbitmq/cluster-docker.conf:/etc/rabbitmq/conf.d/60-cluster-docker.conf:ro"}
    for name in RABBITMQ:
        service = SERVICES[name]
        assert {volume for volume in service["volumes"] if volume.startswith("./")} == single | cluster, name
        assert service["image"] == SINGLE["services"]["rabbitmq"]["image"]
        assert service["healthcheck"]["test"] == SINGLE["services"]["rabbitmq"]["healthcheck"]["test"]
        assert service["environment"]["RABBITMQ_DEFAULT_PASS"] == SINGLE["services"]["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"]


def test_the_nodes_join_the_first_and_the_definitions_wait_for_all_three():
    first, *others = RABBITMQ
    assert "depends_on" not in SERVICES[first]
    for name in others:
        assert SERVICES[name]["depends_on"] == {first: {"condition": "service_healthy"}}, name
    definitions = SERVICES["rabbitmq-definitions"]
    assert definitions["depends_on"] == {name: {"condition": "service_healthy"} for name in RABBITMQ}
    assert definitions["environment"]["RABBITMQ_MANAGEMENT_URL"] == f"http://{first}:15672"
    assert definitions["command"] == SINGLE["services"]["rabbitmq-definitions"]["command"]


def test_the_replica_set_is_the_mongo_services_on_the_ports_they_publish():
    script = replica_set_script()
    (name,) = re.findall(r'rs\.initiate\(\{\s*_id:\s*"([^"]+)"', script)
    members = re.findall(r'\{\s*_id:\s*\d+,\s*host:\s*"([^":]+):(\d+)"\s*\}', script)
    assert len(set(re.findall(r"_id:\s*(\d+),\s*host:", script))) == len(members)
    served = []
    for member in MONGO:
        service = SERVICES[member]
        port = int(option(service["command"], "--port"))
        assert option(service["command"], "--replSet") == name, member
        assert published(service) == [("127.0.0.1", port, port)], member
        assert service["hostname"] == member
        healthcheck = service["healthcheck"]["test"]
        assert (option(healthcheck, "--host"), int(option(healthcheck, "--port"))) == (member, port), member
        served.append((member, str(port)))
    assert sorted(members) == sorted(served)


def test_the_replica_set_is_initiated_once_from_the_member_that_has_the_users():
    owners = [name for name in MONGO if "MONGO_INITDB_ROOT_USERNAME" in SERVICES[name].get("environment", {})]
    assert owners == ["mongo1"]
    mounts = [volume for name in MONGO for volume in SERVICES[name]["volumes"] if "/docker-entrypoint-initdb.d/" in volume]
    assert mounts == ["./mongo/create-app-user.js:/docker-entrypoint-initdb.d/create-app-user.js:ro"]
    assert SERVICES["mongo1"]["environment"]["MONGO_INITDB_ROOT_PASSWORD"] == SINGLE["services"]["mongo"]["environment"]["MONGO_INITDB_ROOT_PASSWORD"]
    one_shot = SERVICES["mongo-replica-set"]
    assert one_shot["depends_on"] == {name: {"condition": "service_healthy"} for name in MONGO}
    assert one_shot["restart"] == "on-failure"
    target = urlsplit(next(argument for argument in one_shot["command"] if argument.startswith("mongodb://")))
    assert (target.hostname, target.port) == ("mongo1", int(option(SERVICES["mongo1"]["command"], "--port")))
    script = replica_set_script()
    # rs.initiate only where rs.status() says NotYetInitialized; any other error fails the one shot.
    assert re.search(r"catch \(error\) \{\s*if \(error\.code !== 94\) throw error;\s*rs\.initiate\(", script)
    assert 'auth("root", process.env.MONGO_ROOT_PASSWORD)' in script
    assert one_shot["environment"]["MONGO_ROOT_PASSWORD"] == "${MONGO_ROOT_PASSWORD:?is not set: make .env}"
    assert 'stateStr === "PRIMARY"' in script


def test_every_port_is_on_127_0_0_1_and_no_host_port_is_used_twice():
    ports = [(name, *port) for name, service in SERVICES.items() for port in published(service)]
    assert ports
    assert all(address == "127.0.0.1" and host for _, address, host, _ in ports), ports
    hosts = [host for _, _, host, _ in ports]
    assert len(hosts) == len(set(hosts)), sorted(hosts)


def test_every_node_publishes_every_listener_of_docker_compose_yml():
    listeners = {container for _, _, container in published(SINGLE["services"]["rabbitmq"])}
    for name in RABBITMQ:
        assert sorted(container for _, _, container in published(SERVICES[name])) == sorted(listeners), name


def test_each_node_and_member_keeps_its_data_in_a_volume_of_its_own():
    data = {"rabbitmq": "/var/lib/rabbitmq", "mongo": "/data/db"}
    volumes = []
    for name in RABBITMQ + MONGO:
        service = SERVICES[name]
        path = data[service["image"].split(":")[0]]
        (volume,) = [volume.split(":")[0] for volume in service["volumes"] if volume.split(":")[1] == path]
        assert volume in COMPOSE["volumes"], name
        volumes.append(volume)
    assert len(set(volumes)) == len(volumes), volumes


def test_the_settings_it_gives_the_programs_reach_the_ports_it_publishes():
    users = {"server.py": "pipeline", "client.py": "publisher"}
    for program, user in users.items():
        (urls,) = re.findall(rf"{re.escape(program)}\s+RABBITMQ_URL=(\S+)", HEADER)
        password = f"<RABBITMQ_{user.upper()}_PASSWORD>"
        nodes = []
        for url in urls.split(","):
            assert url.startswith(f"amqp://{user}:{password}@"), url
            parameters = pika.URLParameters(url.replace(password, "pw"))
            assert parameters.virtual_host == "/"
            nodes.append((parameters.host, parameters.port))
        assert nodes == [("localhost", host_port(name, 5672)) for name in RABBITMQ], program
    mqtt = re.findall(r"MQTT_HOST=(\S+)", HEADER)
    assert [("localhost", host_port(name, 8883)) for name in RABBITMQ] in [
        [(item.split(":")[0], int(item.split(":")[1])) for item in hosts.split(",")] for hosts in mqtt]
    assert [("localhost", host_port(name, 1883)) for name in RABBITMQ] in [
        [(item.split(":")[0], int(item.split(":")[1])) for item in hosts.split(",")] for hosts in mqtt]
    (uri,) = re.findall(r"MONGO_URI=(\S+)", HEADER)
    assert uri.startswith("mongodb://app:<MONGO_APP_PASSWORD>@")
    parsed = uri_parser.parse_uri(uri.replace("<MONGO_APP_PASSWORD>", "pw"))
    members = [(member, int(option(SERVICES[member]["command"], "--port"))) for member in MONGO]
    assert parsed["nodelist"] == members
    assert parsed["options"]["replicaSet"] == option(SERVICES["mongo1"]["command"], "--replSet")
    assert parsed["options"]["authSource"] == "admin"
    # The names a replica set's clients are given must be the host's too.
    (hosts,) = re.findall(r"`127\.0\.0\.1 ([\w ]+)` to /etc/hosts", HEADER)
    assert hosts.split() == MONGO
