"""A real Hub-compatible HTTP server on 127.0.0.1 for the Hub tests: ``olah`` serving local git repositories.

``olah`` (PyPI) is a Hugging Face mirror; with ``mirrors-path`` it serves the git
repositories under ``<mirrors>/models/<org>/<name>`` through the Hub's HTTP API
(``/api/models/...``, ``/<org>/<name>/resolve/...``), and with ``offline = true`` it never
reaches huggingface.co. It is read-only: it answers 405 to ``create_repo`` and uploads.
So a test that needs a repository *prepares* it with :meth:`HubServer.publish` (a
``git commit`` of a folder written by ``st_peft.hub.save_for_hub``): that half is prepared,
not pushed. Everything read back through the server (``hf_hub_download``,
``snapshot_download``, ``PeftModel.from_pretrained``, ``from_pretrained``) is real.

The server runs in its own process, started on a free port, polled for readiness with a
bounded loop and always terminated.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import constants, hf_api

STARTUP_TIMEOUT_S = 90.0
GIT_IDENTITY = ["-c", "user.name=st-peft tests", "-c", "user.email=tests@st-peft.invalid"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HubServer:
    """An ``olah`` process serving the git repositories under ``root / "mirrors"``.

    Args:
        root: a fresh folder for the served repositories, olah's own cache and its logs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def _write_config(self) -> Path:
        config = self.root / "olah.toml"
        config.write_text(
            "\n".join(
                [
                    "[basic]",
                    'host = "127.0.0.1"',
                    f"port = {self.port}",
                    f'repos-path = "{self.root / "olah-cache"}"',
                    f'mirrors-path = ["{self.mirrors}"]',
                    "[accessibility]",
                    "offline = true",
                ]
            )
            + "\n"
        )
        return config

    def start(self) -> None:
        """Start olah and wait (at most ``STARTUP_TIMEOUT_S``) until its API answers."""
        self.mirrors.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log = open(self.root / "olah.out", "w")  # noqa: SIM115  (closed with the process)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "olah.server",
                "--config",
                str(config),
                "--log-path",
                str(self.root / "logs"),
            ],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    f"{self.endpoint}/api/models/ready/probe/revision/main", timeout=2
                ):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP status (olah says 401 for an unknown repository) means it is serving
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(
            f"olah did not answer on {self.endpoint} within {STARTUP_TIMEOUT_S} s: {self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate olah (kill it if it does not exit within 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of olah's output, for error messages."""
        path = self.root / "olah.out"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def publish(self, folder: Path, repo_id: str, repo_type: str = "model") -> str:
        """PREPARED, not pushed: commit ``folder``'s files as the ``main`` branch of ``repo_id``.

        Args:
            folder: the files of the repository.
            repo_id: ``org/name``.
            repo_type: ``"model"`` or ``"dataset"``.

        Returns:
            The commit sha the server will report for the repository.
        """
        org, name = repo_id.split("/")
        repo = self.mirrors / f"{repo_type}s" / org / name
        if repo.exists():
            shutil.rmtree(repo)
        shutil.copytree(folder, repo)
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(
            ["git", *GIT_IDENTITY, "commit", "-q", "-m", f"prepare {repo_id}"], cwd=repo, check=True
        )
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
        ).stdout.strip()


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def point_hub_at(monkeypatch, endpoint: str, cache: Path) -> None:
    """Point this process's huggingface_hub at ``endpoint`` with the cache ``cache``, as HF_ENDPOINT / HF_HUB_CACHE do.

    huggingface_hub reads those variables once, at import, into module constants and into
    the module-level ``HfApi`` behind ``file_exists`` (which peft calls); the import happened
    before any fixture, so those are set here too. Subprocesses get the variables themselves.
    """
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


def refuse_non_local_hosts(monkeypatch) -> None:
    """Fail any name lookup of a host other than 127.0.0.1 / localhost: these tests never reach the internet."""
    lookup = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise ConnectionRefusedError(
                f"a Hub test tried to reach {host!r}; only {LOCAL_HOSTS} are allowed"
            )
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)


@contextmanager
def running_hub(root: Path) -> Iterator[HubServer]:
    """Run a :class:`HubServer` under ``root`` for the duration of the ``with`` block."""
    server = HubServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def silent_server() -> Iterator[str]:
    """An endpoint on 127.0.0.1 that accepts every connection and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


@contextmanager
def failing_server(status: int = 500) -> Iterator[str]:
    """An endpoint on 127.0.0.1 that answers every request with HTTP ``status``; yields its URL."""

    class Failing(BaseHTTPRequestHandler):
        def _fail(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"error": "internal error (test server)"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = _fail  # noqa: N815  (http.server's method names)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
