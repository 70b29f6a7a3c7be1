"""Load rabbitmq/definitions.json into a running broker through its management HTTP API.

    python3 rabbitmq/apply_definitions.py               users, permissions, topology, policies
    python3 rabbitmq/apply_definitions.py add-device NAME   a device user; prints its password once

Run by `scripts/services up` and by docker-compose.yml's one-shot `rabbitmq-definitions`
service, the same way: the standard library only, settings from the environment.

- RABBITMQ_MANAGEMENT_URL: http://127.0.0.1:15672 by default.
- RABBITMQ_ADMIN_PASSWORD: the password of `admin`, who makes every change.
- RABBITMQ_<USER>_PASSWORD: the password of each other user in the definitions (PUBLISHER, PIPELINE).

RabbitMQ's definitions format holds password hashes, not variables, so the users are created
here, each with the password its variable gives, and the rest of the file is imported as it
is. `guest` is deleted: no program of the pipeline logs in as it. Safe to repeat.
Exit status 1, with one line on stderr, when the broker refuses or cannot be reached.
"""

import base64
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFINITIONS = Path(__file__).with_name("definitions.json")
# A device's user name is the device id in its MQTT topic (devices/<name>/status) and the
# `{username}` its topic permission expands to, so it holds nothing a regular expression reads.
DEVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
STARTUP_SECONDS = 120


class ManagementAPI:
    def __init__(self, url, user, password, timeout=30):
        self.url = url.rstrip("/")
        self._timeout = timeout  # seconds, per call
        self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method, path, body=None):
        """The decoded JSON answer, None for an empty one; urllib.error.HTTPError for a refusal."""
        request = urllib.request.Request(self.url + "/api" + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": self._authorization,
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self._timeout) as answer:
            data = answer.read()
        return json.loads(data) if data else None

    def wait_until_up(self, seconds):
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self.call("GET", "/overview")
            except urllib.error.HTTPError:
                raise
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def quoted(name):
    return urllib.parse.quote(name, safe="")


def ensure_admin(api, definitions):
    """A broker from before these definitions has only `guest` (the default user of Debian's
    package and of the Docker image): `admin` is created through it, before guest is deleted."""
    try:
        api.wait_until_up(STARTUP_SECONDS)
        return
    except urllib.error.HTTPError as error:
        if error.code != 401:
            raise
    guest = ManagementAPI(api.url, "guest", "guest")
    try:
        guest.call("GET", "/whoami")
    except urllib.error.HTTPError:
        sys.exit("apply_definitions: RabbitMQ refused admin's password (RABBITMQ_ADMIN_PASSWORD), and guest's")
    admin = next(user for user in definitions["users"] if user["name"] == "admin")
    guest.call("PUT", "/users/admin", {"password": os.environ["RABBITMQ_ADMIN_PASSWORD"], "tags": admin["tags"]})
    for permission in definitions["permissions"]:
        if permission["user"] == "admin":
            guest.call("PUT", f"/permissions/{quoted(permission['vhost'])}/admin",
                       {key: permission[key] for key in ("configure", "write", "read")})
    print("apply_definitions: created admin through guest (a broker from before these definitions)")


def apply(api, definitions):
    for user in definitions["users"]:
        variable = f"RABBITMQ_{user['name'].upper()}_PASSWORD"
        password = os.environ.get(variable)
        if not password:
            sys.exit(f"apply_definitions: {variable} is not set")
        api.call("PUT", f"/users/{quoted(user['name'])}", {"password": password, "tags": user["tags"]})
    rest = {key: value for key, value in definitions.items() if key not in ("users", "device_permissions")}
    api.call("POST", "/definitions", rest)
    remove_other_bindings(api, definitions)
    try:
        api.call("DELETE", "/users/guest")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise


def remove_other_bindings(api, definitions):
    """Importing only adds: a binding into one of the file's queues that the file does not list (one
    made under broader permissions, say into status_queue from the dead-letter exchange) is deleted."""
    listed = {(binding["vhost"], binding["source"], binding["destination"], binding["routing_key"])
              for binding in definitions["bindings"]}
    queues = {(queue["vhost"], queue["name"]) for queue in definitions["queues"]}
    for vhost in {vhost for vhost, _ in queues}:
        for binding in api.call("GET", f"/bindings/{quoted(vhost)}"):
            key = (vhost, binding["source"], binding["destination"], binding["routing_key"])
            if (binding["destination_type"] == "queue" and (vhost, binding["destination"]) in queues
                    and binding["source"] and key not in listed):  # "": the default exchange's, implicit
                api.call("DELETE", f"/bindings/{quoted(vhost)}/e/{quoted(binding['source'])}/q/"
                                   f"{quoted(binding['destination'])}/{quoted(binding['properties_key'])}")
                print(f"apply_definitions: deleted the binding {binding['source']} -> {binding['destination']} "
                      f"({binding['routing_key']!r}), which rabbitmq/definitions.json does not list")


def add_device(api, definitions, name):
    """Creates the user `name` with a new password, allowed to publish to devices.<name>.status only;
    for a device that exists already, replaces its password. Returns the password."""
    if not DEVICE_NAME.fullmatch(name):
        sys.exit(f"add-device: {name!r} is not 1 to 64 letters, digits, _ or -")
    if name in {user["name"] for user in definitions["users"]} | {"guest"}:
        sys.exit(f"add-device: {name} is a user of the pipeline, not a device")
    rules = definitions["device_permissions"]
    password = secrets.token_urlsafe(24)
    api.call("PUT", f"/users/{quoted(name)}", {"password": password, "tags": ""})
    api.call("PUT", f"/permissions/{quoted(rules['vhost'])}/{quoted(name)}",
             {"configure": rules["configure"], "write": rules["write"], "read": rules["read"]})
    api.call("PUT", f"/topic-permissions/{quoted(rules['vhost'])}/{quoted(name)}",
             {"exchange": rules["topic_exchange"], "write": rules["topic_write"], "read": rules["topic_read"]})
    return password


def main():
    definitions = json.loads(DEFINITIONS.read_text())
    if not os.environ.get("RABBITMQ_ADMIN_PASSWORD"):
        sys.exit("apply_definitions: RABBITMQ_ADMIN_PASSWORD is not set")
    api = ManagementAPI(os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672"), "admin",
                        os.environ["RABBITMQ_ADMIN_PASSWORD"])
    try:
        ensure_admin(api, definitions)
        if sys.argv[1:2] == ["add-device"] and len(sys.argv) == 3:
            password = add_device(api, definitions, sys.argv[2])
            print(f"device {sys.argv[2]}: MQTT_USERNAME={sys.argv[2]} MQTT_PASSWORD={password}")
            print("(shown once; publish to devices/" + sys.argv[2] + "/status)")
        elif len(sys.argv) == 1:
            apply(api, definitions)
        else:
            sys.exit(__doc__.split("\n\n")[1])
    except urllib.error.HTTPError as error:
        sys.exit(f"apply_definitions: RabbitMQ management API refused {error.url}: {error.code} {error.reason}")
    except OSError as error:
        sys.exit(f"apply_definitions: RabbitMQ management API at {api.url} unreachable: {error}")


if __name__ == "__main__":
    main()
