"""The convergence study's own machinery (benchmarks/st_lora_convergence.py): run keys, LoRA
parameter matching, early stopping, the paired bootstrap, and one cached run pair on real data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from script_module import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "st_lora_convergence.py"


@pytest.fixture(scope="module")
def study_module():
    return load_script(SCRIPT)


def test_every_run_key_round_trips_and_is_unique(study_module):
    units = study_module.study_units()
    keys = [unit.key for unit in units]
    assert len(keys) == len(set(keys))
    assert all(study_module.Unit.from_key(key) == unit for key, unit in zip(keys, units, strict=True))


def test_every_arm_waits_for_its_converged_backbone(study_module):
    units = study_module.study_units()
    position = {unit.key: index for index, unit in enumerate(units)}
    for unit in units:
        if unit.kind == "arm" and unit.arm != "1":
            assert position[f"{unit.backbone}_{unit.dataset}_s{unit.seed}_arm1"] < position[unit.key]


@pytest.mark.parametrize("budget", [1_164, 2_376, 5_496, 44_024])
def test_lora_ranks_match_the_budget_within_ten_percent(study_module, budget):
    splits = study_module.load_splits("chickenpox")
    costs = study_module.lora_layers(study_module.build_backbone("stid", splits, seed=0))
    ranks = study_module.match_lora_ranks(costs, budget)
    spent = sum(costs[name] * rank for name, rank in ranks.items())
    assert abs(spent - budget) <= 0.10 * budget
    assert all(rank >= 1 for rank in ranks.values())


def test_lora_layers_leave_out_dilated_convolutions(study_module):
    splits = study_module.load_splits("chickenpox")
    backbone = study_module.build_backbone("gwnet", splits, seed=0)
    costs = study_module.lora_layers(backbone)
    dilated = [name for name, module in backbone.named_modules()
               if isinstance(module, torch.nn.Conv2d) and set(module.dilation) != {1}]
    assert dilated and not set(dilated) & set(costs)
    for name, cost in costs.items():
        layer = backbone.get_submodule(name)
        if isinstance(layer, torch.nn.Conv2d):
            assert cost == layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] + layer.out_channels


def test_paired_change_against_hand_computed_values(study_module):
    arm = np.array([[1.0, 2.0], [3.0, 2.0]])
    reference = np.array([[2.0, 2.0], [4.0, 4.0]])
    weights = study_module.bootstrap_indices(2, 1.0, 2, np.random.default_rng(0))
    point, draws = study_module.paired_change(arm, reference, weights)
    assert point == pytest.approx(100 * (8 / 12 - 1))
    point, _ = study_module.paired_change(arm, reference, weights, squared=True)
    assert point == pytest.approx(100 * (np.sqrt(8 / 12) - 1))
    assert draws.shape == (study_module.BOOTSTRAP_DRAWS,)
    assert np.all(draws < 0)  # every entry of the arm is at or below the reference's


def test_bootstrap_draws_keep_the_sample_sizes(study_module):
    seed_weights, row_weights = study_module.bootstrap_indices(100, 2.0, 3, np.random.default_rng(1))
    assert np.all(seed_weights.sum(axis=1) == 3)
    assert np.all(row_weights.sum(axis=1) == 100)
    # blocks of 24 windows stored as rows of 2 windows: every draw picks runs of 12 consecutive rows
    first = np.flatnonzero(row_weights[0])
    assert len(first) >= 12


def test_an_arm_equal_to_its_reference_is_not_distinguishable(study_module):
    rng = np.random.default_rng(2)
    sums = rng.uniform(1, 2, size=(50, 6)).astype(np.float32)
    counts = np.full((50, 6), 10)
    entry = {"run": {"test_windows": 50}, "sums": sums, "counts": counts, "sums_trained": sums}
    cell = {"1": {0: entry, 1: entry}, "2": {0: entry, 1: entry}}
    result = study_module.compare(cell, "2", "1", draw_seed=0)
    assert result["seeds"] == [0, 1]
    for metric in study_module.COLUMNS:
        assert result[metric]["change"] == pytest.approx(0.0, abs=1e-9)
        assert not result[metric]["distinguishable"]


def test_worst_nodes_are_the_decile_with_the_highest_mae(study_module):
    node_abs = np.array([1.0, 9.0, 4.0, 0.0, 2.0, 8.0, 3.0, 5.0, 6.0, 7.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                         1.0, 1.0, 10.0])
    node_count = np.ones(20)
    node_count[19] = 10.0  # MAE 1.0: a large error sum over many observations is not the worst
    assert study_module.worst_nodes(node_abs, node_count) == [1, 5]


def test_training_that_never_improves_stops_after_the_patience_and_keeps_epoch_zero(study_module):
    splits = study_module.load_splits("chickenpox")
    model = study_module.build_backbone("stid", splits, seed=0)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    start, _, _ = study_module.evaluate(model, splits, "val")
    result, _ = study_module.train(model, splits, study_module.RECIPES["stid"], "adam", lr=0.0, weight_decay=0.0,
                                   seed=0, max_epochs=50)
    assert result.best_epoch == 0 and result.stopped_early
    assert result.epochs_run == study_module.PATIENCE
    assert result.val_curve[0] == start and result.best_val_mae == start
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_run_killed_between_epochs_goes_on_to_the_same_result_bit_for_bit(study_module, tmp_path, monkeypatch,
                                                                           capsys):
    splits = study_module.load_splits("chickenpox")

    # a new lr every epoch, so the schedule must resume too
    recipe = dataclasses.replace(study_module.RECIPES["stid"], milestones=(1, 2, 3, 4))

    def run(progress: Path | None, lr: float = 2e-3):
        model = study_module.build_backbone("stid", splits, seed=0)  # STID has dropout: the torch generator matters
        torch.manual_seed(0)
        result, trained = study_module.train(model, splits, recipe, "adam", lr, 1e-4, seed=0, max_epochs=4,
                                             progress=progress)
        return model, result, trained

    whole_model, whole, whole_trained = run(None)
    folder = tmp_path / "progress"
    evaluate, calls = study_module.evaluate, []

    def killed_during_epoch_three(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 4:  # the validation of epochs 0, 1 and 2 ran; the kill comes in epoch 3's
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(study_module, "evaluate", killed_during_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        run(folder)
    assert json.loads((folder / "progress.json").read_text())["epoch"] == 2
    monkeypatch.setattr(study_module, "evaluate", evaluate)
    other_lr = run(folder, lr=1e-3)[1]  # another run's progress is never taken, and is replaced
    assert "another run's progress" in capsys.readouterr().out
    assert other_lr.val_curve[0] == whole.val_curve[0] and not folder.exists()
    monkeypatch.setattr(study_module, "evaluate", killed_during_epoch_three)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(folder)
    calls.clear()
    monkeypatch.setattr(study_module, "evaluate", lambda *args, **kwargs: calls.append(args[2]) or evaluate(*args, **kwargs))
    resumed_model, resumed, resumed_trained = run(folder)
    assert calls == ["val", "val"] and "from the start" not in capsys.readouterr().out  # epochs 3 and 4 only
    for curve in ("val_curve", "train_curve", "lr_curve"):
        assert np.array_equal(getattr(resumed, curve), getattr(whole, curve), equal_nan=True), curve
    assert (resumed.best_epoch, resumed.epochs_run, resumed.best_trained_epoch) == (
        whole.best_epoch, whole.epochs_run, whole.best_trained_epoch)
    assert resumed.train_cpu_seconds > 0 and not folder.exists()
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
        assert torch.equal(resumed_trained[key], whole_trained[key]), key


def test_a_backbone_and_its_st_lora_arm_are_cached_and_start_from_the_backbone(study_module, tmp_path):
    unit = study_module.Unit
    units = [unit("arm", "stid", "chickenpox", 0, "1"), unit("arm", "stid", "chickenpox", 0, "2")]
    study = study_module.Study(tmp_path, units, max_epochs={"stid": 2},
                               fixed_settings={"st_lora": study_module.DEFAULT_ST_LORA, "lora_lr": 1e-3})
    assert not study.ready(units[1])
    first = study_module.run_unit(study, units[0])
    assert study.done(units[0]) and study.ready(units[1])
    checkpoint = load_file(study.checkpoint("stid", "chickenpox", 0))
    assert "scaler.future_loc" in checkpoint  # the backbone carries its scaling statistics
    arm = study_module.run_unit(study, units[1])
    assert arm["start_matches_backbone"]
    assert arm["best_val_mae"] <= first["best_val_mae"]
    assert arm["trainable_parameters"] == arm["added_parameters"] > 0
    assert json.loads(study.path(units[1]).read_text())["test"]["mae"] == arm["test"]["mae"]
    stored = np.load(study.path(units[1], ".npz"))
    # the stored per-window sums reproduce the test MAE
    assert stored["sums"][:, 0].sum() / stored["counts"][:, 0].sum() == pytest.approx(arm["test"]["mae"], rel=1e-5)

    # a (1) that stopped at a lower epoch cap than today's is run again, and so is every arm started from it
    higher_cap = study_module.Study(tmp_path, units, max_epochs={"stid": 3}, fixed_settings=study.fixed_settings)
    assert not first["stopped_early"] and not higher_cap.done(units[0])
    assert not higher_cap.ready(units[1])
    rerun = study_module.run_unit(higher_cap, units[0])
    assert higher_cap.done(units[0]) and not higher_cap.done(units[1])
    assert rerun["epochs_run"] == 3 and rerun["run_id"] != arm["backbone_run_id"] == first["run_id"]


def test_the_node_affine_arm_starts_as_the_backbone_and_costs_no_more_than_st_lora(study_module, tmp_path):
    splits = study_module.load_splits("chickenpox")
    backbone = study_module.build_backbone("stid", splits, seed=0)
    model = study_module.node_affine_model(backbone, splits)
    batch = next(iter(splits.iter_batches("val", 16)))
    assert torch.equal(study_module.predict(model, batch), study_module.predict(backbone.eval(), batch))
    assert not model.forecaster.training and model.train().forecaster.training is False  # frozen in every sense
    trainable = study_module.parameter_count(model, trainable_only=True)
    assert trainable == 2 * splits.horizon * splits.num_nodes * splits.out_channels
    st_lora = study_module.st_lora_model(backbone, splits, study_module.DEFAULT_ST_LORA, train_backbone=False)
    assert trainable <= study_module.parameter_count(st_lora, trainable_only=True)

    # the --quick study's (2N): a short real run from (1)'s best state
    unit = study_module.Unit
    units = [unit("arm", "stid", "chickenpox", 0, "1"), unit("arm", "stid", "chickenpox", 0, "2N")]
    quick = study_module.quick_study()
    study = study_module.Study(tmp_path, units, max_epochs={"stid": 2}, fixed_settings=quick.fixed_settings)
    first = study_module.run_unit(study, units[0])
    arm = study_module.run_unit(study, units[1])
    assert arm["start_matches_backbone"] and arm["best_val_mae"] <= first["best_val_mae"]
    assert arm["trainable_parameters"] == arm["added_parameters"] == trainable
    assert arm["settings"]["lr"] == quick.fixed_settings["cell_lr"]["2N"]
    assert arm["epochs_run"] == 2 and arm["val_curve"][1] != arm["val_curve"][0]  # training moved the forecast
    assert study.done(units[1])


def test_a_retrained_backbone_that_reproduces_its_record_keeps_its_arms(study_module, tmp_path):
    unit = study_module.Unit
    units = [unit("arm", "stgcn", "chickenpox", 0, "1"), unit("arm", "stgcn", "chickenpox", 0, "1b")]
    study = study_module.Study(tmp_path, units, max_epochs={"stgcn": 2})
    first = study_module.run_unit(study, units[0])
    study_module.run_unit(study, units[1])
    study.checkpoint("stgcn", "chickenpox", 0).unlink()
    study.units.append(unit("arm", "stgcn", "chickenpox", 0, "2"))  # a new run that needs the (1)
    assert not study.done(units[0])
    again = study_module.run_unit(study, units[0])
    assert again["run_id"] == first["run_id"] and len(again["checkpoint_restored"]) == 1
    assert study.done(units[0]) and study.done(units[1])


def test_a_cell_chooses_its_lr_on_validation_and_its_tuning_run_stands_for_seed_0(study_module, tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "CELL_TUNING", (("stgcn", "chickenpox"),))
    unit = study_module.Unit
    tunes = [unit("tune", "stgcn", "chickenpox", 0, "2N", i) for i in range(len(study_module.CELL_LRS))]
    study = study_module.Study(tmp_path, [unit("arm", "stgcn", "chickenpox", 0, "1"), *tunes],
                               max_epochs={"stgcn": 1}, fixed_settings={"st_lora": study_module.DEFAULT_ST_LORA})
    study_module.run_unit(study, study.units[0])
    records = [study_module.run_unit(study, tune) for tune in tunes]
    assert all("test" in record for record in records)  # tested, for the one validation will choose
    scores = [record["best_trained_val_mae"] for record in records]
    chosen = study.chosen_tune("stgcn", "chickenpox", "2N")
    assert chosen == tunes[int(np.argmin(scores))]
    cell = study_module.load_cells(study)[("stgcn", "chickenpox")]
    assert cell["2N"][0]["run"]["key"] == chosen.key and set(cell) == {"1", "2N"}
