"""client.py's progress bar: on a terminal with --count, never in a log file or a pipe."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import ROOT

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} client (DEBUG|INFO|WARNING|ERROR) ")


def run_on_terminal(pipeline, *args, timeout=120):
    """Run client.py with stdout and stderr on a pseudo-terminal 120 columns wide, as from an
    interactive shell; return its exit status and all it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    client = subprocess.Popen([sys.executable, str(ROOT / "client.py"), *map(str, args)], env=pipeline.env,
                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    pipeline.processes.append(client)  # killed at teardown if it hangs
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:  # until the client's end of the terminal closes: Linux then reads EIO
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"client.py {args} still writing after {timeout}s:\n{output[-3000:].decode(errors='replace')}")
            if not select.select([master], [], [], min(remaining, 1.0))[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    return client.wait(timeout=10), output.decode(errors="replace")


def screen_pieces(output):
    """What the terminal shows as separate lines or redraws of one line."""
    return [piece.strip() for piece in re.split(r"[\r\n]", output) if piece.strip()]


def assert_bar_reached_total_with_rate(output, total):
    bars = [piece for piece in screen_pieces(output) if piece.startswith("confirmed:")]
    assert bars, output[-3000:]
    final = bars[-1]
    assert f"{total}/{total}" in final and "100%" in final, final
    assert re.search(r"\d+(\.\d+)?msg/s", final), final
    assert "unconfirmed=0" in final and "refused" not in final, final


def assert_log_lines_not_torn(output):
    for piece in screen_pieces(output):
        if " client " in piece:
            assert LOG_LINE.match(piece), f"a log line shares a line with the bar: {piece!r}"


def test_bar_on_a_terminal_reaches_the_count_with_a_rate(pipeline):
    pipeline.start_server()
    returncode, output = run_on_terminal(pipeline, "--count", 2000, "--interval", 0)
    assert returncode == 0, output[-3000:]
    assert_bar_reached_total_with_rate(output, 2000)
    assert "confirmed status=" not in output  # the bar stands for them
    assert "connected to RabbitMQ" in output and "done: 2000 published, 2000 confirmed, 0 refused" in output
    assert_log_lines_not_torn(output)
    pipeline.wait_stored(2000)


def test_bar_on_a_terminal_over_mqtt(mqtt_pipeline):
    pipeline = mqtt_pipeline
    pipeline.start_server()
    returncode, output = run_on_terminal(pipeline, "--transport", "mqtt", "--count", 500, "--interval", 0)
    assert returncode == 0, output[-3000:]
    assert_bar_reached_total_with_rate(output, 500)
    assert "connected to MQTT" in output and "done: 500 published, 500 confirmed, 0 refused" in output
    assert_log_lines_not_torn(output)
    pipeline.wait_stored(500)


def test_debug_level_shows_each_confirm_above_the_bar(pipeline):
    pipeline.start_server()
    returncode, output = run_on_terminal(pipeline, "--count", 300, "--interval", 0, "--log-level", "DEBUG")
    assert returncode == 0, output[-3000:]
    assert_bar_reached_total_with_rate(output, 300)
    assert len(re.findall(r"confirmed status=\d message_id=", output)) == 300
    assert_log_lines_not_torn(output)


def test_no_progress_on_a_terminal_logs_each_confirm(pipeline):
    pipeline.start_server()
    returncode, output = run_on_terminal(pipeline, "--count", 2000, "--interval", 0, "--no-progress")
    assert returncode == 0, output[-3000:]
    assert "msg/s" not in output and "confirmed:" not in output
    assert len(re.findall(r"client INFO confirmed status=\d message_id=", output)) == 2000
    pipeline.wait_stored(2000)


def test_log_file_gets_every_confirm_and_no_bar(pipeline):
    """As tests and benchmarks read it: stdout and stderr to a file, not a terminal."""
    pipeline.start_server()
    client = pipeline.run_client("--count", 2000, "--interval", 0)
    log = pipeline.log(client)
    assert client.returncode == 0, log[-3000:]
    assert "\r" not in log and "msg/s" not in log and "confirmed:" not in log and "%|" not in log
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log[-3000:]
    confirmed = pipeline.confirmed_ids(client)
    assert len(confirmed) == len(set(confirmed)) == 2000
    pipeline.wait_stored(2000)
