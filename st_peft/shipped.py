"""Checkpoints shipped inside the st-peft package, found from any working directory.

The one-liner that loads the shipped FactoST backbone wherever Python runs::

    backbone = AutoModel.from_pretrained(shipped_checkpoint())  # after import st_peft
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_ROOT = Path(__file__).resolve().parent / "checkpoints"
"""The package's ``checkpoints/`` folder (installed with the package)."""

DEFAULT_FACTOST_BACKBONE = "factost-cpu"
"""The FactoST backbone that ``shipped_checkpoint()`` and ``st-peft train --adapter factost`` use by default."""


def shipped_checkpoint(name: str = DEFAULT_FACTOST_BACKBONE) -> Path:
    """The absolute folder of the checkpoint ``name`` shipped with st-peft, for any ``from_pretrained``.

    Raises:
        FileNotFoundError: no shipped checkpoint has that name (the shipped ones are named).
    """
    folder = SHIPPED_ROOT / name
    if not (folder / "config.json").is_file():
        shipped = sorted(path.name for path in SHIPPED_ROOT.iterdir() if (path / "config.json").is_file())
        raise FileNotFoundError(f"st-peft ships no checkpoint {name!r}; it ships {shipped}")
    return folder
