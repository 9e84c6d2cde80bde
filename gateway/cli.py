"""``gateway`` command line: ``serve``, ``token``, ``desk-sim``, ``desk-check``,
``loadtest``, ``selfcheck``.

Subcommands are entries of :data:`COMMANDS` (name, help, argument setup,
handler), registered with the :func:`command` decorator; later ones
(``desk-sim``, ``loadtest``) are added the same way and import their modules
lazily inside the handler. Handlers
return the exit code: 0 success, 1 failure at run time, 2 bad usage or
configuration (argparse errors exit 2 as well).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import ConfigError, load_config, parse_hostport

__all__ = ["COMMANDS", "build_parser", "command", "main"]

PROG = "gateway"
DEFAULT_TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 366 * 24 * 3600


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, setup: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Registers ``fn(args) -> exit code`` as subcommand ``name``, its
    arguments added by ``setup(parser)``."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, setup or (lambda p: None), fn)
        return fn

    return deco


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ops_listen(text: str) -> str:
    if text:
        _hostport(text)
    return text


def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {rng}: {text}")
        return v

    return parse


def _load(path: str | None, overrides: dict[str, Any]) -> Any:
    return load_config(path, os.environ, overrides)


# --- serve -------------------------------------------------------------------


def _setup_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: $GATEWAY_CONFIG)")
    p.add_argument("--listen", metavar="HOST:PORT", type=_hostport, help="listen address")
    p.add_argument(
        "--workers", metavar="N", type=_int_at_least(0), help="worker processes (0 = auto)"
    )
    p.add_argument("--max-connections", metavar="N", type=_int_at_least(1),
                   help="connections to size the worker count for")  # fmt: skip
    p.add_argument("--ops-listen", metavar="HOST:PORT", type=_ops_listen,
                   help='metrics/health listener ("" disables)')  # fmt: skip
    p.add_argument("--downstream", metavar="GROUP=HOST:PORT[,HOST:PORT...]", action="append",
                   default=[], help="point a skill group at downstream endpoints (repeatable; "
                   "the first is the default group)")  # fmt: skip
    p.add_argument("--check", action="store_true",
                   help="check the configuration (and the files it names), describe it and "
                   "exit: 0 if it would start, 2 if not")  # fmt: skip


@command("serve", "run the gateway (supervisor + workers)", _setup_serve)
def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        "workers": args.workers,
        "max_connections": args.max_connections,
        "ops_listen": args.ops_listen,
        "downstream_specs": args.downstream,
    }
    if args.listen is not None:
        overrides["listen_host"], overrides["listen_port"] = args.listen
    from gateway import preflight

    try:
        cfg = _load(args.config, overrides)
        preflight.check(cfg)
        if args.check:
            source = args.config or os.environ.get("GATEWAY_CONFIG") or "defaults"
            for line in preflight.summary(cfg, f"{source}, environment, command line"):
                print(f"gateway: {line}")
    except ConfigError as e:
        _err(f"config error: {e}")
        return 2
    if args.check:
        print("gateway: configuration OK")
        return 0
    from gateway.supervisor import run_supervisor

    # SIGHUP: the same file and command-line settings, read again
    return run_supervisor(cfg, reload=lambda: _load(args.config, overrides))


# --- token -------------------------------------------------------------------


def _setup_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", required=True, help="tenant name")
    p.add_argument("--visitor", required=True, help="visitor id")
    p.add_argument("--ttl", metavar="S", type=_int_at_least(1, MAX_TOKEN_TTL_S),
                   default=DEFAULT_TOKEN_TTL_S,
                   help=f"lifetime in seconds (default {DEFAULT_TOKEN_TTL_S})")  # fmt: skip
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: $GATEWAY_CONFIG)")


@command("token", "print a visitor token minted with the tenant's first secret", _setup_token)
def _token(args: argparse.Namespace) -> int:
    from gateway.protocol.tokens import mint

    if not args.visitor:
        _err("token: --visitor must not be empty")
        return 2
    try:
        cfg = _load(args.config, {})
    except ConfigError as e:
        _err(f"config error: {e}")
        return 2
    tenant = cfg.tenants.get(args.tenant)
    if tenant is None:
        known = ", ".join(sorted(cfg.tenants)) or "none"
        _err(f"token: unknown tenant {args.tenant!r} (configured: {known})")
        return 2
    kid = tenant.primary_kid
    print(mint(tenant.name, args.visitor, tenant.secrets[kid], args.ttl, time.time(), kid=kid))
    return 0


# --- desk-sim ----------------------------------------------------------------


def _float_at_least(lo: float, hi: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v) or not v >= lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}: {text}")
        return v

    return parse


def _header_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip().lower()
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text!r}")
    return name, value


def _setup_desk_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", metavar="HOST:PORT", type=_hostport, default=("127.0.0.1", 7001),
                   help="address to serve on (default 127.0.0.1:7001)")  # fmt: skip
    p.add_argument("--latency-ms", metavar="N", type=_float_at_least(0.0), default=0.0,
                   help="delay before each ack")  # fmt: skip
    p.add_argument("--think-ms", metavar="N", type=_float_at_least(0.0), default=200.0,
                   help="delay before each reply (default 200)")  # fmt: skip
    p.add_argument("--error-rate", metavar="F", type=_float_at_least(0.0, 1.0), default=0.0,
                   help="share of messages answered with nack (0..1)")  # fmt: skip
    p.add_argument("--agents", metavar="N", type=_int_at_least(1), default=4,
                   help="agents per skill group (default 4)")  # fmt: skip
    p.add_argument("--capacity", metavar="N", type=_int_at_least(1), default=8,
                   help="sessions per agent (default 8)")  # fmt: skip
    p.add_argument("--stall-after", metavar="N", type=_int_at_least(0), default=0,
                   help="stop answering after N messages (0 = never)")  # fmt: skip
    p.add_argument("--crash-after", metavar="N", type=_int_at_least(0), default=0,
                   help="exit abruptly after N messages (0 = never)")  # fmt: skip
    p.add_argument("--no-reply", action="store_true", help="ack only, no replies")
    p.add_argument("--single-acks", action="store_true",
                   help="one ack frame per message instead of one acks frame per read")  # fmt: skip
    p.add_argument("--processes", metavar="N", type=_int_at_least(1, 64), default=1,
                   help="server processes sharing the port (SO_REUSEPORT)")  # fmt: skip
    p.add_argument("--record", metavar="FILE",
                   help="append one JSON line per accepted visitor message")  # fmt: skip
    p.add_argument("--name", default="desk-sim", help="name used in replies")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="serve TLS (ALPN h2) with this certificate chain (PEM)")  # fmt: skip
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    p.add_argument("--require-header", metavar="NAME=VALUE", action="append", default=[],
                   type=_header_arg,
                   help="answer links without this header with 401 (repeatable)")  # fmt: skip
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="require client certificates signed by this CA (mutual TLS)")  # fmt: skip
    from gateway.downstream.desk import VIOLATIONS

    p.add_argument("--violate", metavar="NAME", action="append", default=[],
                   choices=sorted(VIOLATIONS),
                   help="break the protocol on purpose, to see desk-check or a gateway catch it "
                        "(repeatable): " + "; ".join(f"{k}: {v}" for k, v in VIOLATIONS.items())
                   )  # fmt: skip


@command("desk-sim", "run the reference downstream (agent desks and a triage bot)", _setup_desk_sim)
def _desk_sim(args: argparse.Namespace) -> int:
    from gateway.downstream.desk import DeskConfig
    from gateway.downstream.desksim import run_desk_sim

    cfg = DeskConfig(
        name=args.name,
        latency_ms=args.latency_ms,
        think_ms=args.think_ms,
        error_rate=args.error_rate,
        agents=args.agents,
        capacity=args.capacity,
        stall_after=args.stall_after,
        crash_after=args.crash_after,
        reply=not args.no_reply,
        batch_acks=not args.single_acks,
        require_headers=tuple(args.require_header),
        violate=tuple(args.violate),
    )
    host, port = args.listen
    ctx = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        import ssl

        from gateway.downstream.tls import server_context

        if not (args.tls_cert and args.tls_key):
            print("desk-sim: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        try:
            ctx = server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
        except (OSError, ssl.SSLError) as e:
            print(f"desk-sim: cannot set up TLS: {e}", file=sys.stderr)
            return 2
    return run_desk_sim(cfg, host, port, args.record, args.processes, ctx)


# --- desk-check --------------------------------------------------------------


def _setup_desk_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="HOST:PORT", type=_hostport,
                   help="the downstream endpoint to check")  # fmt: skip
    p.add_argument("--tls", action="store_true", help="connect over TLS (ALPN h2)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="with --tls: trust this CA (default: the system's)")  # fmt: skip
    p.add_argument("--server-name", metavar="NAME",
                   help="with --tls: the name on its certificate (default HOST)")  # fmt: skip
    p.add_argument("--header", metavar="NAME=VALUE", action="append", default=[],
                   type=_header_arg, help="a link request header, e.g. authorization")  # fmt: skip
    p.add_argument("--timeout", metavar="S", type=_float_at_least(0.1, 300.0), default=5.0,
                   help="how long each answer may take (default 5)")  # fmt: skip


@command("desk-check", "check that a downstream speaks the link protocol", _setup_desk_check)
def _desk_check(args: argparse.Namespace) -> int:
    import ssl

    import trio

    from gateway.downstream.deskcheck import Target, run_checks

    ctx = None
    if args.tls:
        try:
            ctx = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as e:
            _err(f"desk-check: cannot load the CA file: {e}")
            return 2
        ctx.set_alpn_protocols(["h2"])
    elif args.ca_file or args.server_name:
        _err("desk-check: --ca-file and --server-name go with --tls")
        return 2
    host, port = args.target
    t = Target(host, port, ctx, args.server_name, list(args.header), args.timeout)
    return trio.run(run_checks, t, sys.stdout)


# --- loadtest ----------------------------------------------------------------


def _setup_loadtest(p: argparse.ArgumentParser) -> None:
    from gateway.loadtest.cli import setup

    setup(p)


@command(
    "loadtest", "load-test a gateway: connections, messages, latency, reports", _setup_loadtest
)
def _loadtest(args: argparse.Namespace) -> int:
    from gateway.loadtest.cli import run

    return run(args)


# --- selfcheck ---------------------------------------------------------------


@command("selfcheck", "check the native crypto core and print its backends and speed")
def _selfcheck(args: argparse.Namespace) -> int:
    try:
        from gateway import crypto

        report = crypto.selfcheck()
    except Exception as e:  # report any failure of the native core, exit 1
        _err(f"selfcheck failed: {type(e).__name__}: {e}")
        return 1
    print(report)
    return 0


# --- entry point -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Customer-service chat gateway")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for c in COMMANDS.values():
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        c.setup(sp)
        sp.set_defaults(_run=c.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    return run(args)
