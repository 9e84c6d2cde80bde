"""Routing, sans-IO: entry tags and message keywords -> skill group (with an
optional bot stage first), fallback chains, and the sticky table of the
endpoint and agent that served a visitor last."""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

__all__ = ["BOT", "HUMAN", "Group", "Route", "Router", "Rule", "StickyTable"]

BOT: Final = "bot"
HUMAN: Final = "human"
_TAG_FIELDS: Final = ("channel", "page", "business")
#: Letters, digits and ``_`` of the scripts that separate words with spaces:
#: a keyword edge made of one must not touch another (``refund`` does not
#: match in ``refunds``). Scripts written without spaces between words (Thai,
#: Lao, Myanmar, Khmer, CJK, kana, Hangul with its attached particles) are
#: matched anywhere: ``退款`` in ``我要退款``.
_SPACED: Final = (
    r"[^\W\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF\u2E80-\u2FDF\u3000-\u9FFF"
    r"\uA000-\uA4CF\uAC00-\uD7AF\uF900-\uFAFF\uFF66-\uFFDC]"
)
_SPACED_RE: Final = re.compile(_SPACED)


def _keyword_pattern(keyword: str) -> str:
    """``keyword`` (stripped) as a regular expression: whole words at its
    edges that are letters or digits of space-separated scripts."""
    k = keyword.strip()
    head = f"(?<!{_SPACED})" if _SPACED_RE.match(k[0]) else ""
    tail = f"(?!{_SPACED})" if _SPACED_RE.match(k[-1]) else ""
    return head + re.escape(k) + tail


@dataclass(frozen=True)
class Rule:
    """Matches entry tags exactly or by ``*`` glob; a rule with ``keywords``
    applies to messages (case-insensitive; whole words in scripts that put
    spaces between words, anywhere in those that do not), one without to
    the session's entry."""

    group: str
    channel: str | None = None
    page: str | None = None
    business: str | None = None
    keywords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if type(self.group) is not str or not self.group:
            raise ValueError("rule.group must be a non-empty string")
        for f in _TAG_FIELDS:
            v = getattr(self, f)
            if v is not None and type(v) is not str:
                raise ValueError(f"rule.{f} must be a string")
        if not isinstance(self.keywords, tuple) or not all(
            type(k) is str and k.strip() for k in self.keywords
        ):
            raise ValueError("rule.keywords must be non-empty strings")
        if self.keywords:
            words = "|".join(_keyword_pattern(k) for k in self.keywords)
            object.__setattr__(self, "_kw", re.compile(f"(?:{words})", re.IGNORECASE))

    def tags_match(self, tags: Mapping[str, str]) -> bool:
        for f in _TAG_FIELDS:
            want = getattr(self, f)
            if want is None:
                continue
            have = tags.get(f)
            if have is None:
                return False
            if "*" in want:
                if not fnmatch.fnmatchcase(have, want):
                    return False
            elif have != want:
                return False
        return True

    def body_match(self, body: Any) -> bool:
        return type(body) is str and bool(self._kw.search(body))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Group:
    name: str
    cluster: str
    bot: str | None = None  # a group serving the bot stage first
    fallback: str | None = None
    max_pending: int = 1024

    def __post_init__(self) -> None:
        if type(self.cluster) is not str or not self.cluster:
            raise ValueError("group.cluster must be a non-empty string")
        for f in ("bot", "fallback"):
            v = getattr(self, f)
            if v is not None and (type(v) is not str or not v):
                raise ValueError(f"group.{f} must be a group name")
        if type(self.max_pending) is not int or self.max_pending < 1:
            raise ValueError("group.max_pending must be an integer >= 1")


class Route(NamedTuple):
    group: str  # the skill group the session belongs to
    stage: str  # BOT (served by the group's bot group) or HUMAN


class Router:
    def __init__(self, rules: list[Rule], groups: dict[str, Group], default_group: str) -> None:
        if default_group not in groups:
            raise ValueError(f"default group {default_group!r} is not defined")
        for g in groups.values():
            for ref in (g.bot, g.fallback):
                if ref is not None and ref not in groups:
                    raise ValueError(f"group {g.name!r} refers to unknown group {ref!r}")
        for r in rules:
            if r.group not in groups:
                raise ValueError(f"rule refers to unknown group {r.group!r}")
        for g in groups.values():
            seen = {g.name}
            nxt = g.fallback
            while nxt is not None:
                if nxt in seen:
                    raise ValueError(f"fallback cycle through group {nxt!r}")
                seen.add(nxt)
                nxt = groups[nxt].fallback
        self.groups = groups
        self.default_group = default_group
        self.entry_rules = [r for r in rules if not r.keywords]
        self.keyword_rules = [r for r in rules if r.keywords]

    def _start(self, group: str) -> Route:
        return Route(group, BOT if self.groups[group].bot is not None else HUMAN)

    def entry_group(self, tags: Mapping[str, str]) -> Route:
        for r in self.entry_rules:
            if r.tags_match(tags):
                return self._start(r.group)
        return self._start(self.default_group)

    def message_group(self, route: Route, body: Any) -> Route:
        """A keyword rule moves the session to its group (unless it is there)."""
        for r in self.keyword_rules:
            if r.group != route.group and r.body_match(body):
                return self._start(r.group)
        return route

    def handover(self, route: Route) -> Route:
        return Route(route.group, HUMAN)

    def fallback(self, group: str, unavailable: Callable[[str], bool]) -> str | None:
        """The first available group along ``group``'s fallback chain."""
        nxt = self.groups[group].fallback
        while nxt is not None:
            if not unavailable(nxt):
                return nxt
            nxt = self.groups[nxt].fallback
        return None


class StickyTable:
    """(tenant, visitor) -> (endpoint key, agent hint), LRU-bounded, with a TTL."""

    __slots__ = ("_d", "max_entries", "ttl_s")

    def __init__(self, max_entries: int = 100_000, ttl_s: float = 86_400.0) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._d: OrderedDict[tuple[str, str], tuple[str, str | None, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, tenant: str, visitor: str, now: float) -> tuple[str, str | None] | None:
        k = (tenant, visitor)
        v = self._d.get(k)
        if v is None:
            return None
        if now - v[2] > self.ttl_s:
            del self._d[k]
            return None
        self._d.move_to_end(k)
        return v[0], v[1]

    def stamp(self, tenant: str, visitor: str) -> float | None:
        """When the entry for the visitor was put (expired or not), or None."""
        v = self._d.get((tenant, visitor))
        return None if v is None else v[2]

    def put(self, tenant: str, visitor: str, endpoint: str, agent: str | None, now: float) -> None:
        k = (tenant, visitor)
        self._d[k] = (endpoint, agent, now)
        self._d.move_to_end(k)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)
