"""ST-LoRA as a PEFT method: identity at init, adapters' life cycle, save/load, bad input, backbones."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch import nn

import st_peft
from _st_peft_import_hint import PeftTypeMapping
from st_peft.data import build_splits, load
from st_peft.outputs import ForecastOutput
from st_peft.tuners.st_lora import STLoraConfig, STLoraModel
from st_peft.tuners.st_lora.layer import NodeAdaptiveLayer

NODES, LENGTH, HORIZON = 5, 12, 12


class TinyForecaster(nn.Module):
    """A user's forecaster: per-node MLP over the history ``(B, L, N, 1) -> (B, H, N, 1)``."""

    def __init__(self, num_nodes: int = NODES) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.fc1 = nn.Linear(LENGTH, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, HORIZON)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.fc2(self.act(self.fc1(x[..., 0].transpose(1, 2))))
        return hidden.transpose(1, 2).unsqueeze(-1)


class ConvForecaster(nn.Module):
    """A user's forecaster with a convolution over ``(B, C, N, L)`` (time on the last axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=(1, 3), padding=(0, 1))
        self.head = nn.Linear(4 * LENGTH, HORIZON)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.conv(x.permute(0, 3, 2, 1))  # (B, 4, N, L)
        batch, channels, nodes, length = hidden.shape
        out = self.head(hidden.permute(0, 2, 1, 3).reshape(batch, nodes, channels * length))
        return out.transpose(1, 2).unsqueeze(-1)


def frozen_output(backbone: nn.Module, **inputs) -> torch.Tensor:
    """The backbone's output with its weights frozen, as they are under the adapter.

    torch picks its matmul kernel for batched inputs by whether the weight requires grad, so
    outputs are compared bit for bit only between weights in the same state.
    """
    backbone.requires_grad_(False)
    return backbone(**inputs)


def config(**overrides) -> STLoraConfig:
    return STLoraConfig(num_nodes=NODES, input_len=LENGTH, horizon=HORIZON, **overrides)


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move the trainable adapter weights away from their initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "stlora_" in name and parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))



@pytest.fixture()
def history() -> torch.Tensor:
    return torch.randn(3, LENGTH, NODES, 1, generator=torch.Generator().manual_seed(0))


def test_registered_as_peft_type():
    assert PeftType.STLORA == "STLORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.STLORA] is STLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.STLORA] is STLoraModel
    assert config().peft_type is PeftType.STLORA


@pytest.mark.parametrize(
    "overrides",
    [{}, {"target_modules": ["fc1", "fc2"]}, {"num_blocks": 2, "dropout": 0.1}, {"num_blocks": 0, "target_modules": ["fc1"]}],
)
def test_output_equals_backbone_exactly_at_init(history, overrides):
    torch.manual_seed(0)
    backbone = TinyForecaster()
    expected = frozen_output(backbone, x=history)
    model = get_peft_model(backbone, config(**overrides))
    model.train()  # dropout on the low-rank path must not matter while B is zero
    assert torch.equal(model(x=history), expected)


def test_adapter_changes_only_what_it_should_and_disable_restores_backbone(history):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, x=history)
    model = get_peft_model(backbone, config(target_modules=["fc1"]))
    perturb(model)
    adapted = model(x=history)
    assert adapted.shape == (3, HORIZON, NODES, 1)
    assert not torch.allclose(adapted, expected)
    with model.disable_adapter():
        assert torch.equal(model(x=history), expected)
    assert torch.equal(model(x=history), adapted)


def test_nall_matches_hand_computed_per_node_formula():
    torch.manual_seed(0)
    layer = NodeAdaptiveLayer(nn.Linear(6, 3), st_peft.tuners.st_lora.layer.NodeSelection(), "fc")
    layer.update_layer("default", config(r=2, alpha=4.0))
    perturb(layer)
    x = torch.randn(2, NODES, 6)  # nodes on axis -2
    out = layer(x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A = layer.stlora_A["default"].weight
    B = layer.stlora_B["default"].weight
    s = layer.stlora_node_scale["default"]
    for i in range(NODES):
        A_i = torch.diag(s[i]) @ A
        expected = x[:, i] @ W.T + b + (4.0 / 2) * x[:, i] @ (B @ A_i).T
        torch.testing.assert_close(out[:, i], expected)


def test_conv_nall_is_node_specific(history):
    backbone = ConvForecaster()
    model = get_peft_model(backbone, config(num_blocks=0, target_modules=["conv"], node_axis=2))
    perturb(model)
    before = model(x=history)
    with torch.no_grad():
        model.base_model.model.conv.stlora_node_scale["default"][0] += 1.0
    after = model(x=history)
    assert not torch.allclose(after[:, :, 0], before[:, :, 0])
    assert torch.equal(after[:, :, 1:], before[:, :, 1:])


def test_backbone_frozen_and_unchanged_by_training(history):
    backbone = TinyForecaster()
    original = copy.deepcopy(backbone.state_dict())
    model = get_peft_model(backbone, config(target_modules=["fc1"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("stlora_" in name for name in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = (model(x=history) - 1.0).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unloaded = model.unload()
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_train_backbone_makes_backbone_trainable_and_saves_it(tmp_path, history):
    backbone = TinyForecaster()
    model = get_peft_model(backbone, config(train_backbone=True))
    assert model.base_model.model.fc1.weight.requires_grad
    with torch.no_grad():
        model.base_model.model.fc2.bias.add_(1.0)
    perturb(model)
    expected = model(x=history)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(TinyForecaster(), tmp_path, is_trainable=True)
    assert torch.equal(reloaded(x=history), expected)


def test_print_trainable_parameters_counts_hand_computed(capsys):
    cfg = config(r=2, hidden_dim=8, node_embedding_dim=3, num_nall_layers=4, num_blocks=1)
    model = get_peft_model(TinyForecaster(), cfg)
    # node embedding 5*3; input 24->8; 4 NALLs of (8*8+8) + 8*2 + 2*8 + 3*2; output 8->12; gate 13->12
    predictor = 5 * 3 + (24 * 8 + 8) + 4 * (72 + 16 + 16 + 6) + (8 * 12 + 12) + (13 * 12 + 12)
    backbone = 12 * 16 + 16 + 16 * 12 + 12
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (predictor, predictor + backbone)
    model.print_trainable_parameters()
    assert f"trainable params: {predictor:,}" in capsys.readouterr().out


def test_save_and_load_reproduce_outputs_exactly(tmp_path, history):
    backbone = TinyForecaster()
    fresh, fresh_frozen = copy.deepcopy(backbone), copy.deepcopy(backbone)
    model = get_peft_model(backbone, config(target_modules=["fc1"], num_blocks=2))
    perturb(model)
    model.eval()
    expected = model(x=history)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "STLORA" and saved["num_nodes"] == NODES
    # is_trainable: the adapter's weights require grad, as in the saved model (see frozen_output)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert torch.equal(reloaded(x=history), expected)
    reloaded = PeftModel.from_pretrained(fresh_frozen, tmp_path)
    torch.testing.assert_close(reloaded(x=history), expected, rtol=0, atol=1e-6)


def test_named_adapters_each_own_predictor(tmp_path, history):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, x=history)
    fresh = copy.deepcopy(backbone)
    model = get_peft_model(backbone, config(), adapter_name="city_a")
    perturb(model, seed=1)
    out_a = model(x=history)
    model.add_adapter("city_b", config(target_modules=["fc2"]))
    assert torch.equal(model(x=history), out_a)  # adding does not activate
    model.set_adapter("city_b")
    assert torch.equal(model(x=history), expected)  # a new adapter starts at the backbone
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("city_b" in name for name in trainable)
    perturb(model, seed=2)
    out_b = model(x=history)
    assert not torch.allclose(out_a, out_b)
    with model.disable_adapter():
        assert torch.equal(model(x=history), expected)
    model.save_pretrained(tmp_path)

    # PEFT saves adapters not named "default" in sub-folders named after them
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "city_a", adapter_name="city_a", is_trainable=True)
    reloaded.load_adapter(tmp_path / "city_b", adapter_name="city_b", is_trainable=True)
    assert torch.equal(reloaded(x=history), out_a)
    reloaded.set_adapter("city_b")
    assert torch.equal(reloaded(x=history), out_b)

    model.set_adapter("city_a")
    model.delete_adapter("city_b")
    assert list(model.peft_config) == ["city_a"]
    assert not any("city_b" in name for name, _ in model.named_parameters())
    assert torch.equal(model(x=history), out_a)


def test_unload_returns_the_untouched_backbone(history):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, x=history)
    model = get_peft_model(backbone, config(target_modules=["fc1"]))
    perturb(model)
    unloaded = model.unload()
    assert type(unloaded.fc1) is nn.Linear
    assert not hasattr(unloaded, "st_lora_predictor")
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    assert torch.equal(unloaded(x=history), expected)


def test_merge_is_refused_with_reason():
    model = get_peft_model(TinyForecaster(), config(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="cannot be merged.*different s_i for every node"):
        model.merge_and_unload()


def test_scaling_penalty_is_returned_as_aux_loss(history):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, x=history)
    model = get_peft_model(backbone, config(target_modules=["fc1"], scaling_l2=0.5))
    output = model(x=history)
    assert isinstance(output, ForecastOutput)
    assert torch.equal(output.prediction, expected) and output.aux_loss.item() == 0.0
    perturb(model)
    penalty = model(x=history).aux_loss
    layer = model.base_model.model.fc1
    head = model.base_model.model.st_lora_predictor.stlora_heads["default"]
    by_hand = (layer.stlora_node_scale["default"] - 1).pow(2).sum()
    for nall in head.blocks[0].layers:
        by_hand = by_hand + (head.node_embedding @ nall.generator).pow(2).sum()
    torch.testing.assert_close(penalty, 0.5 * by_hand)


class QuantileForecaster(TinyForecaster):
    """A forecaster returning a ``ForecastOutput`` with quantiles ``(B, H, N, 1, 3)`` and its own loss."""

    def forward(self, x: torch.Tensor, **kwargs) -> ForecastOutput:
        median = super().forward(x)
        spread = torch.tensor([-1.0, 0.0, 1.0])
        return ForecastOutput(prediction=median, quantiles=median.unsqueeze(-1) + spread, loss=median.sum())


def test_forecast_output_prediction_and_quantiles_are_refined_together(history):
    backbone = QuantileForecaster()
    expected = frozen_output(backbone, x=history)
    model = get_peft_model(backbone, config())
    perturb(model)
    output = model(x=history)
    shift = output.prediction - expected.prediction
    assert shift.abs().max() > 0
    torch.testing.assert_close(output.quantiles, expected.quantiles + shift.unsqueeze(-1))
    assert output.loss is None  # the forecaster's own loss described the unrefined prediction


def test_node_index_selects_rows_of_the_node_factors(history):
    model = get_peft_model(TinyForecaster(), config(target_modules=["fc1"]))
    perturb(model)
    index = torch.tensor([3, 1])
    full = model(x=history)
    subset = model(x=history[:, :, index], node_index=index)
    torch.testing.assert_close(subset, full[:, :, index])


def test_num_nodes_differs_from_data(history):
    model = get_peft_model(TinyForecaster(num_nodes=NODES), config())
    wrong = torch.randn(2, LENGTH, NODES + 1, 1)
    with pytest.raises(ValueError, match=rf"num_nodes={NODES} but the batch has {NODES + 1} nodes"):
        model(x=wrong)


def test_num_nodes_differs_from_backbone():
    with pytest.raises(ValueError, match=r"num_nodes=7 but the forecaster TinyForecaster has num_nodes=5"):
        get_peft_model(TinyForecaster(), STLoraConfig(num_nodes=7))


def test_num_nodes_differs_from_saved_adapter(tmp_path):
    get_peft_model(TinyForecaster(), config()).save_pretrained(tmp_path)
    other = STLoraConfig(num_nodes=6, input_len=LENGTH, horizon=HORIZON)
    with pytest.raises(ValueError, match=r"trained on 5 nodes .* num_nodes=6"):
        PeftModel.from_pretrained(TinyForecaster(num_nodes=6), tmp_path, config=other)


def test_unknown_target_module_is_named():
    with pytest.raises(ValueError, match="target_modules entry 'fc9' matches no module of TinyForecaster"):
        get_peft_model(TinyForecaster(), config(target_modules=["fc1", "fc9"]))


def test_layer_type_nall_cannot_wrap_is_named():
    with pytest.raises(TypeError, match="cannot wrap target module 'act' of type ReLU"):
        get_peft_model(TinyForecaster(), config(target_modules=["act"]))
    with pytest.raises(TypeError, match="'conv'.*node_axis=1"):
        get_peft_model(ConvForecaster(), config(target_modules=["conv"], node_axis=1))


LOAD_WITHOUT_IMPORT = """
import sys, torch
from peft import PeftModel
try:
    PeftModel.from_pretrained(torch.nn.Linear(2, 2), sys.argv[1])
except KeyError as error:
    print("KeyError:", error.args[0])
print("st_peft imported:", "st_peft" in sys.modules)
"""


def test_loading_without_import_st_peft_says_to_import_it(tmp_path):
    """A fresh interpreter that never imports st_peft gets a KeyError that names the fix.

    The installed start-up hook (``_st_peft_import_hint``) gives PEFT's type mapping that message;
    it registers nothing, so st_peft stays unimported.
    """
    get_peft_model(TinyForecaster(), config()).save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "KeyError: PEFT type 'STLORA' is an st-peft method and is not registered: run `import st_peft`" in (
        result.stdout
    )
    assert "st_peft imported: False" in result.stdout


@pytest.mark.parametrize("name", ["STLORA", "FACTOST"])
def test_peft_type_mapping_names_st_peft_only_for_its_own_types(name):
    mapping = PeftTypeMapping({"LORA": object})
    with pytest.raises(KeyError, match=f"PEFT type '{name}' is an st-peft method.*import st_peft"):
        mapping[name]
    with pytest.raises(KeyError) as error:
        mapping["NOT_A_METHOD"]
    assert error.value.args == ("NOT_A_METHOD",)
    assert mapping["LORA"] is object


def test_peft_type_mapping_is_the_one_peft_uses():
    assert type(PEFT_TYPE_TO_CONFIG_MAPPING) is PeftTypeMapping
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.STLORA] is STLoraConfig


@pytest.fixture(scope="module")
def chickenpox():
    splits = build_splits(load("chickenpox"), input_len=LENGTH, horizon=HORIZON)
    batch = next(splits.iter_batches("val", batch_size=4))
    return splits, batch


def make_backbone(name: str, splits) -> nn.Module:
    from st_peft.backbones import BACKBONES

    sizes = {
        "num_nodes": splits.num_nodes,
        "input_len": LENGTH,
        "horizon": HORIZON,
        "in_channels": splits.in_channels,
        "out_channels": splits.out_channels,
    }
    if name == "stid":
        return BACKBONES[name](**sizes, steps_per_day=splits.steps_per_day, embed_dim=8, node_dim=8, tod_dim=8, dow_dim=8)
    if name == "gwnet":
        return BACKBONES[name](**sizes, adjacency=splits.adjacency, residual_channels=8, dilation_channels=8,
                               skip_channels=16, end_channels=16)
    return BACKBONES[name](**sizes, adjacency=splits.adjacency, block_channels=(8, 4, 8))


def train_two_steps(model: nn.Module, splits, batch: dict, inputs: dict) -> None:
    """Two Adam steps of the trainable parameters on the masked MAE of one real batch."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = (splits.scaler.inverse_transform(model(**inputs)) - batch["y"]).abs()[batch["y_mask"]].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("name", "targets", "node_axis"),
    [("stid", ["fc1"], -2), ("gwnet", ["filter_conv"], -2), ("stgcn", ["theta"], 1)],
)
def test_backbones_identity_training_and_round_trip(tmp_path, chickenpox, name, targets, node_axis):
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone(name, splits).eval()
    fresh = copy.deepcopy(backbone)
    inputs = {key: batch[key] for key in ("x", "x_time", "y_time")}
    expected = frozen_output(backbone, **inputs)
    cfg = STLoraConfig(
        num_nodes=splits.num_nodes, input_len=LENGTH, horizon=HORIZON, target_modules=targets, node_axis=node_axis
    )
    model = get_peft_model(backbone, cfg).eval()
    assert torch.equal(model(**inputs), expected)
    train_two_steps(model, splits, batch, inputs)
    adapted = model(**inputs)
    assert not torch.equal(adapted, expected)
    model.save_pretrained(tmp_path)
    assert torch.equal(PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True).eval()(**inputs), adapted)


def test_frozen_backbone_keeps_eval_behaviour_while_the_adapter_trains(chickenpox):
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone("gwnet", splits)  # dropout and batch norm: both depend on the mode
    inputs = {key: batch[key] for key in ("x", "x_time", "y_time")}
    expected = frozen_output(copy.deepcopy(backbone).eval(), **inputs)
    statistics = {key: value.clone() for key, value in backbone.state_dict().items() if "running" in key}
    model = get_peft_model(backbone, STLoraConfig(num_nodes=splits.num_nodes, input_len=LENGTH, horizon=HORIZON,
                                                  dropout=0.5))
    model.train()
    assert torch.equal(model(**inputs), expected)  # the zero-initialised correction, on the eval-mode backbone
    heads = model.base_model.model.st_lora_predictor.stlora_heads["default"]
    assert all(module.training for module in heads.modules())
    assert not any(module.training for module in backbone.layers.modules())
    train_two_steps(model, splits, batch, inputs)
    for key, value in statistics.items():
        assert torch.equal(backbone.state_dict()[key], value), key
    with model.disable_adapter():
        assert torch.equal(model(**inputs), expected)
    assert model.unload().training and all(module.training for module in backbone.modules())


def test_modules_to_save_copies_train_while_the_frozen_forecaster_stays_in_eval_mode():
    class DropoutHead(TinyForecaster):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Sequential(nn.Linear(16, HORIZON), nn.Dropout(0.5))

    model = get_peft_model(DropoutHead(), config(modules_to_save=["fc2"]))
    model.train()
    wrapper = model.base_model.model.fc2
    assert all(module.training for module in wrapper.modules_to_save["default"].modules())
    assert not any(module.training for module in wrapper.original_module.modules())
    assert not model.base_model.model.fc1.training


def test_backbone_trained_along_is_in_training_mode(chickenpox):
    splits, _ = chickenpox
    model = get_peft_model(make_backbone("gwnet", splits), STLoraConfig(
        num_nodes=splits.num_nodes, input_len=LENGTH, horizon=HORIZON, train_backbone=True))
    model.train()
    assert all(module.training for module in model.base_model.model.modules())
    model.eval()
    assert not any(module.training for module in model.base_model.model.modules())


def test_trains_with_sttrainer(tmp_path, chickenpox):
    from st_peft.training import STTrainer, st_training_args

    splits, _ = chickenpox
    backbone = make_backbone("stid", splits)
    frozen = copy.deepcopy(backbone.state_dict())
    model = get_peft_model(backbone, STLoraConfig(num_nodes=splits.num_nodes, input_len=LENGTH, horizon=HORIZON))
    args = st_training_args(str(tmp_path), epochs=1, batch_size=32, save_strategy="no", load_best_model_at_end=False,
                            disable_tqdm=True)
    trainer = STTrainer(model, args, train_dataset=splits.train, eval_dataset=splits.val,
                        data_collator=splits.collator, scaler=splits.scaler)
    trainer.train()
    metrics = trainer.evaluate_test(splits.test)
    assert np.isfinite(metrics["mae"])
    for key, value in model.unload().state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_cli_trains_st_lora(tmp_path):
    from st_peft.cli import main

    output = tmp_path / "run"
    main(["train", "--dataset", "chickenpox", "--model", "stid", "--model-args", "{embed_dim: 8, num_layers: 1}",
          "--adapter", "st_lora", "--adapter-args", "{r: 2, target_modules: [regression]}", "--epochs", "1",
          "--output-dir", str(output)])
    saved = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["num_nodes"], saved["target_modules"]) == (
        "STLORA", 2, 20, ["regression"]
    )
    assert np.isfinite(json.loads((output / "metrics.json").read_text())["mae"])
