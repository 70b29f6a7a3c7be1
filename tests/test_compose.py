"""docker-compose.yml cannot run here (no Docker engine): what can be checked without it is that it
agrees with the repository: the files it mounts exist, every password it asks for is one that
.env.example names and `make .env` fills, and every user of rabbitmq/definitions.json has one."""

import json
import re
import subprocess

import pytest
import yaml

from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
EXAMPLE = (ROOT / ".env.example").read_text()


@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.cluster.yml"])
def test_every_file_it_mounts_is_in_the_repository_or_what_scripts_services_tls_makes(file):
    compose = yaml.safe_load((ROOT / file).read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source == "./.data/tls":
                assert {"ca.pem", "server.pem", "server.key"} <= {path.name for path in (ROOT / ".data/tls").iterdir()}
            elif source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts the undeclared volume {source}"


def test_its_brokers_show_the_tls_ports_the_programs_use_by_default():
    rabbitmq = {port.split(":")[-2] for port in COMPOSE["services"]["rabbitmq"]["ports"]}
    assert {"5671", "8883"} <= rabbitmq
    assert "127.0.0.1:27018:27017" in COMPOSE["services"]["mongo"]["ports"]
    assert all(port.startswith("127.0.0.1:") for service in COMPOSE["services"].values()
               for port in service.get("ports", []))


def test_every_variable_it_needs_is_in_env_example():
    needed = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert needed, "no variable asked for"
    assert needed <= set(re.findall(r"(?m)^(\w+)=", EXAMPLE)), needed


def test_every_broker_user_has_a_password_variable_everywhere():
    users = [user["name"] for user in json.loads((ROOT / "rabbitmq/definitions.json").read_text())["users"]]
    services = (ROOT / "scripts/services").read_text()
    for user in users:
        variable = f"RABBITMQ_{user.upper()}_PASSWORD"
        assert re.search(rf"(?m)^{variable}=$", EXAMPLE), variable
        assert variable in services, variable
        if user != "admin":  # admin is the image's first user, RABBITMQ_DEFAULT_PASS
            assert variable in COMPOSE["services"]["rabbitmq-definitions"]["environment"], variable


def test_make_env_fills_every_password_and_keeps_it_to_its_owner(tmp_path):
    subprocess.run(["cp", "-r", "Makefile", ".env.example", "scripts", str(tmp_path)], cwd=ROOT, check=True)
    subprocess.run(["make", "-s", ".env"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    env = (tmp_path / ".env").read_text()
    passwords = re.findall(r"(?m)^\w+_PASSWORD=(.*)$", env)
    assert len(passwords) == len(re.findall(r"(?m)^\w+_PASSWORD=$", EXAMPLE)) >= 5
    assert all(len(password) >= 32 for password in passwords) and len(set(passwords)) == len(passwords)
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".data/tls/ca.key").stat().st_mode & 0o777 == 0o600  # and it made the CA
