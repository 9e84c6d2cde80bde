"""Worker supervisor: starts the worker processes, restarts the ones that die,
forwards SIGTERM/SIGINT as a drain and kills what outlives it, and reloads
the configuration on SIGHUP.

Workers are ``sys.executable -m <worker_module> --index I`` with the whole
config as JSON in ``$GATEWAY_WORKER_CONFIG``. A worker that exits while the
gateway is not stopping is restarted after a backoff (0.1 s doubling up to
5 s); more than ``max_restarts_per_minute`` restarts of one worker within 60 s
stop the whole gateway (exit 1) instead of crash-looping. On the first signal
every worker gets SIGTERM; workers still alive ``drain_s + kill_grace_s``
seconds later (or at a second signal) get SIGKILL. The exit code is 0 when
every worker exited with 0 during the drain, 1 otherwise.

On SIGHUP the supervisor loads the configuration again (the same file and
command-line settings as at start, through the ``reload`` callable given to
:func:`run_supervisor`) and, when it differs only in what may change
without a restart (:mod:`gateway.reload`), sends it to every worker over
its control pipe (:mod:`gateway.server.control`); workers started later
get it too. An invalid configuration, or one that needs a restart, is
refused as a whole and logged; the gateway goes on with what it has.

Workers run a parent watch (:func:`watch_parent`: a thread polling
``getppid``) and drain if the supervisor itself dies. ``PR_SET_PDEATHSIG``
is not used: it fires when the *thread* that spawned the worker exits, and
trio spawns from worker threads.

Log lines are JSON objects on stderr, one per event; the start-up banner (URLs
and, for the demo tenant, a ready-made token) is plain text on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TextIO

import trio

from gateway import preflight
from gateway.config import (
    CONFIG_GENERATION_ENV,
    DEMO_TENANT,
    LOG_LEVELS,
    WORKER_CONFIG_ENV,
    Config,
    ConfigError,
    demo_secret_path,
    effective_workers,
    parse_hostport,
)
from gateway.ops.aggregate import Aggregator
from gateway.ops.app import OpsApp
from gateway.ops.report import STATS_FD_ENV
from gateway.ops.server import open_ops_listeners, serve_ops
from gateway.ops.wire import WireError, encode_snapshot, read_frames
from gateway.protocol.tokens import mint
from gateway.reload import file_sets, plan_reload
from gateway.server import tickets
from gateway.server.control import CONTROL_FD_ENV
from gateway.server.tlsconf import files_digest

__all__ = ["banner", "run_supervisor"]

BACKOFF_FIRST_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0
RESTART_WINDOW_S: Final = 60.0
DEMO_TOKEN_TTL_S: Final = 24 * 3600
DEMO_VISITOR: Final = "demo-visitor"
_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
#: How long a reload waits for a worker to take the new configuration from
#: its control pipe (a worker that does not is left to its restart).
RELOAD_SEND_TIMEOUT_S: Final = 5.0


class _Log:
    def __init__(self, level: str, stream: TextIO) -> None:
        self.set_level(level)
        self._stream = stream

    def set_level(self, level: str) -> None:
        """Logs from ``level`` up from now on (a reload)."""
        self._min = LOG_LEVELS.index(level)

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        if LOG_LEVELS.index(level) < self._min:
            return
        rec = {"ts": round(time.time(), 3), "level": level, "component": "supervisor"}
        rec["event"] = event
        rec.update(fields)
        try:
            self._stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the supervisor down


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def banner(cfg: Config, now: float | None = None) -> list[str]:
    """Human-readable start-up lines: where to connect and, when the demo
    tenant is in use, its secret file and a token valid for 24 h."""
    tls = cfg.tls_cert is not None
    host = f"{_url_host(cfg.listen_host)}:{cfg.listen_port}"
    http, ws = ("https", "wss") if tls else ("http", "ws")
    n = effective_workers(cfg)
    lines = [
        f"gateway: {n} worker(s) listening on {cfg.listen_host}:{cfg.listen_port}",
        f"gateway: WebSocket {ws}://{host}/v1/ws  HTTP/2 POST {http}://{host}/v1/stream",
        f"gateway: example page {http}://{host}/example.html",
    ]
    if cfg.ops_listen:
        ops_host, ops_port = parse_hostport(cfg.ops_listen)
        lines.append(f"gateway: ops/metrics http://{_url_host(ops_host)}:{ops_port}/")
    demo = cfg.tenants.get(DEMO_TENANT)
    path = demo_secret_path(cfg.state_dir)
    if demo is not None and path.is_file():
        kid = demo.primary_kid
        t = time.time() if now is None else now
        token = mint(DEMO_TENANT, DEMO_VISITOR, demo.secrets[kid], DEMO_TOKEN_TTL_S, t, kid=kid)
        lines += [
            f'gateway: no tenant configured: using tenant "{DEMO_TENANT}" (any origin),'
            f" secret in {path}",
            f'gateway: demo token (visitor "{DEMO_VISITOR}", valid 24 h):',
            token,
            f'gateway: e.g. {ws}://{host}/v1/ws then send {{"t":"hello","v":1,"token":"<token>"}}',
            f"gateway: more tokens: gateway token --tenant {DEMO_TENANT} --visitor NAME",
        ]
    else:
        lines.append("gateway: mint visitor tokens with: gateway token --tenant T --visitor V")
    return lines


def watch_parent(interval_s: float = 0.5) -> None:
    """Called by a worker: SIGTERM ourselves (the drain path) once the
    supervisor is gone (we get reparented).

    PR_SET_PDEATHSIG is not usable here: it fires when the *thread* that
    forked exits, and trio forks from its thread cache, whose idle threads
    exit after ~10 s, which drained every worker 10 s after start."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


class _Supervisor:
    def __init__(
        self,
        cfg: Config,
        worker_module: str,
        max_restarts_per_minute: int,
        kill_grace_s: float,
        log: _Log,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reloader = reload
        # the contents of the TLS files the workers loaded (a reload that
        # finds new contents at the same paths reloads them)
        self.digests = _digests(cfg)
        # each live worker's end of its control pipe, and the configuration
        # it was started with or last sent
        self.control: dict[int, trio.lowlevel.FdStream] = {}
        self.sent_config: dict[int, str] = {}
        self._reloading = trio.Lock()
        self.module = worker_module
        self.max_restarts = max_restarts_per_minute
        self.kill_grace_s = kill_grace_s
        self.log = log
        self.env = dict(os.environ)
        self.env[WORKER_CONFIG_ENV] = cfg.to_json()
        # reloads applied so far: the workers report the generation they
        # run (gateway.server.control), so one left behind shows
        self.generation = 0
        self.env[CONFIG_GENERATION_ENV] = "0"
        # the session-ticket key the workers share when no key file is
        # configured (gateway.server.tickets), for the supervisor's life
        self.env[tickets.KEY_ENV] = tickets.key_to_env(tickets.new_key())
        self.procs: dict[int, trio.Process] = {}
        self.final: dict[int, int | None] = {}
        self.stopping = trio.Event()
        self.failed = False
        self.killed = False
        self.restarts = 0
        self.agg = Aggregator(effective_workers(cfg))

    def _kill_all(self, why: str) -> None:
        for i, p in list(self.procs.items()):
            if p.returncode is None:
                self.killed = True
                self.log("warning", "worker_killed", worker=i, pid=p.pid, why=why)
                p.kill()

    def begin_stop(self, why: str) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.agg.draining = True
        self.log("info", "draining", why=why, workers=len(self.procs), drain_s=self.cfg.drain_s)
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)

    async def _spawn(self, index: int) -> tuple[trio.Process | None, int]:
        """Starts worker ``index`` with the write end of a fresh metrics pipe
        and the read end of a fresh control pipe (whose write end goes to
        ``self.control``); returns the process (None on failure) and the
        metrics pipe's read end."""
        argv = [sys.executable, "-m", self.module, "--index", str(index)]
        rfd, wfd = os.pipe()
        crfd, cwfd = os.pipe()
        env = dict(self.env)
        env[STATS_FD_ENV] = str(wfd)
        env[CONTROL_FD_ENV] = str(crfd)
        try:
            proc = await trio.lowlevel.open_process(
                argv, env=env, stdin=subprocess.DEVNULL, pass_fds=(wfd, crfd)
            )
        except OSError as e:
            self.log("error", "worker_spawn_failed", worker=index, error=str(e))
            os.close(rfd)
            os.close(cwfd)
            proc = None
            rfd = -1
        else:
            self.control[index] = trio.lowlevel.FdStream(cwfd)
            self.sent_config[index] = env[WORKER_CONFIG_ENV]
        finally:
            os.close(wfd)
            os.close(crfd)
        return proc, rfd

    async def reload(self) -> dict[str, Any]:
        """SIGHUP (or the operator endpoint's ``POST /-/reload``): loads
        the configuration again and hands it to the workers if it may be
        applied without a restart (module docstring). Returns what
        happened, as logged: ``result`` (applied, unchanged, refused,
        failed, unavailable) and its details."""
        async with self._reloading:
            if self.reloader is None:
                why = "the supervisor was started without a configuration loader"
                self.log("warning", "reload_unavailable", why=why)
                return {"result": "unavailable", "why": why}
            try:
                new = self.reloader()
                digests = _digests(new)
                preflight.check(new)  # the files load, or ConfigError
                changed = [k for k, d in digests.items() if self.digests.get(k) != d]
                plan = plan_reload(self.cfg, new, changed)
            except ConfigError as e:
                error = str(e)
            except Exception as e:  # a bug here must not take the gateway down
                error = f"internal error: {e!r}"
            else:
                error = ""
            if error:
                self._count_reload("failed")
                self.log("error", "reload_failed", error=error)
                return {"result": "failed", "error": error}
            if plan.needs_restart:
                self._count_reload("refused")
                why = "these settings change only with a restart; nothing was applied"
                self.log("error", "reload_refused", needs_restart=plan.needs_restart, why=why)
                return {"result": "refused", "needs_restart": plan.needs_restart, "why": why}
            if not plan.changes:
                self._count_reload("unchanged")
                self.log("info", "reload_unchanged")
                return {"result": "unchanged"}
            self.cfg = new  # (drain_s is read from it when a drain begins)
            self.digests = digests
            self.generation += 1
            self.agg.config_generation = self.generation
            self.env[CONFIG_GENERATION_ENV] = str(self.generation)
            if "log_level" in plan.settings:
                self.log.set_level(new.log_level)
            text = new.to_json()
            self.env[WORKER_CONFIG_ENV] = text  # for workers started from now on
            sent = [i for i in list(self.control) if await self._send_config(i, changed)]
            self._count_reload("applied")
            self.log("info", "reloaded", workers=sent, **plan.summary())
            return {"result": "applied", "workers": sent, **plan.summary()}

    async def _send_config(self, index: int, files: list[str]) -> bool:
        """The current configuration to worker ``index`` over its control
        pipe; False (logged) when it could not be written."""
        stream = self.control.get(index)
        if stream is None:
            return False
        text = self.env[WORKER_CONFIG_ENV]
        self.sent_config[index] = text
        frame = encode_snapshot(
            {"t": "reload", "config": text, "files": files, "gen": self.generation}
        )
        try:
            with trio.fail_after(RELOAD_SEND_TIMEOUT_S):
                await stream.send_all(frame)
            return True
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as e:  # fmt: skip
            self.log("warning", "reload_not_sent", worker=index, error=repr(e))
            return False

    def _count_reload(self, result: str) -> None:
        self.agg.reloads[result] = self.agg.reloads.get(result, 0) + 1

    async def read_stats(self, index: int, rfd: int) -> None:
        """Feeds worker ``index``'s snapshots to the aggregator until its
        pipe closes (the worker exited)."""
        try:
            await read_frames(rfd, lambda snap: self.agg.update(index, snap, trio.current_time()))
        except WireError as e:
            self.agg.bad_snapshots += 1
            self.log("error", "bad_snapshot", worker=index, error=str(e))

    async def worker_loop(self, index: int) -> None:
        recent: deque[float] = deque()
        while True:
            proc, rfd = await self._spawn(index)
            rc: int | None = None
            if proc is not None:
                self.procs[index] = proc
                self.log("info", "worker_started", worker=index, pid=proc.pid)
                if self.sent_config.get(index) != self.env[WORKER_CONFIG_ENV]:
                    # a reload came while it was being started
                    await self._send_config(index, [])
                if self.stopping.is_set():  # the stop came while we were spawning
                    proc.send_signal(signal.SIGTERM)
                try:
                    async with trio.open_nursery() as n:
                        n.start_soon(self.read_stats, index, rfd)
                        rc = await proc.wait()
                        # the last snapshot is in the pipe; a grandchild
                        # holding it open must not keep us here
                        n.cancel_scope.deadline = trio.current_time() + 1.0
                finally:
                    del self.procs[index]
                    self.agg.worker_gone(index)
                    stream = self.control.pop(index, None)
                    if stream is not None:
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
            if self.stopping.is_set():
                self.final[index] = rc
                level = "info" if rc == 0 else "warning"
                self.log(level, "worker_exited", worker=index, code=rc)
                return
            now = trio.current_time()
            while recent and now - recent[0] > RESTART_WINDOW_S:
                recent.popleft()
            if len(recent) >= self.max_restarts:
                self.log(
                    "error",
                    "restart_limit",
                    worker=index,
                    code=rc,
                    restarts_per_minute=len(recent),
                )
                self.failed = True
                self.final[index] = rc
                self.begin_stop("restart limit")
                return
            recent.append(now)
            self.restarts += 1
            self.agg.restarts = self.restarts
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (len(recent) - 1))
            self.log(
                "error",
                "worker_died",
                worker=index,
                code=rc,
                restart_in_s=delay,
                restarts=self.restarts,
            )
            with trio.move_on_after(delay):
                await self.stopping.wait()
            if self.stopping.is_set():
                self.final[index] = rc
                return

    async def signal_loop(self, signals: Any, nursery: trio.Nursery) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if not self.stopping.is_set():
                    self.log("info", "reloading", signal=name)
                    nursery.start_soon(self.reload)
            elif self.stopping.is_set():
                self.log("warning", "second_signal", signal=name)
                self._kill_all(f"second {name}")
            else:
                self.begin_stop(name)

    async def deadline_loop(self) -> None:
        await self.stopping.wait()
        await trio.sleep(self.cfg.drain_s + self.kill_grace_s)
        self._kill_all("drain deadline")

    async def tick_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.agg.tick(trio.current_time())

    async def run(self) -> int:
        n = effective_workers(self.cfg)
        listeners: list[trio.SocketListener] = []
        if self.cfg.ops_listen:
            host, port = parse_hostport(self.cfg.ops_listen)
            try:
                listeners = await open_ops_listeners(host, port)
            except OSError as e:
                self.log("error", "ops_listen_failed", address=self.cfg.ops_listen, error=str(e))
                return 1
        with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGHUP) as signals:
            self.log("info", "starting", workers=n, pid=os.getpid(), module=self.module)
            async with trio.open_nursery() as outer:
                outer.start_soon(self.signal_loop, signals, outer)
                outer.start_soon(self.deadline_loop)
                outer.start_soon(self.tick_loop)
                if listeners:
                    app = OpsApp(self.agg, self.cfg.ops_token, trio.current_time, self.reload)
                    outer.start_soon(serve_ops, app, listeners)
                    self.log("info", "ops_listening", address=self.cfg.ops_listen)
                async with trio.open_nursery() as workers:
                    for i in range(n):
                        workers.start_soon(self.worker_loop, i)
                outer.cancel_scope.cancel()
        clean = not self.failed and not self.killed and all(rc == 0 for rc in self.final.values())
        self.log(
            "info" if clean else "error",
            "stopped",
            clean=clean,
            restarts=self.restarts,
            codes={str(k): v for k, v in sorted(self.final.items())},
        )
        return 0 if clean else 1


def _digests(cfg: Config) -> dict[str, bytes]:
    """A digest of each set of TLS files (:func:`gateway.reload.file_sets`)."""
    return {k: files_digest(*paths) for k, paths in file_sets(cfg).items()}


def run_supervisor(
    cfg: Config,
    worker_module: str = "gateway.server.worker",
    *,
    max_restarts_per_minute: int = 10,
    kill_grace_s: float = 5.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    reload: Callable[[], Config] | None = None,
) -> int:
    """Runs the workers until a stop signal (or the restart limit); returns
    the process exit code. ``reload`` loads the configuration again on
    SIGHUP (raising :class:`ConfigError`); without it, SIGHUP is logged
    and ignored. Must be called from the main thread."""
    if max_restarts_per_minute < 0:
        raise ValueError("max_restarts_per_minute must be >= 0")
    o = sys.stdout if out is None else out
    for line in banner(cfg):
        o.write(line + "\n")
    o.flush()
    log = _Log(cfg.log_level, sys.stderr if err is None else err)
    sup = _Supervisor(cfg, worker_module, max_restarts_per_minute, kill_grace_s, log, reload)
    return trio.run(sup.run)
