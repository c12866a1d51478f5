"""Tests of the reference backbones STID, GWNet and STGCN on the built-in real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

import st_peft.data
from st_peft.backbones import BACKBONES, STGCN, STID, GWNet
from st_peft.backbones.graph_ops import scaled_laplacian, transition_matrix
from st_peft.backbones.stgcn import ChebGraphConv
from st_peft.metrics import masked_mae

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
    kwargs = dict(splits.model_kwargs())
    if name == "stid":
        kwargs["steps_per_day"] = splits.steps_per_day
    else:
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
        # The whole batch dict goes in: y and y_mask are extra keywords the model must ignore.
        out = model(**batch)
    assert out.shape == (2, 12, 156, 1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_head_outputs_land_on_horizon_and_channel_axes(name):
    """With a zero head weight and bias ``k``, output ``[b, h, n, c]`` must be ``k = h * C_out + c``."""
    data = st_peft.data.load("nyc-taxi")
    splits = st_peft.data.build_splits(data, input_len=12, horizon=3)
    model = build(name, splits, **SMALL[name]).eval()
    head = head_bias(model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(head.bias.numel(), dtype=torch.float32))
        out = model(**train_batch(splits, 2))
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
    masked_mae(sz_taxi.scaler.inverse_transform(model(**batch)), batch["y"], batch["y_mask"]).backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nodes"] == 156 and config["input_len"] == 12 and config["horizon"] == 12
    if name != "stid":
        assert np.array_equal(np.asarray(config["adjacency"], dtype=np.float32), sz_taxi.adjacency)
    assert (tmp_path / "model.safetensors").is_file()
    # Trainer checkpoints save the raw state dict, which safetensors refuses when a buffer is not contiguous
    safetensors.torch.save_file(model.state_dict(), tmp_path / "checkpoint.safetensors")

    torch.manual_seed(1)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(**batch), model(**batch))


@pytest.mark.parametrize("form", ["array", "tensor", "list"])
def test_adjacency_given_in_any_form_is_saved_the_same(form, tmp_path):
    graph = st_peft.data.load("chickenpox").adjacency
    given = {"array": graph, "tensor": torch.from_numpy(graph), "list": graph.tolist()}[form]
    model = STGCN(num_nodes=20, input_len=12, horizon=4, in_channels=1, out_channels=1, adjacency=given)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["adjacency"]
    assert np.array_equal(np.asarray(saved, dtype=np.float32), graph)
    assert torch.equal(STGCN.from_pretrained(tmp_path).adjacency, torch.from_numpy(graph))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name, sz_taxi):
    torch.manual_seed(0)
    model = build(name, sz_taxi, **SMALL[name])
    batch = train_batch(sz_taxi, 4)
    loss = masked_mae(sz_taxi.scaler.inverse_transform(model(**batch)), batch["y"], batch["y_mask"])
    loss.backward()
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
    masked_mae(sz_taxi.scaler.inverse_transform(model(**batch)), batch["y"], batch["y_mask"]).backward()
    optimizer.step()
    after = model.adaptive_adjacency().detach()
    assert not torch.equal(before, after)
    assert torch.allclose(after.sum(dim=1), torch.ones(156))


def test_gwnet_without_adaptive_adjacency_has_no_node_embeddings(sz_taxi):
    model = build("gwnet", sz_taxi, adaptive_adjacency=False, **SMALL["gwnet"])
    assert not any("embedding" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="adaptive_adjacency=False"):
        model.adaptive_adjacency()
    with pytest.raises(ValueError, match="needs a graph"):
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
    with torch.no_grad():
        reference = model(**batch)
        earlier = batch["x_time"].clone()
        earlier[:, :-1] = 0
        assert torch.equal(model(x=batch["x"], x_time=earlier), reference)
        last = batch["x_time"].clone()
        last[:, -1, 0] = (last[:, -1, 0] + 1) % sz_taxi.steps_per_day
        assert not torch.equal(model(x=batch["x"], x_time=last), reference)
        no_calendar = build("stid", sz_taxi, if_tod=False, if_dow=False).eval()
        assert no_calendar(x=batch["x"]).shape == (2, 12, 156, 1)


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
    with torch.no_grad():
        reference = model(**batch)
        shifted = batch["x_time"].clone()
        shifted[..., 0] = (shifted[..., 0] + 4) % sz_taxi.steps_per_day
        assert reference.shape == (2, 12, 156, 1)
        assert not torch.allclose(model(x=batch["x"], x_time=shifted), reference)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(type(model).from_pretrained(tmp_path).eval()(**batch), reference)
    with pytest.raises(ValueError, match="needs x_time .* or build the model with calendar_channels=False"):
        model(x=batch["x"])
    plain = build(name, sz_taxi, **SMALL[name]).eval()
    with torch.no_grad():
        assert torch.equal(plain(x=batch["x"]), plain(**batch))


@pytest.mark.parametrize("name", NAMES)
def test_node_index_selects_a_subgraph(name, sz_taxi):
    torch.manual_seed(0)
    model = build(name, sz_taxi, **SMALL[name]).eval()
    batch = train_batch(sz_taxi, 2)
    everything = torch.arange(156)
    subset = torch.tensor([3, 50, 51, 52, 120])
    with torch.no_grad():
        full = model(**batch)
        assert torch.allclose(model(**batch, node_index=everything), full, atol=1e-6)
        part = model(**{**batch, "x": batch["x"][:, :, subset]}, node_index=subset)
    assert part.shape == (2, 12, 5, 1)
    if name == "stid":  # STID treats nodes independently, so a subset changes nothing.
        assert torch.allclose(part, full[:, :, subset], atol=1e-6)


BAD_INPUTS = {
    "nodes": (lambda b: {**b, "x": b["x"][:, :, :155]}, "num_nodes=156 but x has 155 nodes"),
    "length": (lambda b: {**b, "x": b["x"][:, 1:]}, "input_len=12 but x has 11 time steps"),
    "channels": (lambda b: {**b, "x": b["x"].repeat(1, 1, 1, 2)}, "in_channels=1 but x has 2 channels"),
    "rank": (lambda b: {**b, "x": b["x"][..., 0]}, "got a 3-d tensor of shape \\(2, 12, 156\\)"),
    "node_index": (
        lambda b: {**b, "node_index": torch.tensor([0, 1])},
        "node_index selects 2 nodes but x has 156",
    ),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_history_is_refused_with_the_numbers(name, case, sz_taxi):
    model = build(name, sz_taxi, **SMALL[name])
    corrupt, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
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
    with pytest.raises(ValueError, match="input_len must be at least 9; got input_len=8"):
        build("stgcn", sz_taxi, input_len=8)


def test_stid_refuses_missing_or_out_of_range_calendar(sz_taxi):
    model = build("stid", sz_taxi)
    batch = train_batch(sz_taxi, 2)
    with pytest.raises(ValueError, match="needs x_time of shape \\(batch, 12, 2\\); got None"):
        model(x=batch["x"])
    late = batch["x_time"].clone()
    late[0, -1, 0] = 96
    with pytest.raises(
        ValueError, match="time-of-day slot must lie in \\[0, 96\\); got values from .* to 96"
    ):
        model(x=batch["x"], x_time=late)
    with pytest.raises(ValueError, match="expects x_time of shape \\(2, 12, 2\\); got \\(2, 11, 2\\)"):
        model(x=batch["x"], x_time=batch["x_time"][:, 1:])


@pytest.mark.parametrize("name", NAMES)
def test_sixty_steps_overfit_a_small_real_slice(name, sz_taxi):
    """A working model memorises four real windows: the masked MAE must fall below half its start."""
    torch.manual_seed(0)
    model = build(name, sz_taxi, dropout=0.0, **SMALL[name])
    batch = train_batch(sz_taxi, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = masked_mae(sz_taxi.scaler.inverse_transform(model(**batch)), batch["y"], batch["y_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
