"""Sticky sessions: which worker a request must go back to. Pure functions, no sockets.

A Shiny session lives in one R process, so every request of that session must reach it. Two ways:

* cookie: corral gives each worker process an opaque random token and sets it in a cookie on any response
  whose client did not already carry that worker's token. A request carrying a live worker's token waits
  for that worker; a token whose worker is gone (crashed, replaced by a reload) is ignored, the request
  goes to any worker and the cookie is re-issued, so a client moves once.
* ip: rendezvous hashing of the client address over the worker slots (indexes). A slot keeps its index
  across restarts, so a client whose worker died waits for, and lands on, that slot's replacement; only
  scaling changes the mapping, and then only for the clients of the slots that changed.

Either way, a request whose path names a session the pool knows (Shiny's `session/<id>/...`: downloads,
uploads, data objects; the id learned from the session's first WebSocket message, tunnel.py) goes to the
process that holds that session, first of all (pool.Pool._pin).
"""

from __future__ import annotations

import hashlib
import os

COOKIE = b"corral_sticky"
_PREFIX = COOKIE + b"="


def new_token() -> bytes:
    return os.urandom(9).hex().encode()


def cookie_token(cookie_header: bytes | None) -> bytes | None:
    """corral's token from a Cookie header value, if the client sent one."""
    if not cookie_header or _PREFIX not in cookie_header:
        return None
    for part in cookie_header.split(b";"):
        part = part.strip()
        if part.startswith(_PREFIX):
            return part[len(_PREFIX) :] or None
    return None


def set_cookie(token: bytes, path: bytes = b"/") -> tuple[bytes, bytes]:
    # HttpOnly: scripts never need it; SameSite=Lax: sent on top-level navigations, as Shiny's page needs.
    return b"set-cookie", b"%s%s; Path=%s; HttpOnly; SameSite=Lax" % (_PREFIX, token, path)


def ip_slot(client: bytes, slots: list[int]) -> int | None:
    """The slot (worker index) a client address maps to: highest hash of (address, slot) wins."""
    if not slots:
        return None
    return max(slots, key=lambda slot: hashlib.blake2b(b"%s/%d" % (client, slot), digest_size=8).digest())


_SESSION = b"/session/"


def session_in_path(target: bytes) -> bytes | None:
    """The session id a request path names, Shiny's way: `.../session/<id>/...` (None: it names none)."""
    at = target.find(_SESSION)
    if at < 0:
        return None
    end = len(target)
    for stop in (b"/", b"?"):
        found = target.find(stop, at + len(_SESSION))
        if 0 <= found < end:
            end = found
    query = target.find(b"?")
    if 0 <= query < at:
        return None  # in the query string, not the path
    return target[at + len(_SESSION) : end] or None


def is_navigation(method: bytes, fetch_mode: bytes | None, accept: bytes | None) -> bool:
    """A browser loading a page into a tab or frame (not a script, style, fetch or WebSocket of one).

    Fetch Metadata says so where browsers send it (`Sec-Fetch-Mode: navigate`, to HTTPS and localhost
    origins); elsewhere a navigation is the GET that asks for HTML first (`Accept: text/html,...`)."""
    if method != b"GET":
        return False
    if fetch_mode is not None:
        return fetch_mode.strip().lower() == b"navigate"
    return accept is not None and accept.lstrip().lower().startswith(b"text/html")
