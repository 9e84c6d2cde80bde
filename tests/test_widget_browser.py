"""The JavaScript widget in headless Chromium (Debian's `chromium`), driven
over the DevTools protocol: the example page connects, sends a message, shows
it acknowledged and shows the bot's reply; then the gateway cuts the
connection, the widget resumes, and a message typed into the input box is
acknowledged and answered with nothing lost or shown twice. A screenshot is
saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.browser import CHROMIUM, Cdp, chromium_page
from tests.gwserver import running

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make sysdeps)")


PAGE_STATE = (
    "({state: document.body && document.body.dataset.state,"
    " inbound: [...document.querySelectorAll('.msg-in')].map(e => e.textContent),"
    " acked: document.querySelectorAll('.msg-out.acked').length})"
)


def wait_for(cdp: Cdp, ok: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
    return cdp.poll(PAGE_STATE, lambda v: ok(v or {}), timeout) or {}  # type: ignore[no-any-return]


def drive(
    page_url: str, profile: Path, shot: Path, cut: Callable[[], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the page; returns its state after the first exchange and after a
    cut connection plus a message typed into the input box."""
    with chromium_page(page_url, profile) as cdp:
        first = wait_for(cdp, lambda r: bool(r.get("acked")) and len(r.get("inbound") or []) >= 2)
        cut()  # the gateway drops the TCP connection under the page
        wait_for(cdp, lambda r: r.get("state") != "open", timeout=5)
        wait_for(cdp, lambda r: r.get("state") == "open")
        cdp.eval(
            "document.getElementById('text').value = 'again';"
            " document.querySelector('#form button').click()"
        )
        second = wait_for(
            cdp,
            lambda r: r.get("acked") == 2 and any("again" in m for m in r.get("inbound") or []),
        )
        time.sleep(0.3)  # anything shown twice would show up by now
        second = wait_for(cdp, lambda r: True, timeout=0)
        cdp.screenshot(shot)
        return first, second


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


def load_twice(page_url: str, profile: Path) -> list[Any]:
    """Loads the page, waits for its conversation with a desk (assignment
    and reply), reloads it and waits again; the sticky ticket the widget
    kept after each load."""
    kept = []
    with chromium_page(page_url, profile) as cdp:
        for i in range(2):
            if i:
                cdp.eval("location.reload()")
                time.sleep(0.5)
            wait_for(cdp, lambda r: r.get("acked") == 1 and len(r.get("inbound") or []) >= 2)
            kept.append(cdp.eval("localStorage.getItem('gateway-chat-sticky')"))
    return kept


async def test_widget_keeps_its_sticky_ticket_across_page_loads(tmp_path: Path) -> None:
    """Behind a desk, the assignment brings a sticky ticket; the widget
    stores it and the reloaded page's new session presents it (the
    gateway counts it used)."""
    from tests.test_downstream import desk, ds, wait_links_up

    async with desk(think_ms=0) as (dport, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [dport]))) as gw:
            await wait_links_up(gw.w.forwarder)
            url = f"http://127.0.0.1:{gw.port}/example.html?token={gw.token('browser')}&auto=hi"
            kept = await trio.to_thread.run_sync(load_twice, url, tmp_path / "profile")
            assert all(type(k) is str and k.startswith("s1.") for k in kept), kept
            assert gw.stats["sessions_opened"] == 2  # a reload is a new session
            assert gw.stats["sticky_tickets_issued"] == 2
            assert gw.stats["sticky_tickets_used"] == 1
            assert gw.stats["sticky_tickets_refused"] == 0
