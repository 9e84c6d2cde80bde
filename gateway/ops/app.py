"""The operator endpoint's routes (sans-IO): request in, response out.

``/metrics`` (Prometheus text), ``/api/stats`` (the dashboard's JSON),
``/`` (the dashboard page), ``/healthz`` and ``/readyz``. With an
``ops_token`` configured, every route but the two probes needs
``Authorization: Bearer <token>`` or ``?token=<token>`` (the dashboard page
passes its own ``?token=`` on to its requests).

``POST /-/reload`` reloads the configuration as SIGHUP does and answers
with what happened (JSON); it is only served with an ``ops_token``
configured (403 otherwise), and needs the bearer header. The reload itself
is the caller's (:meth:`OpsApp.reload_check` decides whether to run it,
:meth:`OpsApp.reload_response` answers).
"""

from __future__ import annotations

import hmac
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from gateway.ops.aggregate import Aggregator
from gateway.ops.exposition import CONTENT_TYPE, render
from gateway.server.http1 import Request, response

__all__ = ["RELOAD_PATH", "OpsApp"]

DASHBOARD: Final = Path(__file__).with_name("dashboard.html")
_JSON: Final = "application/json"
_HTML: Final = "text/html; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"


#: The path of the reload route.
RELOAD_PATH: Final = "/-/reload"


class OpsApp:
    def __init__(
        self,
        agg: Aggregator,
        token: str,
        clock: Callable[[], float],
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.agg = agg
        self.token = token.encode()
        self.clock = clock
        self.reload = reload
        self.page = DASHBOARD.read_bytes() if DASHBOARD.is_file() else b"dashboard missing\n"
        self.requests = 0
        self.denied = 0

    def _authorized(self, req: Request) -> bool:
        if not self.token:
            return True
        given = ""
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        else:
            q = urllib.parse.parse_qs(req.query)
            given = (q.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token)

    def reload_check(self, req: Request) -> bytes | None:
        """For ``POST /-/reload``: None when the reload is to run, else the
        refusal to send (no reload here, no token configured, not
        authorized)."""
        self.requests += 1
        if self.reload is None:
            return response(404, b"not found\n", _TEXT)
        if not self.token:
            return response(403, b"set ops_token to allow reloads over HTTP\n", _TEXT)
        auth = req.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.token):
            self.denied += 1
            return response(
                401, b"bearer token required\n", _TEXT, {"WWW-Authenticate": 'Bearer realm="ops"'}
            )
        return None

    @staticmethod
    def reload_response(result: dict[str, Any]) -> bytes:
        """The answer to a reload that ran: 200 when it was applied or
        nothing changed, 409 when it was refused or failed."""
        status = 200 if result.get("result") in ("applied", "unchanged") else 409
        return response(status, json.dumps(result).encode() + b"\n", _JSON)

    def handle(self, req: Request) -> bytes:
        self.requests += 1
        head = req.method == "HEAD"
        if req.method not in ("GET", "HEAD"):
            return response(405, b"GET only\n", _TEXT, {"Allow": "GET, HEAD"})
        now = self.clock()
        if req.path == "/healthz":
            return response(200, b"ok\n", _TEXT, head_only=head)
        if req.path == "/readyz":
            if self.agg.ready(now):
                return response(200, b"ready\n", _TEXT, head_only=head)
            why = b"draining\n" if self.agg.draining else b"no worker up\n"
            return response(503, why, _TEXT, head_only=head)
        if req.path not in ("/metrics", "/api/stats", "/"):
            return response(404, b"not found\n", _TEXT)
        if not self._authorized(req):
            self.denied += 1
            return response(
                401, b"bearer token required\n", _TEXT, {"WWW-Authenticate": 'Bearer realm="ops"'}
            )
        if req.path == "/metrics":
            body = render(self.agg.merged(now)).encode()
            return response(200, body, CONTENT_TYPE, head_only=head)
        if req.path == "/api/stats":
            body = json.dumps(self.agg.api(now), separators=(",", ":")).encode()
            return response(200, body, _JSON, head_only=head)
        return response(200, self.page, _HTML, head_only=head)
