"""Graph files as users have them (issue 13): DCRNN pickles of every protocol, PEMS distance CSVs,
edge lists and dense matrices, all through ``read_adjacency`` and ``load(..., adjacency=...)``."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pandas as pd
import pytest

import st_peft.data as D
from st_peft.data.builtin import BUILTIN_ROOT

METR_LA_PICKLE = BUILTIN_ROOT / "metr-la-graph" / "adj_mx.pkl"
PEMS_GRAPHS = BUILTIN_ROOT / "pems-graphs"


@pytest.fixture(scope="module")
def metr_la():
    """The real DCRNN METR-LA graph: (sensor ids, id -> index, adjacency)."""
    return D.load_plain_pickle(METR_LA_PICKLE)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_dcrnn_pickles_of_every_protocol_load(metr_la, tmp_path, protocol):
    # protocols 0-2 write the array buffer through _codecs.encode, protocol 5 through
    # numpy._core.numeric._frombuffer: both were refused
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps(metr_la, protocol=protocol))
    sensor_ids, adjacency = D.read_dcrnn_pickle(path)
    assert sensor_ids == metr_la[0]
    np.testing.assert_array_equal(adjacency, metr_la[2])
    np.testing.assert_array_equal(D.read_adjacency(path), metr_la[2])


def test_dcrnn_pickle_rows_follow_the_data_node_order(metr_la, tmp_path):
    ids = metr_la[0]
    order = [5, 0, 3]
    adjacency = D.read_adjacency(METR_LA_PICKLE, node_ids=[ids[i] for i in order])
    np.testing.assert_array_equal(adjacency, metr_la[2][np.ix_(order, order)])


class _CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickle_that_would_create_a_file_is_refused_by_name_and_never_runs(metr_la, tmp_path, protocol):
    target = tmp_path / "created-by-the-pickle"
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps([metr_la[0], metr_la[1], [metr_la[2], _CreatesAFile(target)]], protocol=protocol))
    with pytest.raises(D.DataError, match=r"refused to unpickle 'io\.open'"):
        D.read_dcrnn_pickle(path)
    np.savez(tmp_path / "speed.npz", data=D.load("los-loop").values[:100])
    with pytest.raises(D.DataError, match=r"refused to unpickle 'io\.open'"):
        D.load(tmp_path / "speed.npz", steps_per_day=288, adjacency=path)
    assert not target.exists()
    pickle.loads(path.read_bytes())[2][1].close()  # the plain unpickler does run it
    assert target.exists()


def test_bytes_global_decodes_latin1_only(tmp_path):
    # the one codec pickle uses for bytes; any other codec name is refused, not looked up
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(D.DataError, match=r"'_codecs\.encode' with encoding 'rot13'"):
        D.load_plain_pickle(path)


def test_pems_distance_csv_becomes_dcrnn_gaussian_weights(tmp_path):
    shutil.copy(PEMS_GRAPHS / "PEMS08.csv", tmp_path / "distances.csv")
    adjacency = D.read_adjacency(tmp_path / "distances.csv", num_nodes=170)
    edges = pd.read_csv(PEMS_GRAPHS / "PEMS08.csv")
    std = edges["cost"].std(ddof=0)
    weights = np.exp(-np.square(edges["cost"].to_numpy() / std))
    weights[weights < 0.1] = 0.0  # DCRNN's normalized_k
    expected = np.zeros((170, 170), dtype=np.float32)
    expected[edges["from"], edges["to"]] = weights
    expected[edges["to"], edges["from"]] = weights
    np.testing.assert_allclose(adjacency, expected, rtol=1e-6)
    # by hand for the first row, 9 -> 153 at 310.6: exp(-(310.6 / 216.319)^2) = 0.1272
    assert adjacency[9, 153] == pytest.approx(0.12724, abs=1e-4) and adjacency[153, 9] == adjacency[9, 153]
    assert 0 < (adjacency > 0).sum() < 2 * len(edges)  # the threshold removed edges


def test_pems03_distance_csv_by_sensor_id(tmp_path):
    shutil.copy(PEMS_GRAPHS / "PEMS03.csv", tmp_path / "PEMS03.csv")
    ids = (PEMS_GRAPHS / "PEMS03.txt").read_text().split()
    adjacency = D.read_adjacency(tmp_path / "PEMS03.csv", node_ids=ids)
    assert adjacency.shape == (358, 358) and 0 < adjacency.max() <= 1
    first = pd.read_csv(PEMS_GRAPHS / "PEMS03.csv").iloc[0]
    assert adjacency[ids.index(str(int(first["from"]))), ids.index(str(int(first["to"])))] > 0


def test_load_npz_with_a_pems_distance_csv(tmp_path):
    # real values (170 of nyc-taxi's regions) with the real PEMS08 graph of 170 nodes
    values = D.load("nyc-taxi").values[:200, :170]
    np.savez(tmp_path / "my.npz", data=values)
    shutil.copy(PEMS_GRAPHS / "PEMS08.csv", tmp_path / "distances.csv")
    data = D.load(tmp_path / "my.npz", steps_per_day=48, adjacency=tmp_path / "distances.csv")
    np.testing.assert_array_equal(data.adjacency, D.read_adjacency(tmp_path / "distances.csv", num_nodes=170))
    np.savez(tmp_path / "small.npz", data=values[:, :100])
    with pytest.raises(D.DataError, match=r"line \d+ names node index 1\d\d, outside \[0, 100\)"):
        D.load(tmp_path / "small.npz", steps_per_day=48, adjacency=tmp_path / "distances.csv")


def test_headerless_edge_list_and_dense_csv(tmp_path):
    edges = pd.read_csv(PEMS_GRAPHS / "PEMS08.csv")
    edges[["from", "to"]].to_csv(tmp_path / "edges.csv", header=False, index=False)
    binary = D.read_adjacency(tmp_path / "edges.csv", num_nodes=170)
    np.testing.assert_array_equal(binary, D.read_edge_list(PEMS_GRAPHS / "PEMS08.csv", num_nodes=170))
    shutil.copy(BUILTIN_ROOT / "los-loop" / "los_adj.csv", tmp_path / "dense.csv")
    dense = D.read_adjacency(tmp_path / "dense.csv")
    assert dense.shape == (207, 207)
    np.testing.assert_array_equal(dense, pd.read_csv(tmp_path / "dense.csv", header=None).to_numpy(np.float32))


def test_edge_list_needs_the_node_count(tmp_path):
    shutil.copy(PEMS_GRAPHS / "PEMS08.csv", tmp_path / "distances.csv")
    with pytest.raises(D.DataError, match="is an edge list: pass num_nodes=N"):
        D.read_adjacency(tmp_path / "distances.csv")


def test_unknown_header_names_read_edge_list(tmp_path):
    # issue 13: the error said "could not convert string to float: 'from'" and never named read_edge_list
    edges = pd.read_csv(PEMS_GRAPHS / "PEMS08.csv").rename(columns={"from": "src", "to": "dst"})
    edges.to_csv(tmp_path / "graph.csv", index=False)
    with pytest.raises(D.DataError, match=r"corrupt adjacency file .*header src,dst,cost.*read_edge_list"):
        D.read_adjacency(tmp_path / "graph.csv", num_nodes=170)
    np.savetxt(tmp_path / "wide.csv", np.ones((3, 5)), delimiter=",")
    with pytest.raises(D.DataError, match="neither a square matrix nor an edge list.*read_edge_list"):
        D.read_adjacency(tmp_path / "wide.csv")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("-1", r"line 3 names node index -1, outside \[0, 170\)"),
        ("1.7", r"line 3 names node '1.7', not an integer index"),
        ("north", r"line 3 names node 'north', not an integer index"),
        ("170", r"line 3 names node index 170, outside \[0, 170\)"),
    ],
)
def test_edge_list_indices_outside_the_graph_or_not_integers_are_refused(tmp_path, bad, message):
    # issue 14 (8): -1 wrapped to the last node and 1.7 became 1
    lines = (PEMS_GRAPHS / "PEMS08.csv").read_text().splitlines()
    lines[2] = f"{bad},{lines[2].split(',', 1)[1]}"
    (tmp_path / "edges.csv").write_text("\n".join(lines) + "\n")
    for weight in ("binary", "gaussian"):
        with pytest.raises(D.DataError, match=message):
            D.read_edge_list(tmp_path / "edges.csv", num_nodes=170, weight=weight)
    with pytest.raises(D.DataError, match=message):
        D.read_adjacency(tmp_path / "edges.csv", num_nodes=170)


def test_edge_list_cost_that_is_not_a_number_is_named(tmp_path):
    lines = (PEMS_GRAPHS / "PEMS08.csv").read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",far"
    (tmp_path / "edges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError, match="line 5 has cost 'far', not a finite number"):
        D.read_adjacency(tmp_path / "edges.csv", num_nodes=170)
