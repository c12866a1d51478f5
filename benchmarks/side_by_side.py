"""Timing two versions of st_peft side by side in one run: an earlier git revision against the working tree.

A benchmark exports the earlier revision's ``st_peft`` package with :func:`export_package` and
starts one :class:`TreeWorker` per version: a subprocess of the benchmark script itself that
imports ``st_peft`` from its own tree only (``PYTHONPATH``) and answers one timing request at a
time (:func:`serve`). The parent alternates its requests between the workers, so both versions
see the same load on a shared machine, while each keeps its own warmed-up models. Both workers
run the benchmark's own harness (this checkout's), so only the package differs.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The checkout this script belongs to: the "new" version."""

REPLY = "@@side-by-side "
"""Prefix of a worker's replies on its stdout, so that anything else a library prints there is skipped."""


def revision(ref: str) -> str:
    """The full commit hash of git revision ``ref`` in :data:`REPO`, plus ``+dirty`` for ``HEAD`` with
    uncommitted changes to ``st_peft``."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    if ref == "HEAD" and subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "st_peft"]).returncode:
        commit += "+dirty"
    return commit


def export_package(ref: str, folder: Path) -> str:
    """Write the ``st_peft`` package of git revision ``ref`` under ``folder``; return its commit hash.

    ``git archive`` reads the object store only: no worktree is registered and no checkout changes.
    """
    commit = revision(ref)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "st_peft"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return commit


class TreeWorker:
    """A subprocess running ``script`` with ``--worker`` and the ``st_peft`` of ``tree``.

    Args:
        script: the benchmark script; its ``--worker`` mode calls :func:`serve`.
        arguments: further command-line arguments of the worker.
        tree: folder holding the ``st_peft`` package to import (the only ``PYTHONPATH`` entry).
    """

    def __init__(self, script: Path, arguments: Sequence[str], tree: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, str(script), "--worker", *arguments], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.tree = tree
        self.hello = ""

    def wait_ready(self) -> str:
        """The worker's first reply (sent once it has built and warmed up its models)."""
        self.hello = self._reply()
        return self.hello

    def ask(self, request: str) -> str:
        """Send one request line, return the reply."""
        assert self.process.stdin is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return line[len(REPLY):].rstrip("\n")
        raise RuntimeError(f"The side-by-side worker on {self.tree} exited with code {self.process.wait()}")

    def close(self) -> None:
        """End the worker (its stdin closes, so :func:`serve` returns)."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


def serve(hello: str, handle: Callable[[str], str]) -> None:
    """Worker side: send ``hello``, then answer every request line on stdin with ``handle(line)``."""
    print(REPLY + hello, flush=True)
    for line in sys.stdin:
        print(REPLY + handle(line.strip()), flush=True)
