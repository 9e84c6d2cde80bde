"""The JavaScript widget in headless Chromium (Debian's `chromium`), driven
over the DevTools protocol: the example page connects, sends a message, shows
it acknowledged and shows the bot's reply; then the gateway cuts the
connection, the widget resumes, and a message typed into the input box is
acknowledged and answered with nothing lost or shown twice. A screenshot is
saved."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.gwserver import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make sysdeps)")


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

    def page_state(self) -> dict[str, Any]:
        return (
            self.eval(
                "({state: document.body && document.body.dataset.state,"
                " inbound: [...document.querySelectorAll('.msg-in')].map(e => e.textContent),"
                " acked: document.querySelectorAll('.msg-out.acked').length})"
            )
            or {}
        )

    def wait_for(self, ok: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state = self.page_state()
        while not ok(state) and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.page_state()
        return state


def drive(
    page_url: str, profile: Path, shot: Path, cut: Callable[[], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the page; returns its state after the first exchange and after a
    cut connection plus a message typed into the input box."""
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
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
            cdp.call("Page.navigate", url=page_url)
            first = cdp.wait_for(
                lambda r: bool(r.get("acked")) and len(r.get("inbound") or []) >= 2
            )
            cut()  # the gateway drops the TCP connection under the page
            cdp.wait_for(lambda r: r.get("state") != "open", timeout=5)
            cdp.wait_for(lambda r: r.get("state") == "open")
            cdp.eval(
                "document.getElementById('text').value = 'again';"
                " document.querySelector('#form button').click()"
            )
            second = cdp.wait_for(
                lambda r: r.get("acked") == 2 and any("again" in m for m in r.get("inbound") or [])
            )
            time.sleep(0.3)  # anything shown twice would show up by now
            second = cdp.page_state()
            png = cdp.call("Page.captureScreenshot", format="png")["data"]
            shot.write_bytes(base64.b64decode(png))
            return first, second
    finally:
        proc.kill()
        proc.wait()


async def test_example_page_conversation(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        if "/widget.js" not in gw.w.static:
            pytest.fail("static files missing from gateway/server/static")
        url = f"http://127.0.0.1:{gw.port}/example.html?token={gw.token('browser')}&auto=hello"
        shot = tmp_path / "example.png"

        def cut() -> None:
            for c in list(gw.w.conns):
                c.pipe.abort()

        def cut_from_thread() -> None:
            trio.from_thread.run_sync(cut)

        first, second = await trio.to_thread.run_sync(
            drive, url, tmp_path / "profile", shot, cut_from_thread
        )
        assert first.get("state") == "open"
        assert first.get("acked") == 1
        inbound = first.get("inbound") or []
        assert inbound[0].startswith("demo-bot: Hi!")
        assert "demo-bot: You said: hello" in inbound
        assert second.get("state") == "open" and second.get("acked") == 2
        assert second.get("inbound") == [*inbound, "demo-bot: You said: again"]
        assert shot.stat().st_size > 1000 and shot.read_bytes()[:4] == b"\x89PNG"
        assert gw.stats["sessions_opened"] == 1  # the page resumed its session
        assert gw.stats["sessions_resumed"] >= 1
