"""A real browser for the dashboard: Debian's headless Chromium driven by Selenium (`make browser`
installs both), and api.py's app behind a real HTTP server in a thread. Used by
tests/test_dashboard.py and scripts/screenshot.py."""

import os
import threading

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from werkzeug.serving import make_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium(width=1280, height=720, timezone=None):
    """A headless Chromium (Debian's, never a downloaded one) showing pages of width x height
    CSS pixels, with its console log kept; `timezone` sets its local time zone (TZ)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{path} is missing: run `make browser` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: Chromium's sandbox refuses to run as root, which the tests are.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    env = dict(os.environ, TZ=timezone) if timezone else None
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=env), options=options)
    # --window-size counts the window's frame too: make the page itself width x height.
    frame_width, frame_height = driver.execute_script(
        "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]")
    driver.set_window_size(width + frame_width, height + frame_height)
    return driver


class LiveServer:
    """A WSGI app served on 127.0.0.1 by werkzeug's threaded server (it closes every connection
    after its response, so that stop() leaves no kept-alive one answering). start() after
    stop() serves on the same port again, as an API restarted in place."""

    def __init__(self, app):
        self.app = app
        self.port = 0
        self._server = None
        self.start()

    def start(self):
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}/"
        threading.Thread(target=self._server.serve_forever, name="live-server", daemon=True).start()

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
