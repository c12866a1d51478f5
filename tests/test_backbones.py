"""Tests of the reference backbones STID, GWNet and STGCN on the built-in real data.

Every backbone takes ``past_values`` in original units, scales inside with the training
span's statistics and returns a ``ForecastOutput`` in original units with ``loss``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForTimeSeriesPrediction

import st_peft.data
from st_peft.backbones import BACKBONES, STGCN, STID, GWNet
from st_peft.backbones.graph_ops import scaled_laplacian, transition_matrix
from st_peft.backbones.stgcn import ChebGraphConv
from st_peft.metrics import masked_mae
from st_peft.outputs import ForecastOutput

NAMES = list(BACKBONES)

# Narrow widths for the tests that train: the paper's GWNet (skip 256, end 512) and STGCN
# (64-16-64) are exercised at full width by the shape test only, to keep the run short.
SMALL = {
    "stid": {"embed_dim": 16, "node_dim": 16, "tod_dim": 16, "dow_dim": 16},
    "gwnet": {"residual_channels": 16, "dilation_channels": 16, "skip_channels": 64, "end_channels": 128},
    "stgcn": {"block_channels": (32, 8, 32)},
}



@pytest.fixture(scope="module")
def sz_taxi():
    """sz-taxi (156 roads, 15-minute steps, about 25% missing), 12 steps in, 12 out."""
    return st_peft.data.build_splits(st_peft.data.load("sz-taxi"), input_len=12, horizon=12)


def train_batch(splits, size: int) -> dict[str, torch.Tensor]:
    """``size`` training windows spread over the training span."""
    starts = np.asarray(splits.train["start"], dtype=np.int64)
    return splits.collator.gather(starts[:: len(starts) // size][:size])


def build(name: str, splits, **overrides) -> torch.nn.Module:
    """A backbone for ``splits`` with the arguments only its class takes."""
    kwargs = {**splits.model_kwargs(), "steps_per_day": splits.steps_per_day}
    if name != "stid":
        kwargs["adjacency"] = splits.adjacency
    kwargs.update(overrides)
    return BACKBONES[name](**kwargs)


def head_bias(model: torch.nn.Module) -> torch.Tensor:
    """The bias of the layer that emits ``horizon * out_channels`` values per node."""
    head = {STID: lambda m: m.regression, GWNet: lambda m: m.end_conv_2, STGCN: lambda m: m.output.fc}
    return head[type(model)](model)


def test_registry_maps_names_to_classes():
    assert BACKBONES == {"stid": STID, "gwnet": GWNet, "stgcn": STGCN}


@pytest.mark.parametrize("name", NAMES)
def test_paper_sized_model_maps_real_batch_to_horizon(name, sz_taxi):
    torch.manual_seed(0)
    model = build(name, sz_taxi).eval()
    batch = train_batch(sz_taxi, 2)
    with torch.no_grad():
        out = model(**batch)
    assert isinstance(out, ForecastOutput)
    assert out.prediction_outputs.shape == (2, 12, 156, 1)
    assert out.loc.shape == out.scale.shape == (2, 1, 156, 1)
    assert torch.isfinite(out.prediction_outputs).all() and out.loss.dim() == 0


@pytest.mark.parametrize("name", NAMES)
def test_head_outputs_land_on_horizon_and_channel_axes(name):
    """With a zero head weight and bias ``k``, output ``[b, h, n, c]`` must be ``k = h * C_out + c``
    (identity scaling, so the scaled forecast is the forecast)."""
    data = st_peft.data.load("nyc-taxi")
    splits = st_peft.data.build_splits(data, input_len=12, horizon=3)
    model = build(name, splits, scaling=None, **SMALL[name]).eval()
    head = head_bias(model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(head.bias.numel(), dtype=torch.float32))
        out = model(**train_batch(splits, 2)).prediction_outputs
    assert out.shape == (2, 3, 200, 2)
    expected = torch.arange(6, dtype=torch.float32).reshape(1, 3, 1, 2).expand(2, 3, 200, 2)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_reproduce_outputs_exactly(name, sz_taxi, tmp_path):
    torch.manual_seed(0)
    model = build(name, sz_taxi, **SMALL[name])
    batch = train_batch(sz_taxi, 4)
    # One optimiser step first, so weights and batch-norm statistics differ from any fresh init.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == name and config["steps_per_day"] == sz_taxi.steps_per_day
    assert config["num_nodes"] == 156 and config["input_len"] == 12 and config["horizon"] == 12
    # the graph is a buffer saved with the weights, not a config field
    assert "adjacency" not in config
    if name != "stid":
        saved = safetensors.torch.load_file(tmp_path / "model.safetensors")["adjacency"]
        assert np.array_equal(saved.numpy(), sz_taxi.adjacency)
    # Trainer checkpoints save the raw state dict, which safetensors refuses when a buffer is not contiguous
    safetensors.torch.save_file(model.state_dict(), tmp_path / "checkpoint.safetensors")

    torch.manual_seed(1)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    # the Auto classes resolve the folder by its model_type alone
    auto = AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path).eval()
    assert type(auto) is type(model)
    with torch.no_grad():
        expected, reloaded, by_auto = model(**batch), loaded(**batch), auto(**batch)
    assert torch.equal(reloaded.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(by_auto.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(reloaded.loss, expected.loss)
    # the training span's statistics came back from the folder alone
    assert torch.equal(loaded.scaler.future_loc, model.scaler.future_loc)
    assert float(loaded.scaler.future_loc[0, 0]) == pytest.approx(float(sz_taxi.scaler.mean[0]))


@pytest.mark.parametrize("form", ["array", "tensor", "list"])
def test_adjacency_given_in_any_form_is_saved_the_same(form, tmp_path):
    graph = st_peft.data.load("chickenpox").adjacency
    given = {"array": graph, "tensor": torch.from_numpy(graph), "list": graph.tolist()}[form]
    model = STGCN(num_nodes=20, input_len=12, horizon=4, in_channels=1, out_channels=1, adjacency=given)
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")["adjacency"]
    assert np.array_equal(saved.numpy(), graph)
    assert torch.equal(STGCN.from_pretrained(tmp_path).adjacency, torch.from_numpy(graph))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name, sz_taxi):
    torch.manual_seed(0)
    model = build(name, sz_taxi, **SMALL[name])
    batch = train_batch(sz_taxi, 4)
    model(**batch).loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def test_gwnet_adaptive_adjacency_is_a_learned_row_stochastic_matrix(sz_taxi):
    torch.manual_seed(0)
    model = build("gwnet", sz_taxi, adjacency=None, **SMALL["gwnet"])
    assert "adjacency" not in dict(model.named_buffers())
    learned = dict(model.named_parameters())
    assert learned["source_embedding"].shape == (156, 10) and learned["target_embedding"].shape == (156, 10)
    before = model.adaptive_adjacency().detach().clone()
    assert before.shape == (156, 156)
    assert torch.allclose(before.sum(dim=1), torch.ones(156))

    optimizer = torch.optim.Adam([learned["source_embedding"], learned["target_embedding"]], lr=1e-2)
    batch = train_batch(sz_taxi, 2)
    model(**batch).loss.backward()
    optimizer.step()
    after = model.adaptive_adjacency().detach()
    assert not torch.equal(before, after)
    assert torch.allclose(after.sum(dim=1), torch.ones(156))


def test_gwnet_without_adaptive_adjacency_has_no_node_embeddings(sz_taxi):
    model = build("gwnet", sz_taxi, adaptive_adjacency=False, **SMALL["gwnet"])
    assert not any("embedding" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="adaptive_adjacency=False"):
        model.adaptive_adjacency()
    with pytest.raises(StrictDataclassClassValidationError, match="needs a graph"):
        build("gwnet", sz_taxi, adjacency=None, adaptive_adjacency=False)


def test_gwnet_receptive_field_covers_the_input():
    kwargs = {"num_nodes": 20, "horizon": 4, "in_channels": 1, "out_channels": 1}
    paper = GWNet(input_len=12, **kwargs)
    assert (paper.blocks, paper.receptive_field, len(paper.layers)) == (4, 13, 8)
    assert [layer.filter_conv.dilation[1] for layer in paper.layers] == [1, 2] * 4
    longer = GWNet(input_len=24, **kwargs)
    assert (longer.blocks, longer.receptive_field) == (8, 25)
    with pytest.raises(ValueError, match="sees 7 steps but input_len=12"):
        GWNet(input_len=12, blocks=2, **kwargs)


def test_transition_matrix_matches_hand_computation():
    adjacency = np.array([[0.0, 2.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert np.array_equal(transition_matrix(adjacency), expected)
    backward = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert np.array_equal(transition_matrix(adjacency.T), backward)


def test_scaled_laplacian_matches_hand_computation():
    # Path 0 - 1 - 2: L = I - D^-1/2 A D^-1/2 has eigenvalues 0, 1, 2, so L~ = L - I.
    path = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    h = 1 / np.sqrt(2)
    assert np.allclose(scaled_laplacian(path), [[0.0, -h, 0.0], [-h, 0.0, -h], [0.0, -h, 0.0]])
    # A one-way edge is symmetrised to weight 1/2 both ways; two nodes: L~ = [[0, -1], [-1, 0]].
    assert np.allclose(scaled_laplacian(np.array([[0.0, 1.0], [0.0, 0.0]])), [[0.0, -1.0], [-1.0, 0.0]])
    # Self-loops are dropped, as the paper's graphs have none.
    assert np.allclose(scaled_laplacian(path + np.eye(3)), scaled_laplacian(path))
    with pytest.raises(ValueError, match="no edges"):
        scaled_laplacian(np.eye(3))


def test_stid_reads_calendar_at_the_last_history_step(sz_taxi):
    torch.manual_seed(0)
    model = build("stid", sz_taxi).eval()
    batch = train_batch(sz_taxi, 2)
    # sz-taxi stores missing speeds as 0: without the mask they would count as observed zeros
    past = batch["past_values"].masked_fill(~batch["past_observed_mask"], float("nan"))
    with torch.no_grad():
        reference = model(**batch).prediction_outputs
        earlier = batch["past_time_features"].clone()
        earlier[:, :-1] = 0
        assert torch.equal(model(past, past_time_features=earlier).prediction_outputs, reference)
        last = batch["past_time_features"].clone()
        last[:, -1, 0] = (last[:, -1, 0] + 1) % sz_taxi.steps_per_day
        assert not torch.equal(model(past, past_time_features=last).prediction_outputs, reference)
        no_calendar = build("stid", sz_taxi, if_tod=False, if_dow=False).eval()
        assert no_calendar(past).prediction_outputs.shape == (2, 12, 156, 1)


def test_chebyshev_graph_conv_equals_the_paper_recurrence():
    torch.manual_seed(0)
    adjacency = (torch.rand(9, 9) < 0.4).float()
    laplacian = torch.as_tensor(scaled_laplacian((adjacency + adjacency.T).clamp(max=1).numpy()), dtype=torch.float32)
    for order in (1, 2, 3, 4):
        conv = ChebGraphConv(6, 4, order)
        hidden = torch.randn(2, 6, 9, 5)
        terms = [hidden, torch.einsum("nm,bcmt->bcnt", laplacian, hidden)][:order]
        while len(terms) < order:
            terms.append(2 * torch.einsum("nm,bcmt->bcnt", laplacian, terms[-1]) - terms[-2])
        paper = conv.theta(torch.cat(terms, dim=1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        expected = torch.relu(paper + conv.align(hidden))
        torch.testing.assert_close(conv(hidden, laplacian), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gwnet", "stgcn"])
def test_calendar_channels_feed_time_of_day_and_day_of_week(name, sz_taxi, tmp_path):
    torch.manual_seed(0)
    model = build(name, sz_taxi, calendar_channels=True, steps_per_day=sz_taxi.steps_per_day,
                  **SMALL[name]).eval()
    batch = train_batch(sz_taxi, 2)
    past = batch["past_values"].masked_fill(~batch["past_observed_mask"], float("nan"))
    with torch.no_grad():
        reference = model(**batch).prediction_outputs
        shifted = batch["past_time_features"].clone()
        shifted[..., 0] = (shifted[..., 0] + 4) % sz_taxi.steps_per_day
        assert reference.shape == (2, 12, 156, 1)
        assert not torch.allclose(model(past, past_time_features=shifted).prediction_outputs, reference)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(type(model).from_pretrained(tmp_path).eval()(**batch).prediction_outputs, reference)
    with pytest.raises(ValueError, match="needs past_time_features .* or build the model with calendar_channels=False"):
        model(past)
    plain = build(name, sz_taxi, **SMALL[name]).eval()
    with torch.no_grad():
        assert torch.equal(plain(past).prediction_outputs, plain(**batch).prediction_outputs)


@pytest.mark.parametrize("name", NAMES)
def test_node_index_selects_a_subgraph(name, sz_taxi):
    torch.manual_seed(0)
    model = build(name, sz_taxi, **SMALL[name]).eval()
    batch = train_batch(sz_taxi, 2)
    everything = torch.arange(156)
    subset = torch.tensor([3, 50, 51, 52, 120])
    subset_batch = {key: value[:, :, subset] if value.dim() == 4 else value for key, value in batch.items()}
    with torch.no_grad():
        full = model(**batch).prediction_outputs
        assert torch.allclose(model(**batch, node_index=everything).prediction_outputs, full, atol=1e-6)
        part = model(**subset_batch, node_index=subset)
    assert part.loss is not None and part.loc.shape == (2, 1, 5, 1)
    part = part.prediction_outputs
    assert part.shape == (2, 12, 5, 1)
    if name == "stid":  # STID treats nodes independently, so a subset changes nothing.
        assert torch.allclose(part, full[:, :, subset], atol=1e-6)


def with_past(batch: dict, past: torch.Tensor) -> dict:
    """``batch`` with another history and a mask that matches it."""
    return {**batch, "past_values": past, "past_observed_mask": torch.ones_like(past, dtype=torch.bool)}


BAD_INPUTS = {
    "nodes": (lambda b: with_past(b, b["past_values"][:, :, :155]),
              "num_nodes=156 but past_values has 155 nodes \\(past_values.shape=\\(2, 12, 155, 1\\), "
              "expected \\(batch, input_len=12, nodes=156, in_channels=1\\)"),
    "length": (lambda b: with_past(b, b["past_values"][:, 1:]), "input_len=12 but past_values has 11 time steps"),
    "channels": (lambda b: with_past(b, b["past_values"].repeat(1, 1, 1, 2)),
                 "in_channels=1 but past_values has 2 channels"),
    "rank": (lambda b: with_past(b, b["past_values"][..., 0]), "got a 3-d tensor of shape \\(2, 12, 156\\)"),
    "node_index": (
        lambda b: {**b, "node_index": torch.tensor([0, 1])},
        "node_index selects 2 nodes but past_values has 156",
    ),
    "mask": (lambda b: {**b, "past_observed_mask": b["past_observed_mask"][:, 1:]},
             "past_observed_mask has shape \\(2, 11, 156, 1\\) but past_values has shape \\(2, 12, 156, 1\\)"),
    "horizon": (lambda b: {**b, "future_values": b["future_values"][:, :6]},
                "forecasts shape .*=\\(2, 12, 156, 1\\) but future_values has shape \\(2, 6, 156, 1\\): its horizon "
                "is 6 steps, the model forecasts horizon=12"),
    "future mask": (lambda b: {**b, "future_observed_mask": b["future_observed_mask"][..., :100, :]},
                    "future_observed_mask has shape \\(2, 12, 100, 1\\) but future_values has shape "
                    "\\(2, 12, 156, 1\\)"),
    "no history": (lambda b: {"future_values": b["future_values"]}, "missing 1 required positional argument: "
                   "'past_values'"),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_history_is_refused_with_the_numbers(name, case, sz_taxi):
    model = build(name, sz_taxi, **SMALL[name])
    corrupt, message = BAD_INPUTS[case]
    error = TypeError if case == "no history" else ValueError
    with pytest.raises(error, match=message):
        model(**corrupt(train_batch(sz_taxi, 2)))


def non_finite(graph: np.ndarray, value: float) -> np.ndarray:
    graph = graph.copy()
    graph[4, 7] = value
    return graph


BAD_GRAPHS = {
    "shape": (lambda g: g[:155, :155], "adjacency must have shape \\(156, 156\\); got \\(155, 155\\)"),
    "nan": (lambda g: non_finite(g, np.nan), "1 non-finite entries \\(first at \\[4, 7\\] = nan\\)"),
    "inf": (lambda g: non_finite(g, np.inf), "1 non-finite entries \\(first at \\[4, 7\\] = inf\\)"),
    "negative": (lambda g: non_finite(g, -1.0), "non-negative; 1 are negative"),
}


@pytest.mark.parametrize("name", ["gwnet", "stgcn"])
@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_bad_adjacency_is_refused(name, case, sz_taxi):
    corrupt, message = BAD_GRAPHS[case]
    with pytest.raises(ValueError, match=message):
        build(name, sz_taxi, adjacency=corrupt(sz_taxi.adjacency))


def test_stgcn_requires_a_graph_and_a_long_enough_history(sz_taxi):
    with pytest.raises(ValueError, match="STGCN needs an adjacency matrix of shape \\(156, 156\\); got None"):
        build("stgcn", sz_taxi, adjacency=None)
    with pytest.raises(StrictDataclassClassValidationError, match="input_len must be at least 9; got input_len=8"):
        build("stgcn", sz_taxi, input_len=8)


def test_stid_refuses_missing_or_out_of_range_calendar(sz_taxi):
    model = build("stid", sz_taxi)
    batch = train_batch(sz_taxi, 2)
    past = batch["past_values"]
    with pytest.raises(ValueError, match="needs past_time_features of shape \\(2, 12, 2\\); got None"):
        model(past)
    late = batch["past_time_features"].clone()
    late[0, -1, 0] = 96
    with pytest.raises(
        ValueError, match="time-of-day slot must lie in \\[0, 96\\); got values from .* to 96"
    ):
        model(past, past_time_features=late)
    with pytest.raises(ValueError, match="expects past_time_features of shape \\(2, 12, 2\\); got \\(2, 11, 2\\)"):
        model(past, past_time_features=batch["past_time_features"][:, 1:])


@pytest.mark.parametrize("name", NAMES)
def test_sixty_steps_overfit_a_small_real_slice(name, sz_taxi):
    """A working model memorises four real windows: the masked MAE must fall below half its start."""
    torch.manual_seed(0)
    model = build(name, sz_taxi, dropout=0.0, **SMALL[name])
    batch = train_batch(sz_taxi, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_scaling_happens_inside_and_the_forecast_is_in_original_units(name, sz_taxi):
    """The model with the training span's statistics equals the same network fed scaled values by hand."""
    torch.manual_seed(0)
    model = build(name, sz_taxi, **SMALL[name]).eval()
    identity = build(name, sz_taxi, scaling=None, **SMALL[name]).eval()
    identity.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("scaler.")},
                             strict=False)
    batch = train_batch(sz_taxi, 3)
    mean, std = float(sz_taxi.scaler.mean[0]), float(sz_taxi.scaler.std[0])
    scaled_by_hand = torch.where(batch["past_observed_mask"], (batch["past_values"] - mean) / std, 0.0)
    with torch.no_grad():
        out = model(**batch)
        scaled = identity(**{**batch, "past_values": scaled_by_hand}).prediction_outputs
    torch.testing.assert_close(out.prediction_outputs, scaled * std + mean, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.loc, torch.full((3, 1, 156, 1), mean)) and torch.equal(out.scale, torch.full((3, 1, 156, 1), std))
    # the loss is the masked MAE in original units over observed targets
    expected = masked_mae(out.prediction_outputs, batch["future_values"], batch["future_observed_mask"])
    assert torch.equal(out.loss, expected)
    # missing history entries may hold anything: they are masked before the network sees them
    noisy = batch["past_values"].masked_fill(~batch["past_observed_mask"], float("nan"))
    with torch.no_grad():
        assert torch.equal(model(**{**batch, "past_values": noisy}).prediction_outputs, out.prediction_outputs)


def test_a_model_built_without_statistics_scales_by_the_identity(sz_taxi):
    model = build("stid", sz_taxi, scaling=None)
    assert torch.equal(model.scaler.past_loc, torch.zeros(156, 1))
    assert torch.equal(model.scaler.future_scale, torch.ones(156, 1))
    out = model(**train_batch(sz_taxi, 2))
    assert torch.equal(out.loc, torch.zeros(2, 1, 156, 1)) and torch.equal(out.scale, torch.ones(2, 1, 156, 1))


def test_loading_a_scaler_of_another_graph_is_refused_with_both_counts(sz_taxi, tmp_path):
    model = build("stid", sz_taxi)
    model.save_pretrained(tmp_path)
    smaller = STID(num_nodes=20, input_len=12, horizon=12, in_channels=1, out_channels=1, steps_per_day=96)
    with pytest.raises(ValueError, match="saved scaler .* describes 156 nodes x 1 channels but this model has 20 nodes"):
        safetensors.torch.load_model(smaller, tmp_path / "model.safetensors")
    bad = {"past_loc": [[0.0]] * 5, "past_scale": [[1.0]] * 5, "future_loc": [[0.0]] * 5, "future_scale": [[1.0]] * 5}
    with pytest.raises(ValueError, match="past_loc has shape \\(5, 1\\) but the model has 156 nodes"):
        build("stid", sz_taxi, scaling=bad)


def test_scaling_statistics_stay_float32_when_the_model_is_cast(sz_taxi):
    model = build("stid", sz_taxi).to(torch.bfloat16)
    assert model.regression.weight.dtype == torch.bfloat16
    assert model.scaler.future_loc.dtype == torch.float32
    out = model(**train_batch(sz_taxi, 2))
    assert out.prediction_outputs.dtype == torch.float32 and torch.isfinite(out.loss)


def test_an_unknown_loss_is_refused_and_mse_is_used_when_asked(sz_taxi):
    with pytest.raises(StrictDataclassClassValidationError, match="`loss` must be one of .*, got 'mape'"):
        build("stid", sz_taxi, loss="mape")
    model = build("stid", sz_taxi, loss="mse")
    out = model(**train_batch(sz_taxi, 2))
    batch = train_batch(sz_taxi, 2)
    expected = ((out.prediction_outputs - batch["future_values"]) ** 2)[batch["future_observed_mask"]].mean()
    torch.testing.assert_close(out.loss, expected)


def test_the_calendar_resolution_is_never_assumed():
    sizes = dict(num_nodes=5, input_len=12, horizon=3, in_channels=1, out_channels=1)
    with pytest.raises(ValueError, match="STID reads the time of day .*give steps_per_day"):
        STID(**sizes)
    assert STID(**sizes, if_tod=False).config.steps_per_day is None
    assert STID(**sizes, steps_per_day=96).tod_embedding.shape == (96, 32)
    with pytest.raises(ValueError, match="GWNet with calendar_channels needs steps_per_day"):
        GWNet(**sizes, calendar_channels=True)
