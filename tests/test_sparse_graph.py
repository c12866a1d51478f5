"""The sparse graph path of GWNet and STGCN against the dense one, on the real METR-LA graph.

los-loop's 207 sensors are METR-LA's, in the order of DCRNN's ``adj_mx.pkl``, whose Gaussian
kernel weights make a weighted, directed graph: its forward and backward transition matrices
differ, so both supports are checked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

import st_peft.backbones.sparse_graph as sparse_graph
from st_peft.backbones import BACKBONES, STGCN, STGCNConfig
from st_peft.backbones.graph_ops import scaled_laplacian, transition_matrix
from st_peft.backbones.sparse_graph import (
    EIGENVALUE_TOLERANCE,
    graph_index,
    largest_laplacian_eigenvalue,
    scaled_laplacian_values,
    sparse_operator,
    transition_values,
)
from st_peft.backbones.stgcn import ChebGraphConv
from st_peft.checks import as_adjacency
from st_peft.data import build_splits, load, read_adjacency
from st_peft.data.builtin import BUILTIN_ROOT
from st_peft.data.node_batching import NodeBatchCollator, NodeSampler

SMALL = {
    "gwnet": {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 16, "end_channels": 16},
    "stgcn": {"block_channels": (16, 8, 16)},
}


@pytest.fixture(scope="module")
def los_loop():
    """los-loop's splits, 12 steps in and out, and METR-LA's weighted directed graph (float32)."""
    splits = build_splits(load("los-loop"), input_len=12, horizon=12)
    graph = read_adjacency(BUILTIN_ROOT / "metr-la-graph" / "adj_mx.pkl")
    assert graph.shape == (207, 207) and not np.allclose(graph, graph.T)
    return splits, graph


def build(name: str, splits, graph: np.ndarray, sparse: bool, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return BACKBONES[name](**splits.model_kwargs(), steps_per_day=splits.steps_per_day, adjacency=graph,
                           sparse_graph=sparse, **SMALL[name], **overrides)


def batch_of(splits, windows: int = 4) -> dict[str, torch.Tensor]:
    starts = np.asarray(splits.train["start"], dtype=np.int64)
    return splits.collator.gather(starts[:: len(starts) // windows][:windows])


def symmetric_laplacian(graph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normalised Laplacian ``I - D^-1/2 W D^-1/2`` of ``W = (A + A^T) / 2`` without self-loops, at
    :func:`graph_index`'s entries: ``(index (2, M), values (M,))``."""
    weights = (graph + graph.T) / 2.0
    np.fill_diagonal(weights, 0.0)
    degree = weights.sum(axis=1)
    inv_sqrt = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    laplacian = np.eye(len(graph)) - inv_sqrt[:, None] * weights * inv_sqrt[None, :]
    index = graph_index(graph)
    return index, laplacian[index[0], index[1]], laplacian


def knn_graph(num_nodes: int, neighbours: int, seed: int) -> np.ndarray:
    """Each of ``num_nodes`` random points linked to its ``neighbours`` nearest, Gaussian kernel weights."""
    points = np.random.default_rng(seed).random((num_nodes, 2))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :neighbours]
    kept = np.take_along_axis(distances, nearest, axis=1)
    graph = np.zeros((num_nodes, num_nodes))
    np.put_along_axis(graph, nearest, np.exp(-(kept / kept.std()) ** 2), axis=1)
    return graph


@pytest.mark.parametrize("name", ["gwnet", "stgcn"])
def test_the_sparse_path_equals_the_dense_path_forward_and_backward(name, los_loop):
    splits, graph = los_loop
    batch = batch_of(splits)
    results = {}
    for sparse in (False, True):
        model = build(name, splits, graph, sparse)
        past = batch["past_values"].clone().requires_grad_(True)
        out = model(**{**batch, "past_values": past})
        out.loss.backward()
        results[sparse] = out.prediction_outputs.detach(), out.loss.detach(), past.grad, {
            key: parameter.grad for key, parameter in model.named_parameters()}
    (dense_out, dense_loss, dense_input_grad, dense_grads) = results[False]
    (sparse_out, sparse_loss, sparse_input_grad, sparse_grads) = results[True]
    assert not torch.equal(sparse_out, dense_out) or name == "stgcn"  # another summation order: not bit-equal
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-5, atol=1e-4)  # speeds of ~60 mph
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(sparse_input_grad, dense_input_grad, rtol=1e-4, atol=1e-9)
    assert sparse_grads.keys() == dense_grads.keys()
    for key, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[key], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()),
                                   msg=lambda message, key=key: f"{key}: {message}")


def test_both_chebyshev_sums_on_a_sparse_laplacian_equal_the_dense_ones(los_loop):
    # Clenshaw's sum for a plain theta, the paper's recurrence when a PEFT layer stands in its place
    _, graph = los_loop
    index = graph_index(graph)
    values = torch.tensor(scaled_laplacian_values(graph, index), dtype=torch.float32)
    sparse = sparse_operator(torch.from_numpy(index), values, 207)
    dense = torch.tensor(scaled_laplacian(graph.astype(np.float64)), dtype=torch.float32)
    torch.manual_seed(0)
    conv = ChebGraphConv(6, 4, order=3)
    hidden = torch.randn(2, 6, 207, 5)
    wrapped = ChebGraphConv(6, 4, order=3)
    wrapped.theta = torch.nn.Sequential(conv.theta)
    for layer in (conv, wrapped):
        torch.testing.assert_close(layer(hidden, sparse), layer(hidden, dense), rtol=1e-5, atol=1e-5)


def test_sparse_operators_hold_the_dense_values_on_the_edge_list(los_loop):
    _, graph = los_loop
    index = graph_index(graph)
    dense = as_adjacency(graph, model="test", num_nodes=207)
    rows, cols = index
    # every non-zero of A, A^T and the diagonal is listed, once, row-major
    listed = np.zeros((207, 207), dtype=bool)
    listed[rows, cols] = True
    assert np.array_equal(listed, (dense != 0) | (dense.T != 0) | np.eye(207, dtype=bool))
    assert np.all(np.diff(rows * 207 + cols) > 0)
    for backward, matrix in ((False, dense), (True, dense.T)):
        expected = transition_matrix(matrix)
        np.testing.assert_allclose(transition_values(graph, index, backward=backward), expected[rows, cols],
                                   rtol=1e-13, atol=0)
        assert expected[~listed].max() == 0  # nothing off the list is lost
    np.testing.assert_allclose(scaled_laplacian_values(graph, index), scaled_laplacian(dense)[rows, cols],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("data", ["los-loop + METR-LA graph", "sz-taxi", "chickenpox", "nyc-taxi"])
def test_the_lanczos_eigenvalue_matches_the_dense_one_within_its_tolerance(data, los_loop):
    graph = los_loop[1] if data.startswith("los-loop") else load(data).adjacency
    index, values, laplacian = symmetric_laplacian(graph.astype(np.float64))
    dense = float(np.linalg.eigvalsh(laplacian)[-1])
    iterative = largest_laplacian_eigenvalue(index, values, len(graph))
    assert abs(iterative - dense) <= EIGENVALUE_TOLERANCE * dense


def test_on_a_road_like_graph_lanczos_stays_below_lambda_max_and_within_tolerance():
    # lambda_max of a kNN graph sits just below 2 among many close eigenvalues, where the
    # residual converges slowly
    graph = knn_graph(1200, neighbours=8, seed=0)
    index, values, laplacian = symmetric_laplacian(graph)
    dense = float(np.linalg.eigvalsh(laplacian)[-1])
    assert 2 - dense < 1e-3
    iterative = largest_laplacian_eigenvalue(index, values, len(graph))
    assert iterative <= dense + 1e-12 and dense - iterative <= EIGENVALUE_TOLERANCE * dense


def test_the_bound_two_ends_lanczos_where_the_residual_would_not(recwarn):
    # An even cycle is bipartite (lambda_max = 2 exactly) and its top eigenvalues are O(1 / N^2)
    # apart: the Ritz residual would need about N steps, the interval [theta, 2] needs a few hundred.
    nodes = 4000
    ring = np.arange(nodes)
    index = np.concatenate([np.stack([ring, (ring + 1) % nodes]), np.stack([ring, (ring - 1) % nodes]),
                            np.stack([ring, ring])], axis=1)
    index = index[:, np.argsort(index[0] * nodes + index[1])]
    values = np.where(index[0] == index[1], 1.0, -0.5)
    iterative = largest_laplacian_eigenvalue(index, values, nodes, max_steps=400)
    assert not [w for w in recwarn if "Lanczos" in str(w.message)]
    assert 2 - EIGENVALUE_TOLERANCE * 2 <= iterative <= 2


def test_lanczos_warns_with_the_interval_when_its_steps_run_out(los_loop):
    index, values, laplacian = symmetric_laplacian(los_loop[1].astype(np.float64))
    with pytest.warns(UserWarning, match=r"did not reach a relative tolerance of 1e-05 in 3 Lanczos steps; it lies in "
                                         r"\[[0-9.]+, [0-9.]+\]"):
        rough = largest_laplacian_eigenvalue(index, values, 207, max_steps=3)
    assert rough < float(np.linalg.eigvalsh(laplacian)[-1])


@pytest.mark.parametrize("name", ["gwnet", "stgcn"])
def test_node_batches_on_the_sparse_path_equal_the_dense_subgraph(name, los_loop):
    splits, graph = los_loop
    dense, sparse = build(name, splits, graph, False).eval(), build(name, splits, graph, True).eval()
    starts = np.asarray(splits.test["start"])[:3]
    full = splits.collator.gather(starts)
    every = NodeBatchCollator(splits.collator, NodeSampler(207, 207)).gather(starts)
    patch = NodeBatchCollator(splits.collator, NodeSampler(207, 60, "bfs", graph, seed=0)).gather(starts)
    shuffled = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    unordered = {key: value[:, :, shuffled] if value.dim() == 4 else value for key, value in patch.items()}
    unordered["node_index"] = patch["node_index"][shuffled]
    with torch.no_grad():
        # on every node the sub-matrix is the whole operator, entry for entry: the same bits
        torch.testing.assert_close(sparse(**every).prediction_outputs, sparse(**full).prediction_outputs,
                                   rtol=0, atol=0)
        for part in (patch, unordered):
            torch.testing.assert_close(sparse(**part).prediction_outputs, dense(**part).prediction_outputs,
                                       rtol=1e-5, atol=1e-4)


def test_the_induced_sparse_subgraph_is_the_dense_sub_matrix(los_loop):
    _, graph = los_loop
    index = graph_index(graph)
    values = torch.tensor(transition_values(graph, index), dtype=torch.float32)
    dense = torch.tensor(transition_matrix(graph.astype(np.float64)), dtype=torch.float32)
    nodes = torch.tensor([150, 3, 4, 5, 80, 2, 206])
    sub = sparse_operator(torch.from_numpy(index), values, 207, nodes)
    assert sub.layout == torch.sparse_csr and sub.shape == (7, 7)
    torch.testing.assert_close(sub.to_dense(), dense[nodes][:, nodes], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="node_index names a node more than once"):
        sparse_operator(torch.from_numpy(index), values, 207, torch.tensor([3, 4, 3]))


@pytest.mark.parametrize("name", ["gwnet", "stgcn"])
def test_a_sparse_model_saves_its_edge_list_and_loads_to_the_same_outputs(name, los_loop, tmp_path):
    splits, graph = los_loop
    model = build(name, splits, graph, True)
    batch = batch_of(splits)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    entries = len(graph_index(graph)[0])
    assert config["sparse_graph"] is True and config["graph_entries"] == entries
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert saved["graph_index"].dtype == torch.int64 and saved["graph_index"].shape == (2, entries)
    assert "adjacency" not in saved and saved["adjacency_values"].shape == (entries,)
    # the Trainer's checkpoints save the raw state dict
    safetensors.torch.save_file(model.state_dict(), tmp_path / "checkpoint.safetensors")

    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys() and loaded.graph_is_sparse
    assert torch.equal(loaded.graph_index, model.graph_index)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).prediction_outputs, model(**batch).prediction_outputs)


@pytest.mark.parametrize("name", ["gwnet", "stgcn"])
def test_bfloat16_models_and_autocast_multiply_the_sparse_graph_in_float32(name, los_loop):
    # torch has no bfloat16 kernel for sparse CSR products on the CPU
    splits, graph = los_loop
    model = build(name, splits, graph, True).eval()
    batch = batch_of(splits, 2)
    with torch.no_grad():
        reference = model(**batch).prediction_outputs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(**batch).prediction_outputs
        cast = model.to(torch.bfloat16)(**batch).prediction_outputs
    for forecast in (autocast, cast):
        torch.testing.assert_close(forecast.float(), reference, rtol=0.05, atol=0.05 * float(reference.abs().mean()))


def test_the_size_threshold_chooses_the_path_and_the_choice_is_written_to_the_config(los_loop, monkeypatch):
    splits, graph = los_loop
    assert sparse_graph.SPARSE_GRAPH_MIN_NODES > 207
    small = build("stgcn", splits, graph, None)
    assert not small.graph_is_sparse and small.config.sparse_graph is False and small.config.graph_entries is None
    assert small.laplacian.shape == (207, 207)
    monkeypatch.setattr(sparse_graph, "SPARSE_GRAPH_MIN_NODES", 200)
    assert build("gwnet", splits, graph, None).graph_is_sparse
    forced_dense = build("gwnet", splits, graph, False)
    assert not forced_dense.graph_is_sparse and forced_dense.forward_transition.shape == (207, 207)


def test_a_checkpoint_saved_before_the_sparse_path_loads_dense_above_the_threshold(los_loop, tmp_path, monkeypatch):
    splits, graph = los_loop
    model = build("gwnet", splits, graph, False).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["sparse_graph"], config["graph_entries"]  # as written before these fields existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sparse_graph, "SPARSE_GRAPH_MIN_NODES", 200)
    loaded = BACKBONES["gwnet"].from_pretrained(tmp_path).eval()
    assert not loaded.graph_is_sparse
    batch = batch_of(splits, 2)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).prediction_outputs, model(**batch).prediction_outputs)


def test_a_sparse_config_without_its_edge_count_cannot_be_loaded():
    with torch.device("meta"), pytest.raises(ValueError, match="sparse graph but no graph_entries"):
        STGCN(STGCNConfig(num_nodes=5, sparse_graph=True))
    with pytest.raises(StrictDataclassClassValidationError, match="`graph_entries` must be at least 1, got 0"):
        STGCNConfig(num_nodes=5, graph_entries=0)


def test_a_floating_graph_is_validated_without_a_float64_copy_only_when_asked(los_loop):
    graph = los_loop[1]
    assert graph.dtype == np.float32
    assert np.shares_memory(as_adjacency(graph, model="test", num_nodes=207, keep_float_dtype=True), graph)
    assert as_adjacency(graph, model="test", num_nodes=207).dtype == np.float64
    assert as_adjacency(graph.astype(bool), model="test", num_nodes=207, keep_float_dtype=True).dtype == np.float64
    with pytest.raises(ValueError, match="weights must be non-negative"):
        as_adjacency(-graph, model="test", num_nodes=207, keep_float_dtype=True)
