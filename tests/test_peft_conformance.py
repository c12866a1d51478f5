"""The checks peft runs on its own methods, run on st-peft's tuners, with peft's LoRA as the control.

Modelled on peft's ``PeftCommonTester`` (``tests/testing_common.py``) and its custom-model tests
(``tests/test_custom_models.py``): one matrix of cases, every tuner on every backbone it adapts
(STLORA on STID, GWNet, STGCN and a user's module; FACTOST on FactoSTModel), each with a LoRA
row on the same backbone. Every check is a test parametrised over the rows it applies to:

- dtypes: forward in float32, bfloat16, float16 and float64, with the model cast after wrapping
  and before; ``torch.autocast("cpu", dtype=torch.bfloat16)``; a training step in each dtype;
- meta-device loading (``low_cpu_mem_usage=True``) through ``get_peft_model``,
  ``inject_adapter_in_model``, ``PeftModel.from_pretrained`` and ``load_adapter``;
- peft's config options: ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``,
  ``init_weights``, ``modules_to_save``, tuner layers' ``in_features`` / ``out_features``, and
  options that cannot apply refused with a reason;
- no inert targets: every adapter weight gets a gradient;
- safe loading: nothing outside the adapter is written, NaN and unknown keys are refused;
- the life cycle: save/load exact in both serialisations, ``is_trainable``, several adapters,
  disable, delete, unload, merge, state-dict helpers, ``torch.compile``, deepcopy, pickle.

The models are tiny and the data is two windows of the built-in chickenpox data set.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

import st_peft.hub
from st_peft import loading_backbone_weights
from st_peft.backbones import BACKBONES
from st_peft.data import build_splits, load
from st_peft.forecasting import forecast_loss
from st_peft.losses import masked_mae
from st_peft.models.factost import FactoSTConfig, FactoSTModel
from st_peft.outputs import ForecastOutput
from st_peft.tuners.factost import FactoSTAdapterConfig
from st_peft.tuners.st_lora import STLoraConfig
from st_peft.tuners.st_lora.seamed import SeamedForecaster

LENGTH = HORIZON = 12


@pytest.fixture(scope="module")
def data():
    """Splits of chickenpox (20 counties, weekly) and a validation batch of two windows."""
    splits = build_splits(load("chickenpox"), input_len=LENGTH, horizon=HORIZON)
    return splits, next(splits.iter_batches("val", batch_size=2))


# the backbones ---------------------------------------------------------------------------------------------


class UsersForecaster(nn.Module):
    """A user's forecaster: two per-node layers over the history, in a numbered list.

    ``(B, L, N, 1) -> (B, H, N, 1)``; it computes in its weights' dtype and returns that dtype.
    """

    def __init__(self, num_nodes: int) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(width_in, width_out)}) for width_in, width_out in ((LENGTH, 16), (16, 16))
        )
        self.head = nn.Linear(16, HORIZON)

    def forward(self, past_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden = past_values[..., 0].transpose(1, 2).to(self.head.weight.dtype)
        for layer in self.layers:
            hidden = torch.relu(layer["fc"](hidden))
        return self.head(hidden).transpose(1, 2).unsqueeze(-1)


def build_backbone(name: str, splits) -> nn.Module:
    """A tiny backbone for ``splits`` (seeded, in evaluation mode)."""
    torch.manual_seed(0)
    kwargs = splits.model_kwargs()
    if name == "stid":
        model = BACKBONES["stid"](**kwargs, steps_per_day=splits.steps_per_day, embed_dim=8, node_dim=8, tod_dim=4,
                                  dow_dim=4, num_layers=2, dropout=0.0)
    elif name == "gwnet":
        model = BACKBONES["gwnet"](**kwargs, adjacency=splits.adjacency, residual_channels=4, dilation_channels=4,
                                   skip_channels=8, end_channels=8, dropout=0.0)
    elif name == "stgcn":
        model = BACKBONES["stgcn"](**kwargs, adjacency=splits.adjacency, block_channels=(4, 4, 4))
    elif name == "user":
        # a user's module takes the documented wrapper, which gives it the output seam ST-LoRA needs
        model = SeamedForecaster(UsersForecaster(splits.num_nodes))
    else:
        model = FactoSTModel(FactoSTConfig(patch_length=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=16, max_context_length=12, max_horizon=12, dropout=0.0,
                                           num_domain_prompts=4, prompt_top_k=2))
    return model.eval()


@dataclass(frozen=True)
class BackboneLayout:
    """What a backbone offers the options.

    Attributes:
        repeated: the name of a layer found in each of its numbered layers (the target).
        layers_pattern: the name of the numbered layer list.
        first, second: that layer in the first and second numbered layer.
        saved: a module to train as ``modules_to_save``.
        node_axis: the node axis of the target's input, for ST-LoRA.
    """

    repeated: str
    layers_pattern: str
    first: str
    second: str
    saved: str
    node_axis: int = -2


# GWNet's target is skip_conv: peft 0.21's LoRA copies a convolution's kernel, stride and padding but not its
# dilation, so on the dilated filter_conv the control row fails with a shape mismatch (ST-LoRA's NALL works there)
LAYOUTS = {
    "stid": BackboneLayout("fc1", "encoder", "encoder.0.fc1", "encoder.1.fc1", "regression"),
    "gwnet": BackboneLayout("skip_conv", "layers", "layers.0.skip_conv", "layers.1.skip_conv", "end_conv_2"),
    "stgcn": BackboneLayout("theta", "blocks", "blocks.0.graph_conv.theta", "blocks.1.graph_conv.theta",
                            "output.fc", node_axis=1),
    "user": BackboneLayout("fc", "layers", "forecaster.layers.0.fc", "forecaster.layers.1.fc", "forecaster.head"),
    "factost": BackboneLayout("qkv", "layers", "layers.0.attention.qkv", "layers.1.attention.qkv", "head"),
}


@dataclass(frozen=True)
class Case:
    """A row of the matrix: a tuner on a backbone."""

    tuner: str
    backbone: str

    @property
    def id(self) -> str:
        return f"{self.tuner}-{self.backbone}"

    @property
    def layout(self) -> BackboneLayout:
        return LAYOUTS[self.backbone]

    @property
    def prefix(self) -> str:
        return {"STLORA": "stl_", "FACTOST": "factost_", "LORA": "lora_"}[self.tuner]

    def config(self, splits, **options: Any):
        """The case's adapter config; ``init_weights=False`` (a non-identity adapter) unless ``options`` say."""
        options.setdefault("init_weights", False)
        if self.tuner == "LORA":
            options["init_lora_weights"] = options.pop("init_weights")
            options.setdefault("target_modules", [self.layout.repeated])
            return LoraConfig(r=2, lora_alpha=4, **options)
        if self.tuner == "FACTOST":
            return FactoSTAdapterConfig(**splits.size_kwargs(), steps_per_day=splits.steps_per_day,
                                        node_embedding_dim=4, calendar_embedding_dim=4, filter_rank=4,
                                        num_prompt_tokens=2, prompt_rank=2, **options)
        options.setdefault("target_modules", [self.layout.repeated])
        return STLoraConfig(**splits.size_kwargs(), r=2, hidden_dim=8, node_embedding_dim=2, num_nall_layers=1,
                            node_axis=self.layout.node_axis, **options)

    def wrap(self, splits, backbone: nn.Module | None = None, seed: int = 1, **options: Any) -> PeftModel:
        backbone = build_backbone(self.backbone, splits) if backbone is None else backbone
        torch.manual_seed(seed)
        return get_peft_model(backbone, self.config(splits, **options))


ST_PEFT_CASES = [Case("STLORA", name) for name in ("stid", "gwnet", "stgcn", "user")] + [Case("FACTOST", "factost")]
CONTROL_CASES = [Case("LORA", case.backbone) for case in ST_PEFT_CASES]
CASES = ST_PEFT_CASES + CONTROL_CASES


def cases(rows: list[Case]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", rows, ids=[row.id for row in rows])


# helpers ---------------------------------------------------------------------------------------------------


def prediction_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.prediction_outputs


def loss_of(output: Any, batch: dict) -> torch.Tensor:
    """The model's loss, or the masked MAE of a user's module that returns a bare forecast."""
    if isinstance(output, ForecastOutput) and output.loss is not None:
        return output.loss
    return forecast_loss(prediction_of(output).float(), batch["future_values"], batch["future_observed_mask"],
                         masked_mae, model="test")


def predict(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return prediction_of(model(**batch))


def adapter_parameters(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {name: parameter for name, parameter in model.named_parameters() if prefix in name}


def backbone_weights(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The frozen backbone's weights (not the adapters', not the trained copies of modules_to_save).

    Buffers are left out, as in peft's own check: LoRA trains with the backbone in training mode,
    so batch-norm statistics move.
    """
    return {name: value.detach().clone() for name, value in model.named_parameters()
            if prefix not in name and ".modules_to_save." not in name}


def training_step(model: nn.Module, batch: dict, prefix: str) -> None:
    """One SGD step of everything that trains (a large one, so that it moves bfloat16 weights); every adapter
    weight must train and get a finite gradient."""
    model.train()
    loss = loss_of(model(**batch), batch)
    assert torch.isfinite(loss)
    loss.backward()
    adapter = adapter_parameters(model, prefix)
    assert adapter and all(p.requires_grad for p in adapter.values())
    for name, parameter in adapter.items():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), name
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
    model.eval()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the last bits: torch picks a batched matmul's kernel by whether the weight requires grad."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.05}
"""Largest error against the float32 forecast allowed, relative to the forecast's spread."""


def assert_close_to(reference: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all()
    error = (actual.double() - reference.double()).abs().max()
    assert error <= TOLERANCE[dtype] * reference.double().std() + 1e-6, (dtype, float(error))


def adapter_dtypes(model: nn.Module, prefix: str) -> set[torch.dtype]:
    return {parameter.dtype for parameter in adapter_parameters(model, prefix).values()}


# dtypes ----------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@cases(CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["wrap-then-cast", "cast-then-wrap"])
def test_forward_in_every_dtype(data, case, dtype, order):
    splits, batch = data
    reference = predict(case.wrap(splits), batch)
    if order == "wrap-then-cast":
        model = case.wrap(splits).to(dtype)
        expected = {dtype}
    else:
        model = case.wrap(splits, backbone=build_backbone(case.backbone, splits).to(dtype))
        # peft's autocast_adapter_dtype: adapters on float16 / bfloat16 layers are kept in float32
        expected = {torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype}
    assert adapter_dtypes(model, case.prefix) == expected
    assert_close_to(reference, predict(model, batch), dtype)


def adapter_dtypes_of(model: nn.Module, prefix: str, adapter_name: str) -> set[torch.dtype]:
    return {parameter.dtype for name, parameter in adapter_parameters(model, prefix).items()
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}")}


@cases(CASES)
def test_adapter_keeps_the_layers_dtype_without_autocast_adapter_dtype(data, case, tmp_path):
    """peft's rule for get_peft_model, add_adapter and load_adapter alike."""
    splits, batch = data
    backbone = build_backbone(case.backbone, splits).to(torch.bfloat16)
    torch.manual_seed(1)
    model = get_peft_model(backbone, case.config(splits), autocast_adapter_dtype=False)
    assert adapter_dtypes_of(model, case.prefix, "default") == {torch.bfloat16}
    assert torch.isfinite(predict(model, batch)).all()
    model.add_adapter("added", case.config(splits), autocast_adapter_dtype=False)
    assert adapter_dtypes_of(model, case.prefix, "added") == {torch.bfloat16}
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    model.load_adapter(tmp_path, adapter_name="loaded", autocast_adapter_dtype=False)
    assert adapter_dtypes_of(model, case.prefix, "loaded") == {torch.bfloat16}
    model.load_adapter(tmp_path, adapter_name="upcast")
    assert adapter_dtypes_of(model, case.prefix, "upcast") == {torch.float32}


@cases(CASES)
def test_autocast_bfloat16_forward_and_training_step(data, case):
    splits, batch = data
    model = case.wrap(splits)
    reference = predict(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close_to(reference, predict(model, batch), torch.bfloat16)
        training_step(model, batch, case.prefix)
    assert adapter_dtypes(model, case.prefix) == {torch.float32}


@cases(CASES)
@pytest.mark.parametrize(("dtype", "order"), [(torch.float32, "wrap"), (torch.bfloat16, "wrap-then-cast"),
                                              (torch.bfloat16, "cast-then-wrap"), (torch.float64, "wrap-then-cast"),
                                              (torch.float64, "cast-then-wrap")], ids=str)
def test_training_step_in_every_dtype(data, case, dtype, order):
    splits, batch = data
    if order == "cast-then-wrap":
        model = case.wrap(splits, backbone=build_backbone(case.backbone, splits).to(dtype))
    else:
        model = case.wrap(splits).to(dtype)
    frozen = backbone_weights(model, case.prefix)
    before = {name: p.detach().clone() for name, p in adapter_parameters(model, case.prefix).items()}
    training_step(model, batch, case.prefix)
    after = adapter_parameters(model, case.prefix)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    for name, value in backbone_weights(model, case.prefix).items():
        assert torch.equal(value, frozen[name]), name


# meta-device loading ---------------------------------------------------------------------------------------


def devices(model: nn.Module) -> set[str]:
    return {parameter.device.type for parameter in model.parameters()}


@cases(CASES)
def test_low_cpu_mem_usage_from_pretrained_and_load_adapter(data, case, tmp_path):
    splits, batch = data
    model = case.wrap(splits)
    expected = predict(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_backbone(case.backbone, splits), tmp_path, low_cpu_mem_usage=True)
    assert devices(loaded) == {"cpu"}
    assert_same(predict(loaded, batch), expected)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert devices(loaded) == {"cpu"}
    loaded.set_adapter("other")
    assert_same(predict(loaded, batch), expected)


@cases(CASES)
@pytest.mark.parametrize("entry", ["get_peft_model", "inject_adapter_in_model"])
def test_low_cpu_mem_usage_creates_the_adapter_on_the_meta_device(data, case, entry):
    splits, batch = data
    trained = case.wrap(splits)
    expected = predict(trained, batch)
    state = get_peft_model_state_dict(trained)
    backbone = build_backbone(case.backbone, splits)
    if entry == "get_peft_model":
        model = get_peft_model(backbone, case.config(splits), low_cpu_mem_usage=True)
    else:
        model = inject_adapter_in_model(case.config(splits), backbone, low_cpu_mem_usage=True)
    meta = {name for name, parameter in model.named_parameters() if parameter.device.type == "meta"}
    assert meta and all(case.prefix in name for name in meta)
    result = set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert not result.unexpected_keys
    assert devices(model) == {"cpu"}
    assert_same(predict(model, batch), expected)


# peft's config options -------------------------------------------------------------------------------------


def repeated_layers(case: Case, splits) -> set[str]:
    """The backbone's layers named like ``case.layout.repeated``."""
    backbone = build_backbone(case.backbone, splits)
    return {name for name, _ in backbone.named_modules() if name.split(".")[-1] == case.layout.repeated}


def wrapped(model: PeftModel, names: set[str]) -> set[str]:
    """Those of the backbone's modules ``names`` that are tuner layers now."""
    backbone = model.get_base_model()
    return {name for name in names if isinstance(backbone.get_submodule(name), BaseTunerLayer)}


# FACTOST adapts the single token hook of a FactoSTModel: the layer options leave it nothing to adapt
LAYERED_CASES = [case for case in CASES if case.tuner != "FACTOST"]


@cases(LAYERED_CASES)
def test_exclude_modules_leaves_the_excluded_layer_alone(data, case):
    splits, batch = data
    everything = repeated_layers(case, splits)
    model = case.wrap(splits, exclude_modules=[case.layout.first])
    assert wrapped(model, everything) == everything - {case.layout.first}
    assert torch.isfinite(predict(model, batch)).all()


@cases(LAYERED_CASES)
def test_layers_to_transform_picks_layers_by_index(data, case):
    splits, batch = data
    model = case.wrap(splits, layers_to_transform=[1], layers_pattern=case.layout.layers_pattern)
    assert wrapped(model, repeated_layers(case, splits)) == {case.layout.second}
    assert torch.isfinite(predict(model, batch)).all()


@cases(ST_PEFT_CASES)
@pytest.mark.parametrize(
    ("options", "reason"),
    [({"target_parameters": ["head.weight"]}, "wraps modules, not bare parameters"),
     ({"task_type": "CAUSAL_LM"}, "task_type='CAUSAL_LM' would make get_peft_model wrap"),
     ({"layers_pattern": "layers"}, "needs layers_to_transform too"),
     ({"target_modules": ".*x", "layers_to_transform": [0]}, "write the layer numbers into the regex")],
    ids=["target_parameters", "task_type", "layers_pattern-alone", "layers-with-regex"],
)
def test_options_that_cannot_apply_are_refused_with_the_reason(data, case, options, reason):
    splits, _ = data
    with pytest.raises(ValueError, match=reason):
        case.config(splits, **options)


def test_factost_layer_options_leave_nothing_to_adapt_and_are_refused(data):
    splits, _ = data
    case = Case("FACTOST", "factost")
    with pytest.raises(ValueError, match="No modules were targeted for adaptation"):
        case.wrap(splits, exclude_modules=["token_hook"])
    # peft's own matching would adapt the hook whatever the index, as it does for LoRA on a module named in full
    with pytest.raises(ValueError, match=r"target_modules names \['token_hook'\] in full"):
        case.wrap(splits, layers_to_transform=[0], layers_pattern="layers")


def test_st_lora_layer_options_need_target_modules(data):
    splits, _ = data
    with pytest.raises(ValueError, match="without target_modules only the predictor is added"):
        STLoraConfig(**splits.size_kwargs(), exclude_modules=["fc1"])
    with pytest.raises(ValueError, match="leave none of them to wrap"):
        Case("STLORA", "stid").wrap(splits, exclude_modules=["fc1"])


@cases(CASES)
def test_init_weights_true_is_the_backbone_and_false_is_not(data, case):
    splits, batch = data
    backbone = build_backbone(case.backbone, splits)
    expected = predict(backbone, batch)
    identity = case.wrap(splits, init_weights=True)
    torch.testing.assert_close(predict(identity, batch), expected, rtol=1e-5, atol=1e-5)
    changed = case.wrap(splits, init_weights=False)
    assert not torch.allclose(predict(changed, batch), expected)


@cases(CASES)
def test_modules_to_save_trains_a_copy_and_saves_it(data, case, tmp_path):
    splits, batch = data
    saved = case.layout.saved
    model = case.wrap(splits, modules_to_save=[saved])
    original = {name: value.clone() for name, value in model.get_base_model().get_submodule(saved)
                .original_module.state_dict().items()}
    copy_weights = model.get_base_model().get_submodule(saved).modules_to_save["default"]
    assert all(p.requires_grad for p in copy_weights.parameters())
    before = [p.detach().clone() for p in copy_weights.parameters()]
    training_step(model, batch, case.prefix)
    assert any(not torch.equal(a, b) for a, b in zip(before, copy_weights.parameters(), strict=True))
    for name, value in model.get_base_model().get_submodule(saved).original_module.state_dict().items():
        assert torch.equal(value, original[name]), name
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_backbone(case.backbone, splits), tmp_path)
    reloaded = loaded.get_base_model().get_submodule(saved).modules_to_save["default"].state_dict()
    for name, value in copy_weights.state_dict().items():
        assert torch.equal(reloaded[name], value), name


@cases(CASES)
def test_tuner_layers_expose_in_and_out_features(data, case):
    splits, _ = data
    model = case.wrap(splits)
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert layers
    for layer in layers:
        assert isinstance(layer.in_features, int) and layer.in_features > 0
        assert isinstance(layer.out_features, int) and layer.out_features > 0


# no inert targets ------------------------------------------------------------------------------------------


@cases(CASES)
def test_every_adapter_weight_gets_a_gradient(data, case):
    """A target the backbone reads around (STGCN's theta used to be one) would get none."""
    splits, batch = data
    model = case.wrap(splits)
    model.train()
    loss_of(model(**batch), batch).backward()
    for name, parameter in adapter_parameters(model, case.prefix).items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


class ReadsItsWeight(nn.Module):
    """A user's module whose forward reads ``fc.weight`` instead of calling ``fc``."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.fc = nn.Linear(LENGTH, HORIZON)
        self.head = nn.Linear(HORIZON, HORIZON)

    def forward(self, past_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden = torch.nn.functional.linear(past_values[..., 0].transpose(1, 2), self.fc.weight, self.fc.bias)
        return self.head(hidden).transpose(1, 2).unsqueeze(-1)


def test_st_lora_refuses_a_wrapped_layer_that_is_never_called(data):
    splits, batch = data
    model = get_peft_model(SeamedForecaster(ReadsItsWeight(splits.num_nodes)), STLoraConfig(**splits.size_kwargs(),
                                                                          target_modules=["fc", "head"]))
    with pytest.raises(RuntimeError, match=r"wrapped \['forecaster.fc'\] of SeamedForecaster, but its forward never called it"):
        model(**batch)
    with model.disable_adapter():  # the forecaster alone is fine
        model(**batch)
    # LoRA, the control, wraps it too and stays silently inert
    lora = get_peft_model(SeamedForecaster(ReadsItsWeight(splits.num_nodes)),
                          LoraConfig(target_modules=["fc", "head"], init_lora_weights=False))
    loss_of(lora(**batch), batch).backward()
    assert all(p.grad is None for name, p in lora.named_parameters() if "fc.lora_" in name)


def test_st_lora_checks_the_layers_of_an_adapter_made_active_later(data):
    splits, batch = data
    model = get_peft_model(SeamedForecaster(ReadsItsWeight(splits.num_nodes)), STLoraConfig(**splits.size_kwargs(),
                                                                          target_modules=["head"]))
    model(**batch)
    model.add_adapter("reads", STLoraConfig(**splits.size_kwargs(), target_modules=["fc"]))
    model(**batch)  # "reads" is not active yet
    model.set_adapter("reads")
    with pytest.raises(RuntimeError, match=r"\['forecaster.fc'\]"):
        model(**batch)


# safe loading ----------------------------------------------------------------------------------------------


def saved_adapter(case: Case, splits, folder: Path, **options: Any) -> Path:
    case.wrap(splits, **options).save_pretrained(folder)
    return folder / "adapter_model.safetensors"


def loaders(case: Case, splits, folder: Path) -> dict[str, Callable[[], Any]]:
    """The three ways to load an adapter from ``folder``: PEFT's two and the Hub helper's."""

    def onto_a_peft_model():
        model = case.wrap(splits, init_weights=True)
        return model.load_adapter(folder, adapter_name="loaded")

    return {
        "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(build_backbone(case.backbone, splits), folder),
        "PeftModel.load_adapter": onto_a_peft_model,
        "st_peft.hub.load_adapter": lambda: st_peft.hub.load_adapter(build_backbone(case.backbone, splits),
                                                                     str(folder)),
    }


@cases(ST_PEFT_CASES)
def test_backbone_weight_in_an_adapter_is_refused_by_name(data, case, tmp_path):
    splits, _ = data
    path = saved_adapter(case, splits, tmp_path)
    tensors = load_file(path)
    key = f"base_model.model.{case.layout.saved}.weight"
    tensors[key] = torch.full_like(build_backbone(case.backbone, splits).get_submodule(case.layout.saved).weight, 1e6)
    save_file(tensors, path)
    for way, load_it in loaders(case, splits, tmp_path).items():
        with pytest.raises(ValueError, match=rf"weights of the forecaster itself, \['{key}'\].*train_backbone=False"):
            load_it()
        assert way


@cases(ST_PEFT_CASES)
def test_non_finite_adapter_tensor_is_refused_by_name(data, case, tmp_path):
    splits, _ = data
    path = saved_adapter(case, splits, tmp_path)
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path)
    for load_it in loaders(case, splits, tmp_path).values():
        with pytest.raises(ValueError, match=rf"NaN or infinite values in \['{key}'\]"):
            load_it()


@cases(ST_PEFT_CASES)
def test_unknown_key_in_an_adapter_is_refused_by_name(data, case, tmp_path):
    splits, _ = data
    path = saved_adapter(case, splits, tmp_path)
    tensors = load_file(path)
    tensors["base_model.model.not_a_module.weight"] = torch.ones(3)
    save_file(tensors, path)
    for load_it in loaders(case, splits, tmp_path).values():
        with pytest.raises(ValueError, match=r"holds \['base_model.model.not_a_module.weight'\], which are neither"):
            load_it()


def test_adapter_that_trains_the_backbone_brings_it_along(data, tmp_path):
    splits, batch = data
    case = Case("STLORA", "stid")
    model = case.wrap(splits, train_backbone=True)
    training_step(model, batch, case.prefix)
    expected = predict(model, batch)
    model.save_pretrained(tmp_path)
    assert f"base_model.model.{case.layout.saved}.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with loading_backbone_weights():  # the caller's say at load time, not the file's
        reloaded = PeftModel.from_pretrained(build_backbone("stid", splits), tmp_path)
    assert_same(predict(reloaded, batch), expected)


def test_lora_control_loads_what_st_peft_refuses(data, tmp_path):
    """What peft 0.21 does with a LoRA checkpoint: a backbone key is written, NaN is loaded, an unknown key is
    dropped without a warning. st-peft's tuners refuse all three (see the tests above)."""
    splits, batch = data
    case = Case("LORA", "stid")
    path = saved_adapter(case, splits, tmp_path)
    tensors = load_file(path)
    lora_a = next(key for key in tensors if "lora_A" in key)
    tensors[lora_a] = torch.full_like(tensors[lora_a], float("nan"))
    tensors["base_model.model.regression.bias"] = torch.full((HORIZON,), 1e6)
    tensors["base_model.model.not_a_module.weight"] = torch.ones(3)
    save_file(tensors, path)
    model = PeftModel.from_pretrained(build_backbone("stid", splits), tmp_path)
    assert torch.equal(model.get_base_model().regression.bias, torch.full((HORIZON,), 1e6))
    assert torch.isnan(predict(model, batch)).all()


# the adapter's life cycle ----------------------------------------------------------------------------------


def adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def backbone_forecast(case: Case, splits, batch: dict) -> torch.Tensor:
    """What the untouched backbone forecasts."""
    return predict(build_backbone(case.backbone, splits), batch)


@cases(CASES)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "torch"])
def test_save_and_load_are_exact(data, case, safe_serialization, tmp_path):
    splits, batch = data
    model = case.wrap(splits)
    expected = predict(model, batch)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["README.md", "adapter_config.json", weights])
    loaded = PeftModel.from_pretrained(build_backbone(case.backbone, splits), tmp_path, is_trainable=True)
    saved, reloaded = adapter_state(model), adapter_state(loaded)
    assert saved.keys() == reloaded.keys()
    for key, value in saved.items():
        assert torch.equal(value, reloaded[key]), key
    assert_same(predict(loaded, batch), expected)


@cases(CASES)
@pytest.mark.parametrize("is_trainable", [True, False])
def test_is_trainable_both_ways(data, case, is_trainable, tmp_path):
    splits, batch = data
    case.wrap(splits).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_backbone(case.backbone, splits), tmp_path, is_trainable=is_trainable)
    trainable = {name for name, parameter in loaded.named_parameters() if parameter.requires_grad}
    assert loaded.peft_config["default"].inference_mode is not is_trainable
    if is_trainable:
        assert trainable == set(adapter_parameters(loaded, case.prefix))
        training_step(loaded, batch, case.prefix)
    else:
        assert not trainable and not loaded.training


@cases(CASES)
def test_several_adapters_switch_disable_and_delete(data, case):
    splits, batch = data
    model = case.wrap(splits, seed=1)
    first = predict(model, batch)
    torch.manual_seed(2)
    model.add_adapter("second", case.config(splits))
    assert_same(predict(model, batch), first)  # adding does not activate
    model.set_adapter("second")
    second = predict(model, batch)
    assert not torch.allclose(first, second)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name in adapter_parameters(model, case.prefix) if ".second" in name}
    model.set_adapter("default")
    assert_same(predict(model, batch), first)
    with model.disable_adapter():
        assert_same(predict(model, batch), backbone_forecast(case, splits, batch))
    assert_same(predict(model, batch), first)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert not any(".second" in name for name, _ in model.named_parameters())
    assert_same(predict(model, batch), first)


@cases(CASES)
def test_unload_gives_back_the_backbone(data, case):
    splits, batch = data
    unloaded = case.wrap(splits).unload()
    assert not any(isinstance(module, BaseTunerLayer) for module in unloaded.modules())
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    assert_same(predict(unloaded, batch), backbone_forecast(case, splits, batch))


@cases(CASES)
def test_merge_is_exact_or_refused_with_the_reason(data, case):
    splits, batch = data
    model = case.wrap(splits)
    if case.tuner == "LORA":
        expected = predict(model, batch)
        torch.testing.assert_close(predict(model.merge_and_unload(), batch), expected, rtol=1e-4, atol=1e-5)
        return
    with pytest.raises(ValueError, match="cannot be merged|no weights to merge"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged|no weights to merge"):
        model.merge_adapter()


@cases(CASES)
def test_state_dict_helpers_round_trip(data, case):
    splits, batch = data
    model = case.wrap(splits)
    expected = predict(model, batch)
    state = adapter_state(model)
    assert state and all(case.prefix in key for key in state)
    fresh = case.wrap(splits, init_weights=True)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if case.prefix in key]
    assert_same(predict(fresh, batch), expected)


@cases(CASES)
def test_compiled_model_forecasts_the_same(data, case):
    splits, batch = data
    model = case.wrap(splits)
    expected = predict(model, batch)
    torch._dynamo.reset()
    # dynamo traces the tuner's layers and hooks; the eager backend keeps the check to that, without code generation
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(predict(compiled, batch), expected, rtol=1e-5, atol=1e-6)


@cases(CASES)
def test_deepcopy_is_independent(data, case):
    splits, batch = data
    model = case.wrap(splits)
    expected = predict(model, batch)
    clone = copy.deepcopy(model)
    assert_same(predict(clone, batch), expected)
    with torch.no_grad():
        for parameter in adapter_parameters(clone, case.prefix).values():
            parameter.mul_(2)
    assert not torch.allclose(predict(clone, batch), expected)
    assert_same(predict(model, batch), expected)


@cases(CASES)
def test_pickle_round_trip(data, case):
    splits, batch = data
    model = case.wrap(splits)
    expected = predict(model, batch)
    assert_same(predict(pickle.loads(pickle.dumps(model)), batch), expected)
