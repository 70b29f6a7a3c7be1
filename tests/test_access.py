"""Who may do what at the broker: the users of rabbitmq/definitions.json, as scripts/services
created them (the passwords of .data/secrets.env), and device users of `scripts/services
add-device`. Negative cases first; the last tests run the whole pipeline as those users, in a
vhost of the test's own that holds the same definitions."""

import os
import re
import subprocess
import urllib.parse
import uuid

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ProbableAccessDeniedError, ProbableAuthenticationError

import config
from conftest import ADMIN_API, ADMIN_API_USER, ROOT, Pipeline, add_secret, apply_definitions, definitions_in, management, quoted, wait_until
from test_mqtt import mosquitto_pub

# The connection a refused MQTT PUBLISH ends with (MQTT 3.1.1 cannot refuse one otherwise).
CONNECTION_LOST = (7, "Error: The connection was lost.")


def user_url(user, vhost="/"):
    """The local broker as a user of rabbitmq/definitions.json, with its generated password."""
    return config.local_amqp_url(user, os.environ[f"RABBITMQ_{user.upper()}_PASSWORD"], vhost)


def refused(url, action):
    """(reply code, text) with which the broker closed the channel over `action(channel)`, as `url`'s user."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(ChannelClosedByBroker) as closed:
            channel = connection.channel()
            channel.confirm_delivery()
            action(channel)
        return closed.value.reply_code, closed.value.reply_text
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.parametrize("action", [
    lambda channel: channel.queue_declare(f"publisher-may-not-{uuid.uuid4().hex[:8]}"),
    lambda channel: channel.basic_consume("status_queue", lambda *delivery: None),
    lambda channel: channel.basic_get("status_queue"),
    lambda channel: channel.exchange_declare("status_exchange", exchange_type="topic", durable=True),
    lambda channel: channel.exchange_declare(f"publisher-may-not-{uuid.uuid4().hex[:8]}", exchange_type="topic"),
    lambda channel: channel.basic_publish("amq.topic", "devices.a.status", b'{"status": 1}'),
], ids=["declare a queue", "consume", "get", "declare the exchange", "declare an exchange", "publish elsewhere"])
def test_the_publisher_cannot_consume_declare_or_publish_elsewhere(action):
    code, text = refused(user_url("publisher"), action)
    assert code == 403, text
    assert "publisher" in text


def test_the_publisher_may_check_the_exchange_exists():
    connection = pika.BlockingConnection(pika.URLParameters(user_url("publisher")))
    connection.channel().exchange_declare("status_exchange", passive=True)
    connection.close()


@pytest.mark.parametrize("routing_key", ["devices.a.status", "status_topic"])
def test_the_pipeline_user_cannot_publish_as_a_device(routing_key):
    code, text = refused(user_url("pipeline"),
                         lambda channel: channel.basic_publish("status_exchange", routing_key, b'{"status": 1}'))
    assert code == 403, text
    assert "pipeline" in text


@pytest.mark.parametrize("action", [
    lambda channel: channel.queue_declare("other_queue"),
    lambda channel: channel.queue_declare("status_queue", durable=True, arguments={"x-queue-type": "quorum"}),
    lambda channel: channel.exchange_declare("status_queue", exchange_type="fanout"),
    # what would route its dead letters into status_queue, as any device:
    lambda channel: channel.queue_bind("status_queue", "status_queue.dlx"),
    lambda channel: channel.queue_bind("status_queue", "status_exchange", "x.#"),
    lambda channel: channel.exchange_delete("status_exchange"),
    lambda channel: channel.queue_delete("status_queue"),
], ids=["declare a queue", "declare its queue", "declare an exchange", "bind to its dead-letter exchange",
        "bind another key", "delete the exchange", "delete its queue"])
def test_the_pipeline_user_can_neither_declare_bind_nor_delete(action):
    code, text = refused(user_url("pipeline"), action)
    assert code == 403, text


def test_the_shipped_queues_have_the_arguments_server_py_gives_its_own():
    """rabbitmq/definitions.json declares the queues that server.py declares for a QUEUE of your own:
    the same queue type, group size on a cluster, delivery limit and dead-letter exchange."""
    from server import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE_ARGUMENTS, DELIVERY_LIMIT, QUEUE_ARGUMENTS

    definitions = apply_definitions.json.loads(apply_definitions.DEFINITIONS.read_text())
    queues = {queue["name"]: queue["arguments"] for queue in definitions["queues"]}
    assert queues == {"status_queue": QUEUE_ARGUMENTS, "status_queue.unroutable": QUEUE_ARGUMENTS,
                      "status_queue.dead": DEAD_LETTER_QUEUE_ARGUMENTS}
    assert QUEUE_ARGUMENTS == {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3,
                               "x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    assert DEAD_LETTER_QUEUE_ARGUMENTS == {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}


@pytest.mark.parametrize("user", ["publisher", "pipeline", "admin", "guest"])
def test_a_wrong_password_is_refused_and_guest_is_gone(user):
    with pytest.raises((ProbableAuthenticationError, ProbableAccessDeniedError)):
        pika.BlockingConnection(pika.URLParameters(config.local_amqp_url(user, "guest")))
    assert "guest" not in [user["name"] for user in management("GET", "/users")]


@pytest.fixture
def device():
    """(name, password) of a device user made by `scripts/services add-device`, deleted afterwards."""
    name = f"test-device-{uuid.uuid4().hex[:8]}"
    made = subprocess.run([str(ROOT / "scripts/services"), "add-device", name], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    password = add_secret(re.search(rf"MQTT_USERNAME={name} MQTT_PASSWORD=(\S+)", made.stdout).group(1))
    yield name, password
    management("DELETE", f"/users/{name}")


def test_a_device_may_publish_to_its_own_topic_and_no_other(device):
    """Its own topic, with a body the server would dead-letter should one be running: mosquitto_pub
    exits 0 once the broker took the message (routed or not)."""
    name, password = device
    assert mosquitto_pub(f"devices/{name}/status", "not a status", username=name, password=password) == (0, "")


@pytest.mark.parametrize("topic", ["devices/{other}/status", "status_topic", "devices/{name}/status/x",
                                   "devices/{name}x/status", "devices/{name}/{name}/status"])
def test_a_device_cannot_publish_for_another_device(device, topic):
    name, password = device
    assert mosquitto_pub(topic.format(name=name, other=f"{name[:-1]}z"), '{"status": 1}', username=name,
                         password=password, check=False) == CONNECTION_LOST


def test_a_device_cannot_publish_over_amqp_for_another_device(device):
    name, password = device
    code, text = refused(config.local_amqp_url(name, password),
                         lambda channel: channel.basic_publish("status_exchange", "devices.other.status", b'{"status": 1}'))
    assert code == 403, text


def test_a_device_with_a_wrong_password_is_refused(device):
    name, _ = device
    code, error = mosquitto_pub(f"devices/{name}/status", '{"status": 1}', username=name, password="wrong-password",
                                check=False)
    assert code != 0
    # CONNACK 4 or 5 (MQTT 3.1.1, 3.2.2.3), as RabbitMQ sees it
    assert "bad user name or password" in error or "not authorised" in error, error


@pytest.mark.parametrize("name, reason", [
    ("a.b", "is not 1 to 64"), ("a b", "is not 1 to 64"), ("a*", "is not 1 to 64"), ("x" * 65, "is not 1 to 64"),
    ("dev/1", "is not 1 to 64"), ("{username}", "is not 1 to 64"),
    ("admin", "is a user of the pipeline"), ("pipeline", "is a user of the pipeline"),
    ("publisher", "is a user of the pipeline"), ("guest", "is a user of the pipeline"),
])
def test_add_device_refuses_a_name_no_topic_can_hold_or_a_user_of_the_pipeline(name, reason):
    made = subprocess.run([str(ROOT / "scripts/services"), "add-device", name], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 1 and reason in made.stderr, made
    assert "MQTT_PASSWORD" not in made.stdout
    for user in ("admin", "publisher", "pipeline"):  # each password is the one it was
        pika.BlockingConnection(pika.URLParameters(user_url(user))).close()


# -- the pipeline as its own users, in a vhost holding the same definitions ------------------

@pytest.fixture
def secured(mongo, tmp_path):
    """A vhost of the test's own with rabbitmq/definitions.json in it, its users named after the
    test, and one device; yields (pipeline over it, {role: url}, (device, password))."""
    suffix = uuid.uuid4().hex[:8]
    vhost, urls = f"status-pipeline-tests-secured-{suffix}", {}
    users = {user: f"t{suffix}-{user}" for user in ("publisher", "pipeline")}
    management("PUT", f"/vhosts/{quoted(vhost)}", {})
    for user, name in users.items():
        password = add_secret(uuid.uuid4().hex)
        management("PUT", f"/users/{name}", {"password": password, "tags": ""})
        urls[user] = config.local_amqp_url(name, password, vhost)
    management("POST", "/definitions", definitions_in(vhost, users))
    definitions = apply_definitions.json.loads(apply_definitions.DEFINITIONS.read_text())
    definitions["device_permissions"]["vhost"] = vhost
    device = f"t{suffix}-device"
    device_password = add_secret(apply_definitions.add_device(ADMIN_API, definitions, device))
    # The test looks at queues as admin; the programs it starts log in as the least-privileged users.
    management("PUT", f"/permissions/{quoted(vhost)}/{ADMIN_API_USER}", {"configure": ".*", "write": ".*", "read": ".*"})
    admin = config.local_amqp_url(ADMIN_API_USER, os.environ["RABBITMQ_ADMIN_PASSWORD"], vhost)
    pipeline = Pipeline(mongo, pika.BlockingConnection(pika.URLParameters(admin)), tmp_path,
                        exchange="status_exchange", amqp_url=admin)
    pipeline.env.update(RABBITMQ_URL=urls["pipeline"], QUEUE="status_queue", MQTT_USERNAME=f"{vhost}:{device}",
                        MQTT_PASSWORD=device_password)
    pipeline.queue, pipeline.dead_letter_queue, pipeline.unroutable_queue = \
        "status_queue", "status_queue.dead", "status_queue.unroutable"
    yield pipeline, urls, (device, device_password)
    pipeline.close()
    for name in [*users.values(), device]:
        management("DELETE", f"/users/{name}")
    management("DELETE", f"/vhosts/{quoted(vhost)}")


def test_the_pipeline_runs_as_its_least_privileged_users(secured):
    pipeline, urls, (device, _) = secured
    pipeline.start_server()
    client = pipeline.start("client.py", "--count", "50", "--interval", "0", env={"RABBITMQ_URL": urls["publisher"]})
    assert client.wait(120) == 0, pipeline.log(client)
    over_mqtt = pipeline.start("client.py", "--transport", "mqtt", "--count", "20", "--interval", "0")
    assert over_mqtt.wait(120) == 0, pipeline.log(over_mqtt)
    assert f"devices/{device}/status" in pipeline.log(over_mqtt)  # the device id is its user name
    pipeline.wait_stored(70)
    assert pipeline.collection.count_documents({"device_id": device}) == 20
    assert pipeline.dead_letters(0) == []


def test_a_device_publishing_for_another_is_refused_end_to_end(secured):
    pipeline, _, (device, _) = secured
    pipeline.start_server()
    client = pipeline.start("client.py", "--transport", "mqtt", "--count", "5", "--interval", "0",
                            "--device-id", "someone-else")
    assert client.wait(120) == 1, pipeline.log(client)
    assert "a topic permission refuses it" in pipeline.log(client)
    assert "5 refused" in pipeline.log(client)
    assert pipeline.stored_count() == 0


def test_no_password_shows_in_a_log_through_a_refused_login_a_bad_url_a_reconnect_and_a_config_error(secured):
    pipeline, urls, (device, device_password) = secured
    publisher_password = urllib.parse.urlsplit(urls["publisher"]).password
    server = pipeline.start_server()
    # A reconnect: the broker closes the server's connection (as at a node's restart).
    wait_until(lambda: management_connections(urllib.parse.urlsplit(urls["pipeline"]).username), 30,
               "the server's connection to be listed")
    for name in management_connections(urllib.parse.urlsplit(urls["pipeline"]).username):
        management("DELETE", f"/connections/{quoted(name)}")
    wait_until(lambda: pipeline.log(server).count("consuming") >= 2, 60, "the server to consume again")
    # A refused login, over AMQP and MQTT; a URL pika refuses; a setting config.py refuses.
    wrong = urls["publisher"].replace(publisher_password, publisher_password[::-1])
    bad_option = urls["publisher"] + ("&" if "?" in urls["publisher"] else "?") + "heartbeat=soon"
    runs = [pipeline.start("client.py", "--count", "1", env={"RABBITMQ_URL": wrong}),
            pipeline.start("client.py", "--transport", "mqtt", "--count", "1",
                           env={"MQTT_PASSWORD": device_password[::-1]}),
            pipeline.start("client.py", "--count", "1", env={"RABBITMQ_URL": bad_option}),
            pipeline.start("server.py", env={"RABBITMQ_URL": re.sub(r"@localhost:\d+/", "@localhost:x/", urls["pipeline"])})]
    assert [run.wait(60) != 0 for run in runs] == [True] * 4
    pipeline.stop(server)
    logs = "".join(pipeline.log(process) for process in pipeline.processes)
    assert "refused the credentials" in logs and "config error" in logs
    for password in [*[urllib.parse.urlsplit(url).password for url in urls.values()], device_password,
                     os.environ["RABBITMQ_ADMIN_PASSWORD"], os.environ["RABBITMQ_PIPELINE_PASSWORD"]]:
        assert password not in logs and password[::-1] not in logs


def management_connections(user):
    """Names of the broker's connections of `user` (the management API's list lags a few seconds)."""
    return [connection["name"] for connection in management("GET", "/connections") if connection["user"] == user]


def test_every_port_of_the_services_listens_on_loopback_only():
    """The brokers', the store's, and Erlang's port mapper (4369) and distribution port (25672)."""
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.split("\n")
    ports = {"4369", "25672", "5671", "5672", "1883", "8883", "15672", "27017", "27018"}
    found = [line.split()[3] for line in listening if line and line.split()[3].rpartition(":")[2] in ports]
    assert {address.rpartition(":")[2] for address in found} >= {"4369", "25672", "5671", "8883", "15672", "27018"}
    assert all(address.rpartition(":")[0] in ("127.0.0.1", "[::1]") for address in found), found


def test_the_services_files_are_their_owners_only():
    data = ROOT / ".data"
    modes = {path: (data / path).stat().st_mode & 0o777 for path in
             ("secrets.env", "mongo", "rabbitmq", "rabbitmq/rabbitmq.conf", "tls/ca.key")}
    assert modes == {path: 0o600 if "." in path else 0o700 for path in modes}, modes
    assert (data / "tls/server.key").stat().st_mode & 0o007 == 0


def test_up_deletes_a_binding_into_the_pipelines_queues_that_the_definitions_do_not_list(amqp_connection):
    """As one that `pipeline` could make before it lost the right to bind: its dead letters into status_queue."""
    channel = amqp_connection.channel()
    channel.queue_bind("status_queue", "status_queue.dlx")
    up = subprocess.run([str(ROOT / "scripts/services"), "up", "rabbitmq"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert "deleted the binding status_queue.dlx -> status_queue" in up.stdout
    bindings = {(binding["source"], binding["destination"]) for binding in management("GET", "/bindings/%2F")}
    assert ("status_queue.dlx", "status_queue") not in bindings
    assert {("status_exchange", "status_queue"), ("status_queue.dlx", "status_queue.dead")} <= bindings


# -- the classic dead-letter queue of versions before clusters ------------------------------

def classic_dead_letter_queue(pipeline, messages):
    """status_queue.dead as versions before clusters declared it, a classic queue bound to the
    dead-letter exchange, holding `messages` dead letters."""
    channel = pipeline.channel()
    channel.queue_delete("status_queue.dead")
    channel.queue_declare("status_queue.dead", durable=True)
    channel.queue_bind("status_queue.dead", "status_queue.dlx")
    for number in range(messages):
        channel.basic_publish("status_queue.dlx", "", f"an old dead letter {number}".encode())
    channel.close()


def queue_type(pipeline, name):
    return management("GET", f"/queues/{quoted(pipeline.vhost)}/{quoted(name)}")["type"]


def test_an_empty_classic_dead_letter_queue_is_replaced_by_a_quorum_queue(secured):
    pipeline, _, _ = secured
    classic_dead_letter_queue(pipeline, messages=0)
    server = pipeline.start_server()  # as the user pipeline
    assert "replaced the empty classic queue status_queue.dead" in pipeline.log(server)
    assert queue_type(pipeline, "status_queue.dead") == "quorum"
    pipeline.publish(b"not JSON")
    (properties, body), = pipeline.dead_letters(1)  # bound again: a dead letter reaches it
    assert body == b"not JSON" and "not JSON" in properties.headers["x-rejected-reason"]
    pipeline.stop(server)
    assert "classic" not in pipeline.log(pipeline.start_server())  # nothing more to say


def test_a_classic_dead_letter_queue_holding_messages_is_kept_and_the_log_says_how_to_move(secured):
    pipeline, _, _ = secured
    classic_dead_letter_queue(pipeline, messages=2)
    server = pipeline.start_server()
    log = pipeline.log(server)
    assert "status_queue.dead is a classic queue of an earlier version, holding 2 messages" in log, log
    assert "rabbitmqctl delete_queue status_queue.dead" in log
    assert queue_type(pipeline, "status_queue.dead") == "classic"
    pipeline.publish(b"not JSON")
    bodies = sorted(body for _, body in pipeline.dead_letters(3))
    assert bodies == [b"an old dead letter 0", b"an old dead letter 1", b"not JSON"]
