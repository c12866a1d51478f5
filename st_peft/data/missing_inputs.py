"""How missing entries of the history reach a model: the training mean, carried forward, or flagged by a mask channel.

Every st-peft model replaces an input that is not observed by its channel's training mean (0 in the
scaled space), so a missing reading and an average one look alike to the network. Two treatments
tell them apart, both applied to the windows' inputs before a model sees them (the targets, their
mask, the losses and the metrics do not change):

* ``carry-forward``: a missing input repeats its node's last observed value and counts as observed
  (the mean before a node's first observation);
* ``mask-channel``: the observed mask of every input channel with a missing entry in the training
  span is one more input channel (1 observed, 0 missing), scaled like any channel; missing values
  still enter as the mean. A channel observed throughout the training span gets no mask channel:
  the network could learn nothing from a constant.

``benchmarks/missing_inputs.py`` measures them with STID on sz-taxi and nyc-bike; the mask channel
scored best (the command line's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from st_peft.data.errors import DataError
from st_peft.data.scaler import StandardScaler

MEAN = "mean"
CARRY_FORWARD = "carry-forward"
MASK_CHANNEL = "mask-channel"
MISSING_INPUTS = (MEAN, CARRY_FORWARD, MASK_CHANNEL)
"""The treatments of missing inputs, by name."""


@dataclass
class TreatedInputs:
    """The inputs of every time step as a model reads them.

    Attributes:
        values: float32 ``(T, N, C_in + K)``: the input channels, then the mask channels.
        mask: bool like ``values``, True where the model counts the input as observed.
        statistics: per-channel ``loc`` / ``scale`` of ``values`` over the training span.
        mask_channels: the K input channels (positions in ``values``) whose mask is read as a channel.
    """

    values: np.ndarray
    mask: np.ndarray
    statistics: StandardScaler
    mask_channels: list[int]


def carry_forward(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each missing entry of ``values`` ``(T, N, C)`` takes the last observed value before it.

    Returns:
        The filled values (0 before a first observation) and their mask: True wherever an observation
        exists at or before the step.
    """
    steps = np.arange(len(values))[:, None, None]
    last = np.maximum.accumulate(np.where(mask, steps, -1), axis=0)
    seen = last >= 0
    filled = np.take_along_axis(values, np.maximum(last, 0), axis=0)
    return np.where(seen, filled, 0.0).astype(values.dtype), seen


def treat_missing_inputs(values: np.ndarray, mask: np.ndarray, statistics: StandardScaler, how: str,
                         fit_span: slice) -> TreatedInputs:
    """The input channels ``values`` ``(T, N, C_in)`` with their missing entries treated by ``how``.

    Args:
        values: float32 ``(T, N, C_in)`` in original units, missing entries 0.
        mask: bool like ``values``, True where observed.
        statistics: the training span's statistics of these channels (those of the ``mean`` treatment).
        how: one of :data:`MISSING_INPUTS`.
        fit_span: the training span the statistics of new or filled channels are fitted on.

    Raises:
        DataError: an unknown treatment.
    """
    if how == MEAN:
        return TreatedInputs(values, mask, statistics, [])
    if how == CARRY_FORWARD:
        filled, seen = carry_forward(values, mask)
        return TreatedInputs(filled, seen, StandardScaler.fit(filled[fit_span], seen[fit_span]), [])
    if how == MASK_CHANNEL:
        flagged = [c for c in range(values.shape[-1]) if not mask[fit_span, :, c].all()]
        flags = mask[..., flagged].astype(values.dtype)
        observed = np.ones_like(flags, dtype=bool)
        flag_statistics = StandardScaler.fit(flags[fit_span], observed[fit_span])
        return TreatedInputs(
            np.concatenate([values, flags], axis=-1),
            np.concatenate([mask, observed], axis=-1),
            StandardScaler(mean=np.concatenate([statistics.mean, flag_statistics.mean]),
                           std=np.concatenate([statistics.std, flag_statistics.std])),
            flagged,
        )
    raise DataError(f"unknown treatment of missing inputs {how!r}: use one of {list(MISSING_INPUTS)}")


def describe(how: str, flagged: list[str]) -> str:
    """One line on what ``how`` does with the missing inputs, ``flagged`` naming the channels whose mask is read."""
    if how == CARRY_FORWARD:
        return "carry-forward: a missing input repeats its node's last observed value"
    if how == MASK_CHANNEL and flagged:
        return (f"mask-channel: the observed mask of {', '.join(flagged)} is read as {len(flagged)} more input "
                f"channel{'s' if len(flagged) > 1 else ''}; missing values enter as the training mean")
    if how == MASK_CHANNEL:
        return "mask-channel: no input is missing in the training span, so no mask channel is added"
    return "mean: a missing input enters as its channel's training mean"
