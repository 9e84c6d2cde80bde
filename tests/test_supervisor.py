from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from gateway.config import DEMO_TENANT, Config, load_config
from gateway.protocol.tokens import TokenVerifier
from gateway.supervisor import banner
from tests.test_server_process import free_port

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

DRIVER = """
import os, sys
from gateway.config import Config
from gateway.supervisor import run_supervisor
cfg = Config.from_json(os.environ["SUP_TEST_CONFIG"])
sys.exit(run_supervisor(cfg, "supervisor_fake_worker",
         max_restarts_per_minute=int(os.environ.get("SUP_TEST_MAX_RESTARTS", "10")),
         kill_grace_s=float(os.environ.get("SUP_TEST_GRACE", "5"))))
"""


class Sup:
    def __init__(self, proc: trio.Process, d: Path, port: int) -> None:
        self.proc = proc
        self.dir = d
        self.port = port

    def events(self) -> list[list[str]]:
        p = self.dir / "events"
        if not p.exists():
            return []
        return [line.split() for line in p.read_text().splitlines() if line]

    def starts(self) -> list[list[str]]:
        return [e for e in self.events() if e[0] == "start"]

    async def wait_for(self, pred: Any, timeout: float = 15.0) -> None:
        with trio.fail_after(timeout):
            while not pred():
                await trio.sleep(0.05)

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (self.dir / "stderr").read_text().splitlines() if x]

    def stdout(self) -> str:
        return (self.dir / "stdout").read_text()


async def start(
    tmp_path: Path, mode: str = "normal", workers: int = 2, ops_listen: str = "", **extra_env: str
) -> Sup:
    state = tmp_path / "state"
    port = free_port()  # passed to the workers; the fake ones do not bind it
    # no ops listener by default: a fixed ops port may be taken by another run
    overrides = {"workers": workers, "listen_port": port, "drain_s": 1.0, "ops_listen": ops_listen}
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(state)}, overrides)
    env = dict(os.environ)
    env.update(
        SUP_TEST_CONFIG=cfg.to_json(),
        FAKE_DIR=str(tmp_path),
        FAKE_MODE=mode,
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]),
        **extra_env,
    )
    out = open(tmp_path / "stdout", "wb")  # noqa: SIM115
    err = open(tmp_path / "stderr", "wb")  # noqa: SIM115
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", DRIVER], env=env, stdout=out, stderr=err,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out.close()
    err.close()
    return Sup(proc, tmp_path, port)


async def finish(sup: Sup, timeout: float = 20.0) -> int:
    try:
        with trio.fail_after(timeout):
            return await sup.proc.wait()
    finally:
        if sup.proc.returncode is None:
            sup.proc.kill()
            await sup.proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; check its state
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def test_starts_workers_and_drains_cleanly_on_sigterm(tmp_path: Path) -> None:
    sup = await start(tmp_path, workers=2)
    await sup.wait_for(lambda: len(sup.starts()) == 2)
    starts = sup.starts()
    assert sorted(s[1] for s in starts) == ["0", "1"]
    assert all(s[3] == str(sup.port) for s in starts)  # config reached the workers
    sup.proc.send_signal(signal.SIGTERM)
    assert await finish(sup) == 0
    terms = [e for e in sup.events() if e[0] == "term"]
    assert sorted(t[1] for t in terms) == ["0", "1"]
    for s in starts:
        assert not alive(int(s[2]))
    events = [rec["event"] for rec in sup.logs()]
    assert events.count("worker_started") == 2
    assert "draining" in events and events[-1] == "stopped"
    assert sup.logs()[-1]["clean"] is True
    # banner with a working demo token
    out = sup.stdout()
    assert f"ws://127.0.0.1:{sup.port}/v1/ws" in out
    token = next(line for line in out.splitlines() if line.count(".") == 1 and " " not in line)
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path / "state")}, {})
    assert TokenVerifier(cfg.tenants).verify(token, time.time()).tenant == "demo"


async def test_sigint_also_drains(tmp_path: Path) -> None:
    sup = await start(tmp_path, workers=1)
    await sup.wait_for(lambda: len(sup.starts()) == 1)
    sup.proc.send_signal(signal.SIGINT)
    assert await finish(sup) == 0
    assert [e[0] for e in sup.events()] == ["start", "term"]


async def test_crashed_worker_is_restarted(tmp_path: Path) -> None:
    sup = await start(tmp_path, mode="crash_once", workers=2)
    await sup.wait_for(lambda: len(sup.starts()) == 3)
    starts = sup.starts()
    zero = [s for s in starts if s[1] == "0"]
    assert len(zero) == 2 and zero[0][2] != zero[1][2]  # a new process
    await sup.wait_for(lambda: alive(int(zero[1][2])))
    died = [r for r in sup.logs() if r["event"] == "worker_died"]
    assert len(died) == 1 and died[0]["worker"] == 0 and died[0]["code"] == 3
    assert died[0]["restarts"] == 1
    sup.proc.send_signal(signal.SIGTERM)
    assert await finish(sup) == 0
    assert sup.logs()[-1]["restarts"] == 1


async def test_restart_limit_stops_the_gateway(tmp_path: Path) -> None:
    sup = await start(tmp_path, mode="always_crash", workers=1, SUP_TEST_MAX_RESTARTS="3")
    assert await finish(sup) == 1
    assert len(sup.starts()) == 4  # first start + 3 restarts
    events = [r["event"] for r in sup.logs()]
    assert events.count("worker_died") == 3
    assert "restart_limit" in events
    # backoff doubles
    delays = [r["restart_in_s"] for r in sup.logs() if r["event"] == "worker_died"]
    assert delays == [0.1, 0.2, 0.4]


async def test_busy_ops_port_refuses_to_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        sup = await start(tmp_path, workers=1, ops_listen=f"127.0.0.1:{busy}")
        assert await finish(sup) == 1
    assert sup.starts() == []  # no worker was started
    failed = [r for r in sup.logs() if r["event"] == "ops_listen_failed"]
    assert len(failed) == 1 and failed[0]["address"] == f"127.0.0.1:{busy}"


async def test_workers_outliving_the_drain_are_killed(tmp_path: Path) -> None:
    sup = await start(tmp_path, mode="stubborn", workers=2, SUP_TEST_GRACE="0.3")
    await sup.wait_for(lambda: len(sup.starts()) == 2)
    pids = [int(s[2]) for s in sup.starts()]
    sup.proc.send_signal(signal.SIGTERM)
    assert await finish(sup) == 1  # not a clean drain
    assert sorted(e[1] for e in sup.events() if e[0] == "term") == ["0", "1"]
    for pid in pids:
        assert not alive(pid)
    killed = [r for r in sup.logs() if r["event"] == "worker_killed"]
    assert len(killed) == 2 and all(r["why"] == "drain deadline" for r in killed)


async def test_second_signal_kills_at_once(tmp_path: Path) -> None:
    sup = await start(tmp_path, mode="stubborn", workers=1)  # 1 s drain + 5 s grace
    await sup.wait_for(lambda: len(sup.starts()) == 1)
    sup.proc.send_signal(signal.SIGTERM)
    await sup.wait_for(lambda: any(e[0] == "term" for e in sup.events()))
    sup.proc.send_signal(signal.SIGTERM)
    assert await finish(sup, timeout=4.0) == 1
    assert any(r["event"] == "second_signal" for r in sup.logs())


async def test_workers_drain_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    sup = await start(tmp_path, workers=1)
    await sup.wait_for(lambda: len(sup.starts()) == 1)
    sup.proc.kill()
    await sup.proc.wait()
    # the orphaned worker notices (watch_parent) and drains
    await sup.wait_for(lambda: any(e[0] == "term" for e in sup.events()), timeout=5.0)


def test_banner_without_demo_tenant(tmp_path: Path) -> None:
    cfg = Config(
        listen_host="::",
        listen_port=443,
        tls_cert="c",
        tls_key="k",
        ops_listen="",
        state_dir=str(tmp_path),
    )
    text = "\n".join(banner(cfg))
    assert "wss://[::1]:443/v1/ws" in text
    assert "https://[::1]:443/example.html" in text
    assert "ops/metrics" not in text
    assert DEMO_TENANT not in text
    assert "gateway token --tenant T --visitor V" in text
