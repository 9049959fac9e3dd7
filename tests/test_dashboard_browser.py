"""The dashboard in a real browser: `streamlit run` on a free localhost port, headless Chromium driven
through the DevTools protocol (a page's content arrives over Streamlit's websocket after load, which
`--dump-dom` does not wait for), each page checked for its heading, its charts and no exception box.
A screenshot of each page is kept in test-artifacts/dashboard/."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from perfsim.dashboards import MAIN_PAGE

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
# url path -> (heading, plotly charts the page draws, text that shows its numbers were computed)
PAGES = {
    "": ("Roofline", 1, "Roofline: phi-3-mini, weights q4_0, KV cache f16, context 256 tokens"),
    "Devices": ("Devices", 2, "Predictions"),
    "Context": ("Context", 2, "KV cache overtakes weights at"),
    "Host_profile": ("Host profile", 0, "No host profile yet"),
}
PAGE_TIMEOUT_S = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


class DevTools:
    """The few DevTools protocol calls the test needs, over one browser-level websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, session: str | None = None, **params):
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params} | ({"sessionId": session} if session else {})))
        while True:
            reply = json.loads(self.ws.recv(timeout=PAGE_TIMEOUT_S))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, session: str, expression: str):
        return self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", MAIN_PAGE, "--server.headless", "true", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    # An empty cache directory: no host profile of this machine leaks into what the Host page shows.
    env = os.environ | {"XDG_CACHE_HOME": tempfile.mkdtemp(prefix="perfsim-cache-")}
    env.pop("PERFSIM_HOST_PROFILE", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/_stcore/health", process, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    profile_dir = tempfile.mkdtemp(prefix="perfsim-chromium-")
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile_dir}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        ws_url = None
        while ws_url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = found.group(1) if found else None
        if ws_url is None:
            pytest.fail("chromium did not start its DevTools endpoint")
        from websockets.sync.client import connect  # a dependency of streamlit

        with connect(ws_url, max_size=64 * 2**20) as ws:
            yield DevTools(ws)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile_dir, ignore_errors=True)


RENDERED = """(() => {
  const text = document.body ? document.body.innerText : "";
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  return {
    text: text,
    headings: [...document.querySelectorAll('h1')].map(h => h.innerText.trim()),
    charts: document.querySelectorAll('.js-plotly-plot .main-svg').length > 0
      ? document.querySelectorAll('.js-plotly-plot').length : 0,
    exceptions: [...document.querySelectorAll('[data-testid="stException"]')].map(e => e.innerText),
    errors: [...document.querySelectorAll('[data-testid="stAlertContentError"]')].map(e => e.innerText),
    running: running ? running.innerText : "",
  };
})()"""


def render(browser: DevTools, url: str, heading: str, n_charts: int, marker: str) -> tuple[dict, bytes]:
    """Open `url` in a new tab, wait until Streamlit has drawn the heading, the marker text and the charts
    (and says it is no longer running), then screenshot it."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    try:
        # Tall enough for a whole page in one screenshot (Streamlit scrolls inside its own container).
        browser.call("Emulation.setDeviceMetricsOverride", session, width=1400, height=2000, deviceScaleFactor=1, mobile=False)
        browser.call("Page.enable", session)
        browser.call("Page.navigate", session, url=url)
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        state = {}
        while time.monotonic() < deadline:
            state = browser.evaluate(session, RENDERED) or {}
            done = heading in state.get("headings", []) and marker in state.get("text", "") and state.get("charts", 0) >= n_charts
            if state.get("exceptions") or (done and "Running" not in state.get("running", "")):
                break
            time.sleep(0.25)
        time.sleep(0.5)  # let Plotly finish its transitions before the picture
        state = browser.evaluate(session, RENDERED) or state
        picture = base64.b64decode(browser.call("Page.captureScreenshot", session, format="png")["data"])
        return state, picture
    finally:
        browser.call("Target.closeTarget", targetId=target)


@pytest.mark.parametrize("url_path", list(PAGES))
def test_page_renders_in_chromium(app_url, browser, url_path):
    heading, n_charts, marker = PAGES[url_path]
    state, picture = render(browser, f"{app_url}/{url_path}", heading, n_charts, marker)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{heading.lower().replace(' ', '_')}.png").write_bytes(picture)
    assert state.get("exceptions") == [], state.get("exceptions")
    assert state.get("errors") == [], state.get("errors")
    assert heading in state.get("headings", []), state.get("text", "")[:500]
    assert marker in state["text"]
    assert state["charts"] >= n_charts
    for other in ("Roofline", "Devices", "Context", "Host profile"):  # the navigation lists every page
        assert other in state["text"]
