"""A real browser for tests: headless Chromium (Debian's `chromium` package) renders a page.

`render_page(path, workdir)` runs one Chromium process that loads a local HTML file, waits for
its load event, and returns the DOM as Chromium serialises it afterwards (`--dump-dom`: what
scripts on the page wrote is in it), a PNG screenshot of the window, and every network request
the page started (from Chromium's own net log, `--log-net-log`). The flags are those that keep
Chromium's own background traffic off (no sync, no component updates, no QUIC, no first-run
page) with a fresh profile. Where `unshare -n` works (root, Linux), Chromium also runs in a new
network namespace with no interface but loopback: the page cannot reach anything even if it
tried, and the net log still records each attempt.

`.ci/run` and `make test` install the package when it is missing (apt-get); a test that needs it
calls `require_chromium()`, which skips with the reason when it is not there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium not found (Debian package 'chromium'; `make test` and .ci/run install it "
                    "with apt-get when they can)")
    return path


def _network_isolation() -> list[str]:
    """`unshare -n` when this process may create a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@dataclass
class Rendered:
    dom: str  # the DOM after the load event, serialised by Chromium
    screenshot: bytes  # PNG of the window
    page_requests: list[str]  # URLs of requests the page itself started (empty for a self-contained page)
    network_isolated: bool  # Chromium ran with no network (unshare -n)


def render_page(html_path: str, workdir: str, *, width: int = 1200, height: int = 4000,
                timeout_seconds: float = 90) -> Rendered:
    chromium = require_chromium()
    os.makedirs(workdir, exist_ok=True)
    screenshot = os.path.join(workdir, "screenshot.png")
    net_log = os.path.join(workdir, "netlog.json")
    isolation = _network_isolation()
    command = [*isolation, chromium, *CHROMIUM_FLAGS, f"--user-data-dir={os.path.join(workdir, 'profile')}",
               f"--window-size={width},{height}", f"--screenshot={screenshot}", f"--log-net-log={net_log}",
               "--dump-dom", "file://" + os.path.abspath(html_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(screenshot, "rb") as f:
        png = f.read()
    return Rendered(dom=proc.stdout, screenshot=png, page_requests=page_requests(net_log),
                    network_isolated=bool(isolation))


def page_requests(net_log_path: str) -> list[str]:
    """URLs of the URL requests that a page loaded from file:// started, from a Chromium net log.

    Chromium's own requests (time sync, promotions) run outside any page: their network
    isolation key is not the page's file:// site. data: URIs never become URL requests.
    """
    with open(net_log_path, encoding="utf-8") as f:
        log = json.load(f)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start_job and str(params.get("network_isolation_key", "")).startswith("file://"):
            urls.append(params.get("url", ""))
    return urls


class DomReader(HTMLParser):
    """Elements' attributes and text from serialised HTML (the DOM Chromium dumped, or a file)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._text_of: list[list[str]] = []
        self._stack: list[int] = []
        self.text_parts: list[str] = []
        self.feed(html)
        self.close()

    VOID = {"img", "meta", "link", "br", "hr", "input", "source", "area", "base", "col", "embed", "wbr"}

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: (v or "") for k, v in attrs}))
        self._text_of.append([])
        if tag not in self.VOID:
            self._stack.append(len(self.elements) - 1)

    def handle_endtag(self, tag):
        while self._stack:
            i = self._stack.pop()
            if self.elements[i][0] == tag:
                break

    def handle_data(self, data):
        self.text_parts.append(data)
        for i in self._stack:
            self._text_of[i].append(data)

    def text(self, index: int) -> str:
        return "".join(self._text_of[index]).strip()

    def find(self, **attrs) -> list[tuple[int, str, dict[str, str]]]:
        """Elements whose attributes include ``attrs`` (names with '_' for '-'; value None: any)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [(i, tag, a) for i, (tag, a) in enumerate(self.elements)
                if all(k in a and (v is None or a[k] == v) for k, v in wanted.items())]

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())
