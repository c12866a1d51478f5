"""Configuration of the FACTOST adapter (Zhong et al., NeurIPS 2025; FactoST-v2, 2026)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from peft.config import PeftConfig

from st_peft.tuners.options import check_shared_options, normalise_target_options
from st_peft.tuners.registration import extend_peft_type

# The enum member must exist before the first config is built, whichever of the tuner's
# modules is imported first; extending is idempotent.
FACTOST = extend_peft_type("FACTOST")


@dataclass
class FactoSTAdapterConfig(PeftConfig):
    """Configuration of a FACTOST adapter on a frozen ``FactoSTModel`` backbone.

    The adapter has four parts, each switchable for ablations:

    - metadata fusion (``use_metadata``): a node embedding and one embedding per calendar
      feature, projected to the token width and added to every context and future token;
    - interaction filtering (``use_interaction``): spatial (across nodes), temporal (across
      patches) and lagged (up to ``max_lag`` patches back) attention scores that gate the tokens;
    - domain prompts (``use_prompts``): ``num_prompt_tokens`` prompt tokens, each a codebook
      entry of the backbone (the top matches of the series) plus a learned low-rank part,
      prepended at rotary position 0 so the context keeps its pretraining positions;
    - memory replay (``use_memory_replay``): a training sampler that mixes the earliest
      ``replay_memory_fraction`` of the training windows into ``replay_batch_fraction`` of
      every batch (see ``replay_sampler``).

    The adapter works on the backbone's tokens, in the units of each series' own instance
    normalisation, so it needs no scaling statistics: ``FactoSTAdapterConfig(**splits.size_kwargs(),
    steps_per_day=splits.steps_per_day)`` builds it for a data set's splits.

    Args:
        num_nodes: nodes ``N`` of the graph (the node embedding has one row per node); required when
            the adapter is injected (a config without it can be built, as peft builds every config
            without arguments).
        input_len: history length ``L`` of the data's windows, or None. FactoST takes any history
            of at least one patch; the value is recorded with the adapter (and on its model card).
        horizon: forecast length ``H`` of the data's windows, or None; recorded like ``input_len``
            (the model forecasts the horizon its ``future_time_features`` cover).
        in_channels: channels ``C`` of ``past_values``, or None.
        out_channels: channels of ``future_values``, or None; FactoST forecasts every input
            series, so it must equal ``in_channels``.
        steps_per_day: time-of-day slots of the data; with ``calendar_sizes`` unset the calendar
            features are ``(time of day, day of week)`` of sizes ``(steps_per_day, 7)``.
        calendar_sizes: number of values of every calendar column of ``past_time_features`` /
            ``future_time_features``, when the data has more (or other) columns than time of day and
            day of week.
        node_embedding_dim: width of the node embedding.
        calendar_embedding_dim: width of each calendar embedding.
        filter_rank: width of the queries, keys and values of the interaction scores.
        max_lag: how many patches back the lagged scores look.
        num_prompt_tokens: prompt tokens, taken from the top matches of the backbone's codebook.
        prompt_rank: rank of the learned low-rank part added to the matched prompts.
        use_metadata: switch metadata fusion on.
        use_interaction: switch interaction filtering on.
        use_prompts: switch domain prompts on.
        use_memory_replay: switch the memory-replay sampler on.
        replay_memory_fraction: share of the earliest training windows that form the memory.
        replay_batch_fraction: share of every batch drawn from the memory.
        target_modules: the backbone's token hook (``token_hook``); change only for a custom backbone.
        exclude_modules, layers_to_transform, layers_pattern: as in LoRA, for a custom backbone with
            several token hooks (one per layer, say); a ``FactoSTModel`` has one, so on it these can
            only leave nothing to adapt, which PEFT refuses.
        modules_to_save: backbone modules to train and save in full alongside the adapter (the
            ``head``, say), as in LoRA.
        init_weights: True starts every adapter at the backbone exactly (its projections, gate and
            prompts' learned part at zero); False initialises them randomly too, so that a new
            adapter already changes the forecast (for tests, as LoRA's ``init_lora_weights=False``).
    """

    num_nodes: int | None = field(default=None, metadata={"help": "Nodes N of the graph (required)."})
    input_len: int | None = field(default=None, metadata={"help": "History length L of the data's windows."})
    horizon: int | None = field(default=None, metadata={"help": "Forecast length H of the data's windows."})
    in_channels: int | None = field(default=None, metadata={"help": "Channels C of past_values."})
    out_channels: int | None = field(default=None, metadata={"help": "Channels of future_values (= in_channels)."})
    steps_per_day: int = field(default=288, metadata={"help": "Time-of-day slots per day."})
    calendar_sizes: list[int] | None = field(
        default=None, metadata={"help": "Values of every calendar column; default (steps_per_day, 7)."}
    )
    node_embedding_dim: int = field(default=32, metadata={"help": "Width of the node embedding."})
    calendar_embedding_dim: int = field(default=32, metadata={"help": "Width of each calendar embedding."})
    filter_rank: int = field(default=16, metadata={"help": "Width of the interaction scores' projections."})
    max_lag: int = field(default=3, metadata={"help": "Patches back the lagged scores look."})
    num_prompt_tokens: int = field(default=3, metadata={"help": "Prompt tokens (top codebook matches)."})
    prompt_rank: int = field(default=4, metadata={"help": "Rank of the learned part of the prompts."})
    use_metadata: bool = field(default=True, metadata={"help": "Metadata fusion on."})
    use_interaction: bool = field(default=True, metadata={"help": "Interaction filtering on."})
    use_prompts: bool = field(default=True, metadata={"help": "Domain prompts on."})
    use_memory_replay: bool = field(default=True, metadata={"help": "Memory-replay sampler on."})
    replay_memory_fraction: float = field(default=0.2, metadata={"help": "Earliest share of windows replayed."})
    replay_batch_fraction: float = field(default=0.3, metadata={"help": "Share of each batch replayed."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The backbone's token hook; defaults to 'token_hook'."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Token hooks (names or regex) matched by target_modules to leave alone."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Adapt target_modules only in these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name(s) of the numbered layer lists layers_to_transform indexes."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Backbone modules to train and save in full."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start at the backbone exactly; False initialises every part randomly."}
    )
    # peft's injection reads this attribute on every config; FACTOST refuses it (it wraps a module).
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Refused: FACTOST wraps the token hook, not bare parameters."}
    )

    def __post_init__(self) -> None:
        # before peft's own checks, so a refused option is named with the reason st-peft gives
        check_shared_options(self, "FACTOST")
        super().__post_init__()
        self.peft_type = FACTOST
        if self.calendar_sizes is None:
            self.calendar_sizes = [self.steps_per_day, 7]
        self.calendar_sizes = [int(size) for size in self.calendar_sizes]
        normalise_target_options(self)
        # num_nodes may stay None here, as peft builds every config without arguments; the
        # tuner refuses it when the adapter is injected
        positive = {
            "num_nodes": 1 if self.num_nodes is None else self.num_nodes,
            "steps_per_day": self.steps_per_day,
            "node_embedding_dim": self.node_embedding_dim,
            "calendar_embedding_dim": self.calendar_embedding_dim,
            "filter_rank": self.filter_rank,
            "max_lag": self.max_lag,
            "num_prompt_tokens": self.num_prompt_tokens,
            "prompt_rank": self.prompt_rank,
        }
        sizes = {"input_len": self.input_len, "horizon": self.horizon, "in_channels": self.in_channels,
                 "out_channels": self.out_channels}
        positive.update({name: value for name, value in sizes.items() if value is not None})
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FactoSTAdapterConfig.{name} must be a positive integer; got {value!r}.")
        if None not in (self.in_channels, self.out_channels) and self.in_channels != self.out_channels:
            raise ValueError(
                f"FactoSTAdapterConfig has in_channels={self.in_channels} but out_channels={self.out_channels}; "
                "FactoST forecasts every series of past_values, so future_values must have as many channels."
            )
        if any(size < 1 for size in self.calendar_sizes):
            raise ValueError(f"FactoSTAdapterConfig.calendar_sizes must be positive; got {self.calendar_sizes}.")
        if not 0.0 < self.replay_memory_fraction < 1.0 or not 0.0 <= self.replay_batch_fraction < 1.0:
            raise ValueError(
                "FactoSTAdapterConfig needs 0 < replay_memory_fraction < 1 and 0 <= replay_batch_fraction < 1; "
                f"got {self.replay_memory_fraction} and {self.replay_batch_fraction}."
            )
        if not (self.use_metadata or self.use_interaction or self.use_prompts):
            raise ValueError(
                "FactoSTAdapterConfig switches off metadata fusion, interaction filtering and domain prompts; "
                "an adapter needs at least one of them."
            )

    def replay_sampler(self, starts: Sequence[int], batch_size: int, seed: int = 0):
        """The training sampler of the memory-replay part, or ``None`` when it is switched off.

        Args:
            starts: window start of every training row, e.g. ``splits.train["start"]``.
            batch_size: windows per batch.
            seed: seed of the shuffles and replay draws.

        Returns:
            A ``st_peft.training.samplers.MemoryReplaySampler`` yielding lists of row indices, or ``None``.
        """
        if not self.use_memory_replay:
            return None
        from st_peft.training.samplers import MemoryReplaySampler

        return MemoryReplaySampler(
            starts,
            batch_size=batch_size,
            memory_fraction=self.replay_memory_fraction,
            replay_fraction=self.replay_batch_fraction,
            seed=seed,
        )
