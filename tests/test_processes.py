"""server.py as several processes (SERVER_PROCESSES): they share the queue's work, and they
stop and die together, so that whatever restarts the server restarts all of it."""

import os
import re
import signal

import pytest

from conftest import wait_until
from test_faults import assert_each_stored_once


def consuming_pids(pipeline, server):
    return {int(pid) for pid in re.findall(r"server\[(\d+)\] INFO connected to RabbitMQ", pipeline.log(server))}


def running(pid):
    """False once the process has exited, even while nobody has reaped it yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_two(pipeline):
    """The server as two processes; returns it and its child's pid."""
    server = pipeline.start_server(env={"SERVER_PROCESSES": "2"})
    wait_until(lambda: len(consuming_pids(pipeline, server)) == 2, timeout=30, what="both processes to consume")
    (child,) = consuming_pids(pipeline, server) - {server.pid}
    return server, child


def test_two_processes_share_the_work_and_stop_together(pipeline):
    server, child = start_two(pipeline)
    client = pipeline.run_client("--count", 3000, "--interval", 0)
    assert client.returncode == 0, pipeline.log(client)
    assert_each_stored_once(pipeline, pipeline.confirmed_ids(client))
    assert pipeline.stop(server) == 0, pipeline.log(server)
    assert not running(child)
    stored = [int(count) for count in re.findall(r"stopped: (\d+) stored", pipeline.log(server))]
    assert len(stored) == 2 and sum(stored) == 3000 and min(stored) > 0, stored


def test_kill_9_of_the_server_takes_its_other_processes_along(pipeline):
    server, child = start_two(pipeline)
    server.kill()
    server.wait()
    wait_until(lambda: not running(child), timeout=10, what="the child to exit")
    assert "the server.py that started this process is gone" in pipeline.log(server)


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 0)])
def test_a_process_that_exits_unasked_stops_the_whole_server(pipeline, sig, code):
    """Even a clean exit: whatever restarts the server on failure must restart all of it."""
    server, child = start_two(pipeline)
    os.kill(child, sig)
    assert server.wait(30) == 1, pipeline.log(server)
    assert f"server process {child} exited with code {code}; stopping the others" in pipeline.log(server)
