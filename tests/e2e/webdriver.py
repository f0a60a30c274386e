"""A small W3C WebDriver client for headless Chromium through chromedriver's HTTP API (no new packages)."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import requests

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMEDRIVER: Final = Path("/usr/bin/chromedriver")
ELEMENT_KEY: Final = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element reference
STARTUP_TIMEOUT_SEC: Final = 20.0
COMMAND_TIMEOUT_SEC: Final = 30.0
WINDOW_SIZE: Final = "1100,800"

CHROMIUM_ARGS: Final = (
    "--headless=new",
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    f"--window-size={WINDOW_SIZE}",
)


class WebDriverError(RuntimeError):
    """chromedriver answered a command with an error."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Browser:
    """One headless Chromium session: navigate, find and click elements, read the page and its traffic."""

    def __init__(self, driver_url: str, session_id: str) -> None:
        self._base = f"{driver_url}/session/{session_id}"
        self._http = requests.Session()

    def _command(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, self._base + path, json=payload, timeout=COMMAND_TIMEOUT_SEC)
        value = response.json().get("value")
        if response.status_code != 200:
            error = value.get("error") if isinstance(value, dict) else None
            message = value.get("message", "") if isinstance(value, dict) else ""
            raise WebDriverError(f"{method} {path}: {error}: {message.splitlines()[0] if message else ''}")
        return value

    def get(self, url: str) -> None:
        self._command("POST", "/url", {"url": url})

    @property
    def current_url(self) -> str:
        return str(self._command("GET", "/url"))

    @property
    def page_source(self) -> str:
        return str(self._command("GET", "/source"))

    @property
    def title(self) -> str:
        return str(self._command("GET", "/title"))

    def text_of(self, css_selector: str) -> str:
        return str(self._command("GET", f"/element/{self._find(css_selector)}/text"))

    def click(self, css_selector: str) -> None:
        self._command("POST", f"/element/{self._find(css_selector)}/click", {})

    def wait_for(self, css_selector: str, timeout: float = 10.0) -> None:
        """Wait until an element matching the selector exists (after a click that navigates)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._find(css_selector)
                return
            except WebDriverError:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)  # polling a real browser, not a test clock: nothing to inject

    def wait_for_url(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            url = self.current_url
            if url.startswith(prefix):
                return url
            if time.monotonic() >= deadline:
                raise WebDriverError(f"the browser is at {url}, not {prefix}...")
            time.sleep(0.05)

    def location_href(self) -> str:
        """window.location as the page itself sees it."""
        return str(self._command("POST", "/execute/sync", {"script": "return window.location.href;", "args": []}))

    def screenshot_png(self) -> bytes:
        return base64.b64decode(self._command("GET", "/screenshot"))

    def requested_urls(self) -> list[str]:
        """Every http(s) URL the browser requested or navigated to since the last call (redirect
        targets included), from Chromium's performance log; its own chrome:// pages are left out."""
        entries = self._command("POST", "/se/log", {"type": "performance"})
        urls: list[str] = []
        for entry in entries:
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
            elif message.get("method") == "Page.frameNavigated":
                urls.append(message["params"]["frame"]["url"])
        return [url for url in urls if url.startswith(("http://", "https://"))]

    def quit(self) -> None:
        with contextlib.suppress(requests.RequestException):
            self._http.delete(self._base, timeout=COMMAND_TIMEOUT_SEC)
        self._http.close()

    def _find(self, css_selector: str) -> str:
        found = self._command("POST", "/element", {"using": "css selector", "value": css_selector})
        return str(found[ELEMENT_KEY])


@contextlib.contextmanager
def headless_chromium() -> Iterator[Browser]:
    """chromedriver on a free port and one headless Chromium session, both ended afterwards."""
    port = _free_port()
    driver_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        driver = subprocess.Popen(
            [str(CHROMEDRIVER), f"--port={port}", "--log-level=OFF"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until_ready(driver_url, driver)
            capabilities = {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": str(CHROMIUM),
                    "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"],
                },
                "goog:loggingPrefs": {"performance": "ALL"},
                "pageLoadStrategy": "normal",
            }
            response = requests.post(
                driver_url + "/session",
                json={"capabilities": {"alwaysMatch": capabilities}},
                timeout=STARTUP_TIMEOUT_SEC * 3,
            )
            value = response.json()["value"]
            if response.status_code != 200:
                raise WebDriverError(f"could not start Chromium: {value.get('message', '')[:300]}")
            browser = Browser(driver_url, value["sessionId"])
            try:
                yield browser
            finally:
                browser.quit()
        finally:
            driver.terminate()
            try:
                driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()


def _wait_until_ready(driver_url: str, driver: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise WebDriverError(f"chromedriver exited with {driver.returncode}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(driver_url + "/status", timeout=1).json()["value"]["ready"]:
                return
        time.sleep(0.05)  # a real process starting up: nothing to inject
    raise WebDriverError("chromedriver did not become ready")
