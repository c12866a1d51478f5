"""Fingerprints of the files a run read, so that a run refuses to be evaluated or resumed on other data.

A local file is fingerprinted by its size and SHA-256; a folder (``Dataset.save_to_disk``) by the
SHA-256 of its files' names and contents; a Hub dataset by the commit its snapshot was downloaded
at. A built-in data set needs none: it ships with the package.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def _sha256(paths: list[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(source: str | None) -> dict[str, Any] | None:
    """The fingerprint of a ``--dataset`` or ``--adjacency`` value, or None for a built-in name or nothing.

    Returns:
        ``{"sha256": ..., "bytes": ...}`` for a file or a folder, ``{"revision": ...}`` for a Hub dataset id.
    """
    from st_peft.data.builtin import BUILTIN_DATASETS
    from st_peft.data.loading import _HUB_ID, _download_dataset

    if source is None or source in BUILTIN_DATASETS:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return {"sha256": _sha256([path]), "bytes": path.stat().st_size}
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file())
        return {"sha256": _sha256(files, root=path), "bytes": sum(file.stat().st_size for file in files)}
    if _HUB_ID.fullmatch(source):
        # a snapshot folder is named by the commit it holds
        return {"revision": _download_dataset(source).name}
    return None


def data_fingerprints(dataset: str | None, adjacency: str | None) -> dict[str, dict[str, Any] | None]:
    """The fingerprints of a run's ``dataset`` and ``adjacency``, as ``run.json`` records them."""
    return {"dataset": fingerprint(dataset), "adjacency": fingerprint(adjacency)}


def changes(recorded: dict[str, Any] | None, current: dict[str, Any], sources: dict[str, str | None]) -> list[str]:
    """What differs between the ``recorded`` fingerprints of a run and the ``current`` ones, one phrase each.

    Args:
        recorded: :func:`data_fingerprints` of the run (None for a run written before fingerprints).
        current: :func:`data_fingerprints` now.
        sources: the file or id of each entry, to name it.
    """
    if recorded is None:
        return []
    found = []
    for key, now in current.items():
        before = recorded.get(key)
        if before == now:
            continue
        what = f"--{key} {sources[key]}"
        if before is None or now is None:
            found.append(f"{what} is not the {key} the run read")
        elif "revision" in now:
            found.append(f"{what} is at revision {now['revision'][:12]}, the run read {before.get('revision', '?')[:12]}")
        else:
            found.append(f"{what} changed ({before.get('bytes')} -> {now.get('bytes')} bytes, sha256 "
                         f"{str(before.get('sha256'))[:12]} -> {now['sha256'][:12]})")
    return found
