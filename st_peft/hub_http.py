"""Talking to the Hub: one error type that says why, and requests that give up after a bounded silence.

huggingface_hub leaves requests without a timeout (uploads) or retries them for minutes
(downloads retry a silent server six times, with up to 60 s each). :func:`hub_requests` bounds
a whole push or pull instead, through hooks on huggingface_hub's client that exist only while
the push or pull runs (the client factory set before it is put back after). Once the server has
given no answer for ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT_S`, or
``ST_PEFT_HUB_TIMEOUT``), no further request is sent and the call fails with a :class:`HubError` that names the cause: the server cannot be reached,
did not answer in time, answered with an HTTP error, offline mode is on, or the repository,
revision or file does not exist.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http, set_client_factory

TIMEOUT_ENV = "ST_PEFT_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
HTTP_HINTS = {
    401: "the token was refused, or the repository is private or does not exist",
    403: "the token may not write to this repository",
    404: "not found",
    405: "this server does not accept uploads (a read-only mirror?)",
    429: "too many requests: try again later",
}
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")
UNREACHABLE = "the server cannot be reached"
OFFLINE = "offline mode is on (HF_HUB_OFFLINE=1): only files already in the cache can be read"
RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)
"""Statuses huggingface_hub retries; they do not count as an answer."""

ClientFactory = Callable[[], httpx2.Client]


class HubError(OSError):
    """A repository could not be read from or written to the Hub; the message names the repository and why."""


class _NoAnswer(Exception):
    """The server stayed silent for the whole timeout; huggingface_hub does not retry this one."""


def hub_timeout(timeout: float | None = None) -> float:
    """The bound in seconds: ``timeout`` when given, else ``ST_PEFT_HUB_TIMEOUT``, else 30.

    Raises:
        ValueError: the value is not a positive number.
    """
    value = timeout if timeout is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"the Hub timeout must be a positive number of seconds, got {value!r} "
                         f"(timeout= or {TIMEOUT_ENV})")
    return seconds


class _Silence:
    """The deadline of the push or pull in progress: pushed back by every useful answer from the server.

    An answer that huggingface_hub retries (429 and 5xx) does not push it back, so a server
    that keeps failing is given up on after ``timeout`` seconds too; its last status is kept
    for the message.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timeout: float | None = None
        self.deadline = 0.0
        self.failed_status: int | None = None

    def cap_request(self, request: httpx2.Request) -> None:
        """httpx request hook: refuse to send after the deadline, else shorten the request's timeouts to it."""
        with self.lock:
            if self.timeout is None:
                return
            left = self.deadline - time.monotonic()
        if left <= 0:
            raise _NoAnswer(request.url)
        limits = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: left if limits.get(key) is None else min(limits[key], left) for key in _TIMEOUT_KEYS
        }

    def note_answer(self, response: httpx2.Response) -> None:
        """httpx response hook: the server answered, so the silence starts again (unless it failed)."""
        with self.lock:
            if self.timeout is None:
                return
            if response.status_code in RETRIED_STATUSES:
                self.failed_status = response.status_code
            else:
                self.failed_status = None
                self.deadline = time.monotonic() + self.timeout


_SILENCE = _Silence()


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _accepts_connections(endpoint: str, timeout: float) -> bool:
    """Whether the endpoint's host accepts a TCP connection (within ``timeout``, at most 5 s)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=min(timeout, 5.0)):
            return True
    except OSError:
        return False


def _http_reason(status: int, detail: str) -> str:
    return f"HTTP {status}, {HTTP_HINTS.get(status, 'the server says')}: {detail}"


def _reason(error: BaseException, timeout: float, failed_status: int | None) -> str | None:
    """Why a Hub call failed, from the error and its causes; None when it is not a Hub failure.

    ``failed_status`` is the last retried status (5xx, 429) the server answered with, if any.
    """
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        if isinstance(link, (_NoAnswer, httpx2.TimeoutException)):
            if failed_status is not None:
                return _http_reason(failed_status, f"the server kept failing for {timeout:g} s")
            if not _accepts_connections(constants.ENDPOINT, timeout):
                # huggingface_hub retried a refused connection until the bound ran out
                return UNREACHABLE
            return f"no answer within {timeout:g} s (raise the bound with timeout=... or {TIMEOUT_ENV})"
    for link in chain:
        if isinstance(link, OfflineModeIsEnabled):
            return OFFLINE
        if isinstance(link, LocalTokenNotFoundError):
            return "a Hugging Face token is needed: run `hf auth login` or pass token=..."
    for link in chain:
        if isinstance(link, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)) and not \
                isinstance(link, LocalEntryNotFoundError):
            return f"not found ({type(link).__name__}): {_first_line(link)}"
        if isinstance(link, HfHubHTTPError) and link.response is not None:
            return _http_reason(link.response.status_code, _first_line(link))
    for link in chain:
        if isinstance(link, (httpx2.TransportError, ConnectionError)):
            return f"{UNREACHABLE} ({type(link).__name__}: {link})"
    if any(isinstance(link, LocalEntryNotFoundError) for link in chain):
        if constants.is_offline_mode():
            return OFFLINE
        return f"{UNREACHABLE} and the files are not in the cache"
    return None


def _scope_client_factory() -> ClientFactory:
    """Make the clients huggingface_hub creates from now on carry the silence hooks.

    huggingface_hub replaces its shared client after a refused connection, so the hooks go into
    the client factory, around whichever factory is set (the user's own included). That factory
    is returned, for :func:`hub_requests` to put back once the push or pull is over.
    """
    previous = _http._GLOBAL_CLIENT_FACTORY  # huggingface_hub has a public setter, no public getter

    def factory() -> httpx2.Client:
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks["request"], _SILENCE.cap_request],
                              "response": [*hooks["response"], _SILENCE.note_answer]}
        return client

    set_client_factory(factory)
    return previous


@contextmanager
def hub_requests(action: str, repo_id: str, timeout: float | None = None) -> Iterator[None]:
    """Bound the requests of one push or pull and turn its failures into one :class:`HubError`.

    Args:
        action: what is being done, for the message ("pull", "create the repository", ...).
        repo_id: the repository.
        timeout: seconds of silence after which the call gives up (see :func:`hub_timeout`).

    Raises:
        HubError: ``could not <action> '<repo_id>' at <endpoint>: <reason>``.
    """
    seconds = hub_timeout(timeout)
    with _SILENCE.lock:
        outer = _SILENCE.timeout
        if outer is None:
            _SILENCE.timeout, _SILENCE.deadline = seconds, time.monotonic() + seconds
            _SILENCE.failed_status = None
    previous = _scope_client_factory() if outer is None else None
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        reason = _reason(error, seconds, _SILENCE.failed_status)
        if reason is None:
            raise
        raise HubError(f"could not {action} {repo_id!r} at {constants.ENDPOINT}: {reason}") from error
    finally:
        if outer is None:
            set_client_factory(previous)  # its next client has no st-peft hooks
            with _SILENCE.lock:
                _SILENCE.timeout = None
