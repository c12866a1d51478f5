"""Node batching: uniform and graph-local draws, the node-batched collator, bad sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from st_peft.data import DataError, build_splits, load
from st_peft.data.node_batching import NodeBatchCollator, NodeSampler, neighbour_lists


@pytest.fixture(scope="module")
def splits():
    return build_splits(load("sz-taxi"), input_len=12, horizon=12)


def path_graph(nodes: int) -> np.ndarray:
    adjacency = np.zeros((nodes, nodes))
    adjacency[np.arange(nodes - 1), np.arange(1, nodes)] = 1.0  # one direction only: taken both ways
    return adjacency


def test_uniform_draws_are_distinct_increasing_seeded_and_vary():
    sampler = NodeSampler(50, 10, seed=3)
    draws = [sampler() for _ in range(5)]
    assert all(len(set(d)) == 10 and (np.diff(d) > 0).all() and d.min() >= 0 and d.max() < 50 for d in draws)
    again = NodeSampler(50, 10, seed=3)
    assert all(np.array_equal(d, again()) for d in draws)
    assert len({tuple(d) for d in draws}) > 1


def test_bfs_patches_on_a_path_are_contiguous_runs():
    sampler = NodeSampler(100, 7, strategy="bfs", adjacency=path_graph(100), seed=0)
    for _ in range(20):
        patch = sampler()
        assert len(patch) == 7 and patch[-1] - patch[0] == 6


def test_bfs_patches_restart_in_another_component_when_one_is_used_up():
    adjacency = np.zeros((10, 10))
    adjacency[0, 1] = adjacency[1, 2] = 1.0  # one component of 3 nodes, the rest isolated
    patch = NodeSampler(10, 5, strategy="bfs", adjacency=adjacency, seed=1)()
    assert len(set(patch)) == 5
    assert [n.tolist() for n in neighbour_lists(adjacency)][:3] == [[1], [0, 2], [1]]


def test_sampler_state_resumes_the_draws():
    sampler = NodeSampler(40, 6, strategy="bfs", adjacency=path_graph(40), seed=0)
    sampler()
    state = sampler.state_dict()
    expected = [sampler() for _ in range(3)]
    resumed = NodeSampler(40, 6, strategy="bfs", adjacency=path_graph(40), seed=99)
    resumed.load_state_dict(state)
    assert all(np.array_equal(e, resumed()) for e in expected)


@pytest.mark.parametrize("size", [0, -4, 2.5, True])
def test_a_node_batch_size_below_one_or_not_whole_is_refused(size):
    with pytest.raises(DataError, match="node batch size must be a whole number >= 1"):
        NodeSampler(10, size)


def test_a_node_batch_size_above_the_graph_is_capped_with_a_note():
    with pytest.warns(UserWarning, match="more than the graph's 10 nodes"):
        sampler = NodeSampler(10, 25)
    assert np.array_equal(sampler(), np.arange(10))


def test_bad_strategies_and_graphs_are_refused():
    with pytest.raises(DataError, match="unknown node sampling 'random'"):
        NodeSampler(10, 3, strategy="random")
    with pytest.raises(DataError, match="needs an adjacency"):
        NodeSampler(10, 3, strategy="bfs")
    with pytest.raises(DataError, match=r"shape \(5, 5\) but the data has 10 nodes"):
        NodeSampler(10, 3, strategy="bfs", adjacency=np.eye(5))


def test_the_collator_gathers_the_drawn_nodes_with_their_index(splits):
    collator = NodeBatchCollator(splits.collator, NodeSampler(splits.num_nodes, 50, "bfs", splits.adjacency, seed=0))
    starts = np.asarray(splits.train["start"])[[0, 5, 900]]
    batch = collator([{"start": int(s)} for s in starts])
    full = splits.collator.gather(starts)
    index = batch["node_index"]
    assert index.dtype == torch.int64 and index.shape == (50,) and (index.diff() > 0).all()
    for key in ("past_values", "past_observed_mask", "future_values", "future_observed_mask"):
        assert batch[key].shape[2] == 50
        assert torch.equal(batch[key], full[key][:, :, index])
    for key in ("past_time_features", "future_time_features"):
        assert torch.equal(batch[key], full[key])
    with pytest.raises(DataError, match="draws from 10 nodes but the data has 156"):
        NodeBatchCollator(splits.collator, NodeSampler(10, 3))


@pytest.mark.parametrize("name", ["stid", "gwnet", "stgcn"])
def test_a_node_batched_forward_on_every_node_equals_the_full_forward(splits, name):
    from st_peft.backbones import BACKBONES

    torch.manual_seed(0)
    kwargs = {**splits.model_kwargs(), "steps_per_day": splits.steps_per_day}
    if name != "stid":
        kwargs["adjacency"] = splits.adjacency
    model = BACKBONES[name](**kwargs).eval()
    starts = np.asarray(splits.test["start"])[:4]
    every = NodeBatchCollator(splits.collator, NodeSampler(splits.num_nodes, splits.num_nodes)).gather(starts)
    with torch.no_grad():
        batched = model(**every).prediction_outputs
        full = model(**splits.collator.gather(starts)).prediction_outputs
    torch.testing.assert_close(batched, full, rtol=0, atol=0)
