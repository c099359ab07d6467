"""Login with a throttle: after 5 failed logins from a client within 5 minutes, that client is refused
(even with the right password) for a back-off that starts at one minute and doubles up to 15.

Gradio calls the ``auth=`` callable with the user name and password only, not the request. A small
ASGI middleware (passed to Gradio's FastAPI app through ``app_kwargs``) puts the client's address in
a context variable for the duration of each request, so the callable knows who is asking; without
it (another way of serving) failures are counted per user name instead. The client address is the
one uvicorn reports: behind a reverse proxy it is the proxy's unless uvicorn trusts the proxy's
``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS``; by default only 127.0.0.1 is trusted), and then every
client behind that proxy shares one count. A refused login gets HTTP 429 with ``Retry-After``.
"""
from __future__ import annotations

import contextvars
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from starlette.middleware import Middleware

logger = logging.getLogger(__name__)

MAX_FAILURES = 5
WINDOW_SECONDS = 300.0
LOCKOUT_SECONDS = 60.0
MAX_LOCKOUT_SECONDS = 900.0
MAX_TRACKED_CLIENTS = 10_000  # bounded memory under a flood of made-up clients or user names

_client_address: contextvars.ContextVar[str | None] = contextvars.ContextVar("heft_login_client", default=None)


class ClientAddressMiddleware:
    """ASGI middleware: the client's address, as uvicorn reports it, is visible to the auth callable."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _client_address.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _client_address.reset(token)


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0
    lockouts: int = 0


class LoginThrottle:
    """Counts failed logins per key; after ``max_failures`` within ``window_seconds`` the key is locked out."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_seconds: float = WINDOW_SECONDS,
                 lockout_seconds: float = LOCKOUT_SECONDS, max_lockout_seconds: float = MAX_LOCKOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.lockout_seconds = lockout_seconds
        self.max_lockout_seconds = max_lockout_seconds
        self.clock = clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: it may now)."""
        with self._lock:
            record = self._records.get(key)
            return max(0.0, record.locked_until - self.clock()) if record else 0.0

    def failed(self, key: str) -> float:
        """Count a failure; returns the lockout it started (0 if none)."""
        now = self.clock()
        with self._lock:
            record = self._records.setdefault(key, _Record())
            record.failures = [t for t in record.failures if now - t < self.window_seconds] + [now]
            if len(record.failures) < self.max_failures:
                self._prune(now)
                return 0.0
            lockout = min(self.max_lockout_seconds, self.lockout_seconds * 2 ** record.lockouts)
            record.lockouts += 1
            record.locked_until = now + lockout
            record.failures = []
            return lockout

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)

    def _prune(self, now: float) -> None:
        if len(self._records) <= MAX_TRACKED_CLIENTS:
            return
        stale = [k for k, r in self._records.items()
                 if r.locked_until <= now and all(now - t >= self.window_seconds for t in r.failures)]
        for key in stale:
            del self._records[key]
        while len(self._records) > MAX_TRACKED_CLIENTS:  # still too many: forget the oldest
            del self._records[next(iter(self._records))]


class LoginRefused(HTTPException):
    """A login refused by the throttle: HTTP 429 Too Many Requests, with the seconds to wait."""

    def __init__(self, seconds: float):
        wait = max(1, math.ceil(seconds))
        super().__init__(status_code=429, headers={"Retry-After": str(wait)},
                         detail=f"too many failed logins from this client; try again in {wait} s")


class ThrottledLogin:
    """Gradio's ``auth=`` callable: checks user name and password, refusing throttled clients."""

    def __init__(self, accounts: Sequence[tuple[str, str]], throttle: LoginThrottle | None = None):
        self.accounts = [(user, password) for user, password in accounts]
        self.throttle = throttle or LoginThrottle()

    @staticmethod
    def client_key(username: str) -> str:
        """Who is asking: the client's address when the middleware is installed, else the user name."""
        address = _client_address.get()
        return f"client:{address}" if address else f"user:{username}"

    def __call__(self, username: str, password: str) -> bool:
        key = self.client_key(username)
        wait = self.throttle.retry_after(key)
        if wait > 0:
            logger.warning("login refused for %s: locked out for %.0f s more", key, wait)
            raise LoginRefused(wait)
        # Compare against every account so the time taken does not tell which user names exist.
        matches = [hmac.compare_digest(username.encode(), user.encode())
                   & hmac.compare_digest(password.encode(), secret.encode()) for user, secret in self.accounts]
        if any(matches):
            self.throttle.succeeded(key)
            return True
        lockout = self.throttle.failed(key)
        if lockout:
            logger.warning("login: %d failed attempts from %s; refusing it for %.0f s",
                           self.throttle.max_failures, key, lockout)
        return False


def login_options(accounts: Sequence[tuple[str, str]] | None) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch``: throttled auth and the middleware it needs ({} without accounts)."""
    if not accounts:
        return {}
    return {
        "auth": ThrottledLogin(accounts),
        "auth_message": (f"HEFT Studio: log in with a HEFT_AUTH user. After {MAX_FAILURES} failed logins, "
                         "this browser is refused for a while."),
        "app_kwargs": {"middleware": [Middleware(ClientAddressMiddleware)]},
    }
