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
from test_dashboard import host_profile_record

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
# url path -> (heading, plotly charts the page draws, text that shows its numbers were computed)
PAGES = {
    "": ("Roofline", 1, "Roofline: phi-3-mini, weights q4_0, KV cache f16, context 256 tokens"),
    "Devices": ("Devices", 2, "Predictions"),
    "Context": ("Context", 2, "KV cache overtakes weights at"),
    "Host_profile": ("Host profile", 1, "Per op group"),
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
    # A known host profile (not this machine's): the Host page shows it, the Roofline its measured points.
    host_profile = Path(tempfile.mkdtemp(prefix="perfsim-host-")) / "host-profile.json"
    host_profile.write_text(json.dumps(host_profile_record()))
    env = os.environ | {"PERFSIM_HOST_PROFILE": str(host_profile)}
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
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  return {
    text: document.body ? document.body.innerText : "",
    headings: [...document.querySelectorAll('h1')].map(h => h.innerText.trim()),
    charts: [...document.querySelectorAll('.js-plotly-plot')].filter(c => c.querySelector('.main-svg')).length,
    exceptions: [...document.querySelectorAll('[data-testid="stException"]')].map(e => e.innerText),
    errors: [...document.querySelectorAll('[data-testid="stAlertContentError"]')].map(e => e.innerText),
    running: running ? running.innerText : "",
    query: location.search,
  };
})()"""
CHART_TITLES = "[...document.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent).join('\\n')"


class Tab:
    """A browser tab on the app, 1400 x 2000 CSS pixels: tall enough for a whole page in one screenshot
    (Streamlit scrolls inside its own container, so a full-page capture would not help)."""

    def __init__(self, browser: DevTools, url: str):
        self.browser = browser
        self.closed = False
        self.target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=self.target, flatten=True)["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride", self.session, width=1400, height=2000, deviceScaleFactor=1, mobile=False)
        browser.call("Page.bringToFront", self.session)  # typing goes to the focused tab
        browser.call("Page.navigate", self.session, url=url)

    def evaluate(self, expression: str):
        return self.browser.evaluate(self.session, expression)

    def wait_until_drawn(self, heading: str, n_charts: int, marker: str) -> dict:
        """The page's state once Streamlit has drawn the heading, the marker text and the charts, and is
        no longer running (or as it is at the timeout, or when an exception box appears)."""
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while True:
            state = self.evaluate(RENDERED) or {}
            done = heading in state.get("headings", []) and marker in state.get("text", "") and state.get("charts", 0) >= n_charts
            if state.get("exceptions") or (done and "Running" not in state.get("running", "")) or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def screenshot(self, name: str) -> None:
        time.sleep(0.5)  # Plotly's own transitions
        picture = base64.b64decode(self.browser.call("Page.captureScreenshot", self.session, format="png")["data"])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.png").write_bytes(picture)

    def type_into_number_input(self, text: str) -> None:
        """Replace the page's (first) number input with `text` and press Enter, as a user would. Streamlit
        may redraw the sidebar just after the first run; retry until the input holds what was typed."""
        deadline = time.monotonic() + 10
        while True:
            self.evaluate("(() => { const i = document.querySelector('input[type=number]'); i.focus(); i.select(); })()")
            self.browser.call("Input.insertText", self.session, text=text)
            typed = self.evaluate("(document.querySelector('input[type=number]') || {}).value")
            if typed == text:
                break
            if time.monotonic() > deadline:
                self.screenshot("failed-typing")
                pytest.fail(f"typed {text!r}, the input holds {typed!r}")
            time.sleep(0.2)
        for kind in ("keyDown", "keyUp"):
            self.browser.call("Input.dispatchKeyEvent", self.session, type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def seconds_until_chart_title_has(self, text: str) -> float:
        start = time.perf_counter()
        while text not in (self.evaluate(CHART_TITLES) or ""):
            if time.perf_counter() - start > PAGE_TIMEOUT_S:
                raise TimeoutError(f"no chart title with {text!r} after {PAGE_TIMEOUT_S} s")
            time.sleep(0.02)
        return time.perf_counter() - start

    def close(self):
        self.browser.call("Target.closeTarget", targetId=self.target)
        self.closed = True


@pytest.fixture
def tab(browser):
    tabs = []

    def open_tab(url):
        tabs.append(Tab(browser, url))
        return tabs[-1]

    yield open_tab
    for t in tabs:
        if not t.closed:
            t.close()


@pytest.mark.parametrize("url_path", list(PAGES))
def test_page_renders_in_chromium(app_url, tab, url_path):
    heading, n_charts, marker = PAGES[url_path]
    page = tab(f"{app_url}/{url_path}")
    state = page.wait_until_drawn(heading, n_charts, marker)
    page.screenshot(heading.lower().replace(" ", "_"))
    assert state.get("exceptions") == [], state.get("exceptions")
    assert state.get("errors") == [], state.get("errors")
    assert heading in state.get("headings", []), state.get("text", "")[:500]
    assert marker in state["text"]
    assert state["charts"] == n_charts
    for other in ("Roofline", "Devices", "Context", "Host profile"):  # the navigation lists every page
        assert other in state["text"]


def test_a_shared_url_opens_the_same_view(app_url, tab):
    page = tab(f"{app_url}/?devices=a16,m2&context=1024&weights=q8_0&all_units=true")
    state = page.wait_until_drawn("Roofline", 1, "context 1,024 tokens")
    page.screenshot("roofline_shared_url")
    assert not state["exceptions"]
    assert "Roofline: phi-3-mini, weights q8_0, KV cache f16, context 1,024 tokens" in state["text"]
    for legend in ("a16 gpu ops", "m2 gpu ops", "a16 cpu int8 roof"):
        assert legend in state["text"]


def test_widget_change_redraws_within_2_s_updates_the_url_and_carries_to_other_pages(app_url, tab):
    """The issue's bar for Roofline and Devices: under 2 s from a widget change to the redrawn chart,
    measured in the browser (server rerun, websocket, Plotly drawing); the median of three changes, each
    to a context not seen before, so every one misses the cache."""
    page = None
    for path, heading, first_context in (("", "Roofline", 300), ("Devices", "Devices", 700)):
        if page is not None:
            page.close()
        page = tab(f"{app_url}/{path}")
        state = page.wait_until_drawn(heading, 1, "context 256 tokens")
        assert heading in state.get("headings", []) and not state.get("exceptions"), state
        seconds = []
        for context in (first_context, first_context + 37, first_context + 74):
            page.type_into_number_input(str(context))
            seconds.append(page.seconds_until_chart_title_has(f"context {context:,} tokens"))
        print(f"{heading}: redrawn {', '.join(f'{s:.2f}' for s in seconds)} s after a context change")
        assert sorted(seconds)[1] < 2.0, seconds
        assert f"context={first_context + 74}" in page.evaluate("location.search")
    # The last view's inputs follow the user to another page (the URL does not carry across the link).
    page.evaluate("document.querySelector('a[href$=\"/Context\"]').click()")
    state = page.wait_until_drawn("Context", 2, "Decode speed vs context")
    assert not state["exceptions"]
    assert page.evaluate("document.querySelector('input[type=number]').value") == "774"
