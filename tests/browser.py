"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol,
shared by the browser tests."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Cdp:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next = 1

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = self.next
        self.next += 1
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=20))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})  # type: ignore[no-any-return]

    def eval(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")

    def poll(self, expr: str, ok: Callable[[Any], bool], timeout: float = 20) -> Any:
        """Evaluates ``expr`` until ``ok(value)`` or the timeout; returns the
        last value."""
        deadline = time.monotonic() + timeout
        value = self.eval(expr)
        while not ok(value) and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.eval(expr)
        return value

    def screenshot(self, path: Path) -> None:
        png = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(png))


@contextmanager
def chromium_page(url: str, profile: Path) -> Iterator[Cdp]:
    """A headless Chromium showing ``url``; yields its DevTools session."""
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        assert port is not None, "chromium did not start its DevTools endpoint"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(t for t in targets if t["type"] == "page")
        with ws_connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            cdp = Cdp(ws)
            cdp.call("Page.enable")
            cdp.call("Page.navigate", url=url)
            yield cdp
    finally:
        proc.kill()
        proc.wait()
