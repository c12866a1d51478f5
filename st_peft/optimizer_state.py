"""An optimiser's state as named tensors, so that it is saved as safetensors and never pickled.

``optimizer.state_dict()`` holds, per parameter index, tensors such as Adam's ``exp_avg`` and
``step``; they are named ``"<index>.<entry>"``. The parameter groups (lr, betas, ...) are the
optimiser's own: a caller that changes them during training (a schedule) saves what it needs
beside the tensors.
"""

from __future__ import annotations

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every per-parameter state tensor of ``optimizer`` as ``{"<index>.<entry>": tensor}`` (copies)."""
    return {f"{index}.{entry}": torch.as_tensor(value).detach().clone().contiguous()
            for index, values in optimizer.state_dict()["state"].items() for entry, value in values.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           lrs: list[float] | None = None) -> None:
    """Load state written by :func:`optimizer_tensors` into ``optimizer``, optionally with each group's lr.

    Raises:
        ValueError: a name is not ``"<index>.<entry>"`` (not an optimiser's state).
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, _, entry = name.partition(".")
        if not index.isdigit() or not entry:
            raise ValueError(f"{name!r} is not the name of an optimiser state tensor ('<index>.<entry>')")
        state.setdefault(int(index), {})[entry] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, lr in zip(groups, lrs if lrs is not None else [group["lr"] for group in groups], strict=True):
        group["lr"] = lr
    optimizer.load_state_dict({"state": state, "param_groups": groups})
