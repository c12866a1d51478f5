"""The Hub through a real Hub-compatible HTTP server on 127.0.0.1 (``olah``), never the internet.

Which half is real: ``olah`` serves git repositories read-only, so every repository here is
PREPARED by writing the push folder with ``st_peft.hub.save_for_hub`` (the function
``push_adapter`` / ``push_backbone`` upload) and ``git commit``-ting it into the served
folder (``HubServer.publish``). Nothing here claims a tested push. The PULL half is real:
``PeftModel.from_pretrained(backbone, repo_id)``, ``<Backbone>.from_pretrained(repo_id)`` and
``st_peft.hub.load_adapter`` / ``load_backbone`` talk HTTP to the server by repo id, and are
then repeated with ``HF_HUB_OFFLINE=1`` from the cache. The push code path is exercised up
to the HTTP call, where the read-only server's refusal (405) must come back as a clear error.

Models are tiny and use the built-in ``chickenpox`` data (20 Hungarian counties, weekly).
"""

from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from hub_server import (
    failing_server,
    free_port,
    point_hub_at,
    refuse_non_local_hosts,
    silent_server,
)
from huggingface_hub import ModelCard, get_session, set_client_factory
from huggingface_hub.utils import _http
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config

import st_peft.data as std
from st_peft import cli
from st_peft.backbones import STGCN, STID, GWNet
from st_peft.hub import (
    HubError,
    card_fields,
    load_adapter,
    load_backbone,
    push_adapter,
    push_backbone,
    render_model_card,
    save_for_hub,
)
from st_peft.metrics import horizon_metrics
from st_peft.models.factost import FactoSTConfig, FactoSTModel
from st_peft.models.st_link import STLinkConfig, STLinkForForecasting
from st_peft.outputs import prediction_of
from st_peft.tuners.factost import FactoSTAdapterConfig
from st_peft.tuners.st_lora import STLoraConfig

torch.set_num_threads(1)

DATASET = "chickenpox"
BACKBONES = ("stid", "gwnet", "stgcn", "factost", "st_link")
TARGETS = ("future_values", "future_observed_mask")


@pytest.fixture(scope="module")
def splits():
    return std.build_splits(std.load(DATASET), input_len=8, horizon=4)


@pytest.fixture(scope="module")
def batch(splits):
    return next(iter(splits.iter_batches("test", 8)))


def build_backbone(name: str, splits) -> torch.nn.Module:
    """A tiny, randomly initialised backbone of each kind, in eval mode."""
    torch.manual_seed(0)
    kwargs = splits.model_kwargs()
    if name == "stid":
        model = STID(
            **kwargs,
            steps_per_day=splits.steps_per_day,
            embed_dim=8,
            node_dim=8,
            tod_dim=8,
            dow_dim=8,
            num_layers=1,
        )
    elif name == "gwnet":
        model = GWNet(
            **kwargs,
            adjacency=splits.adjacency,
            residual_channels=4,
            dilation_channels=4,
            skip_channels=8,
            end_channels=8,
        )
    elif name == "stgcn":
        model = STGCN(**kwargs, adjacency=splits.adjacency, block_channels=(4, 2, 4), kt=2)
    elif name == "factost":
        config = FactoSTConfig(
            patch_length=4,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_context_length=8,
            max_horizon=4,
            num_domain_prompts=2,
            prompt_top_k=1,
        )
        model = FactoSTModel(config)
    else:
        gpt2 = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64)
        config = STLinkConfig(
            gpt2_config=gpt2,
            **kwargs,
            steps_per_day=splits.steps_per_day,
            patch_len=4,
            num_unfrozen_layers=1,
            num_experts=2,
            num_memory_slots=4,
        )
        model = STLinkForForecasting(config)
    return model.eval()


BACKBONE_CLASSES = {
    "stid": STID,
    "gwnet": GWNet,
    "stgcn": STGCN,
    "factost": FactoSTModel,
    "st_link": STLinkForForecasting,
}


def forecast(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Forecast ``(B, H, N, C_out)`` in original units of ``model`` on ``batch`` (targets left out)."""
    with torch.no_grad():
        return prediction_of(model(**{key: value for key, value in batch.items() if key not in TARGETS}))


def card_metrics(model: torch.nn.Module, batch: dict, splits) -> dict[str, float]:
    """Masked test metrics of ``model`` on ``batch`` in original units, as a card reports them."""
    return horizon_metrics(
        forecast(model, batch), batch["future_values"], batch["future_observed_mask"], horizons=(1, 4)
    )


def build_adapter(splits, method: str = "st_lora") -> PeftModel:
    """An ST-LoRA adapter on a tiny STID, or a FACTOST adapter on a tiny FactoST backbone.

    The adapters start as the identity (zero-initialised factors and gates), so their
    parameters are randomised: a round trip must carry values that change the forecast.
    """
    if method == "st_lora":
        config = STLoraConfig(
            **splits.size_kwargs(), r=2, hidden_dim=4, node_embedding_dim=2, num_nall_layers=1
        )
        model = get_peft_model(build_backbone("stid", splits), config)
    else:
        config = FactoSTAdapterConfig(
            num_nodes=splits.num_nodes,
            steps_per_day=splits.steps_per_day,
            node_embedding_dim=4,
            calendar_embedding_dim=4,
            filter_rank=2,
            num_prompt_tokens=1,
            prompt_rank=1,
        )
        model = get_peft_model(build_backbone("factost", splits), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


ADAPTER_BACKBONE = {"st_lora": "stid", "factost": "factost"}
PEFT_TYPES = {"st_lora": "STLORA", "factost": "FACTOST"}


def go_offline(monkeypatch, hub_env) -> None:
    """HF_HUB_OFFLINE=1, and an endpoint where nothing listens, so only the cache can answer."""
    dead = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        dead + "/{repo_id}/resolve/{revision}/{filename}",
    )


@pytest.fixture
def no_pickle(monkeypatch):
    """Make any pickle or ``torch.load`` fail: loading must read only safetensors and JSON."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pull tried to unpickle a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def prepare(hub, model, repo_id: str, tmp_path: Path, **card_kwargs) -> Path:
    """PREPARED half: write the push folder with save_for_hub and commit it into the served repositories."""
    folder = save_for_hub(model, tmp_path / repo_id.replace("/", "--"), repo_id=repo_id, **card_kwargs)
    hub.publish(folder, repo_id)
    return folder


def cached_files(cache: Path, repo_id: str) -> list[str]:
    """Names of the files of ``repo_id``'s snapshots in the cache."""
    folder = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return sorted(path.name for path in folder.rglob("*") if path.is_file())


# ---- model cards ----------------------------------------------------------------------


def test_adapter_card_metadata(splits, batch):
    model = build_adapter(splits)
    metrics = card_metrics(model, batch, splits)
    card = ModelCard(
        render_model_card(
            "adapter",
            card_fields(
                model, "org/stlora-chickenpox", dataset=DATASET, metrics=metrics, base_model="org/stid"
            ),
        )
    )
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "org/stid"
    assert data["peft_type"] == "STLORA"
    assert data["datasets"] == [DATASET]
    assert (data["num_nodes"], data["input_len"], data["horizon"]) == (20, 8, 4)
    assert data["license"] == "apache-2.0"
    assert {"spatio-temporal", "time-series-forecasting", "stlora"} <= set(data["tags"])
    reported = {metric["type"]: metric["value"] for metric in data["model-index"][0]["results"][0]["metrics"]}
    assert reported == pytest.approx(metrics)
    assert 'PeftModel.from_pretrained(backbone, "org/stlora-chickenpox")' in card.text


def test_backbone_card_metadata(splits, batch):
    model = build_backbone("gwnet", splits)
    metrics = card_metrics(model, batch, splits)
    card = ModelCard(
        render_model_card(
            "backbone", card_fields(model, "org/gwnet", dataset=DATASET, metrics=metrics, license="mit")
        )
    )
    data = card.data.to_dict()
    assert data["library_name"] == "st-peft"
    assert data["model_class"] == "GWNet"
    assert (data["num_nodes"], data["horizon"], data["license"]) == (20, 4, "mit")
    assert "base_model" not in data and "peft_type" not in data
    assert f"| mae | {metrics['mae']:.4f} |" in card.text
    assert 'GWNet.from_pretrained("org/gwnet")' in card.text


def test_push_folder_holds_only_safetensors_json_and_card(splits, tmp_path):
    """The exact folder push_adapter uploads (it calls save_for_hub): weights, config, card, nothing else."""
    model = build_adapter(splits)
    folder = save_for_hub(
        model, tmp_path / "up", repo_id="org/a", dataset=DATASET, metrics={"mae": 1.5}, base_model="org/stid"
    )
    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/stid"
    saved = load_file(folder / "adapter_model.safetensors")
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert len(saved) == len(trained) > 0
    assert [path.name for path in tmp_path.iterdir()] == ["up"], "no staging folder may be left behind"


# ---- pulls through the server -----------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ADAPTER_BACKBONE))
def test_adapter_pull_by_repo_id_then_offline(
    method, hub, hub_env, splits, batch, tmp_path, monkeypatch, no_pickle
):
    """Prepared: the adapter repository. Real: PeftModel.from_pretrained and load_adapter by repo id over HTTP, then offline."""
    model = build_adapter(splits, method)
    base = ADAPTER_BACKBONE[method]
    expected = forecast(model, batch)
    assert not torch.equal(expected, forecast(build_backbone(base, splits), batch)), (
        "the adapter must change the forecast"
    )
    repo_id = f"org/{method.replace('_', '-')}-pull"
    prepare(
        hub,
        model,
        repo_id,
        tmp_path,
        dataset=DATASET,
        metrics=card_metrics(model, batch, splits),
        base_model=f"org/{base}",
        num_nodes=20,
    )

    pulled = PeftModel.from_pretrained(build_backbone(base, splits), repo_id).eval()
    assert torch.equal(forecast(pulled, batch), expected)
    checked = load_adapter(build_backbone(base, splits), repo_id, peft_type=PEFT_TYPES[method]).eval()
    assert torch.equal(forecast(checked, batch), expected)
    assert set(cached_files(hub_env, repo_id)) == {"adapter_config.json", "adapter_model.safetensors"}

    go_offline(monkeypatch, hub_env)
    offline = PeftModel.from_pretrained(build_backbone(base, splits), repo_id).eval()
    assert torch.equal(forecast(offline, batch), expected)
    assert torch.equal(forecast(load_adapter(build_backbone(base, splits), repo_id).eval(), batch), expected)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_pull_by_repo_id_then_offline(
    name, hub, hub_env, splits, batch, tmp_path, monkeypatch, no_pickle
):
    """Prepared: the backbone repository. Real: <Backbone>.from_pretrained and load_backbone by repo id, then offline."""
    model = build_backbone(name, splits)
    expected = forecast(model, batch)
    repo_id = f"org/{name.replace('_', '-')}-pull"
    prepare(
        hub,
        model,
        repo_id,
        tmp_path,
        dataset=DATASET,
        metrics=card_metrics(model, batch, splits),
        num_nodes=20,
    )
    model_class = BACKBONE_CLASSES[name]

    assert torch.equal(forecast(model_class.from_pretrained(repo_id).eval(), batch), expected)
    assert torch.equal(forecast(load_backbone(model_class, repo_id).eval(), batch), expected)
    assert all(
        Path(file).suffix in (".json", ".safetensors", ".md") for file in cached_files(hub_env, repo_id)
    )

    go_offline(monkeypatch, hub_env)
    assert torch.equal(forecast(load_backbone(model_class, repo_id).eval(), batch), expected)
    assert torch.equal(forecast(model_class.from_pretrained(repo_id).eval(), batch), expected)


def test_backbone_forecasts_real_units_from_raw_values_after_a_round_trip(hub, hub_env, tmp_path, no_pickle):
    """Prepared: an STID repository (config, weights, card; no scaler file). Real: the pull by repo id.

    The pulled model takes raw speeds and forecasts speeds, exactly as the model that was pushed.
    """
    splits = std.build_splits(std.load("los-loop").select_nodes(list(range(8))), input_len=12, horizon=12)
    torch.manual_seed(0)
    model = STID(**splits.model_kwargs(), steps_per_day=splits.steps_per_day, embed_dim=8, node_dim=8,
                 tod_dim=8, dow_dim=8, num_layers=1).eval()
    batch = next(iter(splits.iter_batches("test", 16)))
    raw = {key: value for key, value in batch.items() if key not in TARGETS}
    with torch.no_grad():
        expected = model(**raw).prediction_outputs
    folder = prepare(hub, model, "org/stid-real-units", tmp_path, dataset="los-loop", metrics={"mae": 1.0})
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    for pulled in (STID.from_pretrained("org/stid-real-units"), load_backbone(STID, "org/stid-real-units")):
        with torch.no_grad():
            output = pulled.eval()(**batch)
        assert torch.equal(output.prediction_outputs, expected)
        assert torch.equal(output.loc[0, 0], torch.tensor(splits.scaling_statistics()["future_loc"]))
        # speeds in mph: an untrained forecast sits near the training mean, not near the scaled space's 0
        truth, observed = batch["future_values"], batch["future_observed_mask"]
        assert float(output.loss) < 0.3 * float(truth[observed].mean())
    assert not any(name.endswith("scaler.json") for name in cached_files(hub_env, "org/stid-real-units"))


# ---- bad input: clear messages, nothing half-written --------------------------------------


def test_missing_repository_is_named_and_leaves_no_cache(hub_env, splits):
    with pytest.raises(HubError, match=r"no adapter_config.json in 'org/does-not-exist'.*does not exist"):
        load_adapter(build_backbone("stid", splits), "org/does-not-exist")
    with pytest.raises(HubError, match=r"no config.json in 'org/does-not-exist'"):
        load_backbone(STID, "org/does-not-exist")
    leftovers = (
        [path.name for path in hub_env.rglob("*") if "does-not-exist" in path.name]
        if hub_env.exists()
        else []
    )
    assert leftovers == []


def test_offline_pull_of_an_uncached_repository_is_named(hub_env, splits, monkeypatch):
    go_offline(monkeypatch, hub_env)
    offline = r"could not pull 'org/never-pulled' at .*: offline mode is on \(HF_HUB_OFFLINE=1\)"
    with pytest.raises(HubError, match=offline):
        load_adapter(build_backbone("stid", splits), "org/never-pulled")
    with pytest.raises(HubError, match=offline):
        load_backbone(STID, "org/never-pulled")
    with pytest.raises(HubError, match=r"could not create the repository 'org/p' at .*: offline mode is on"):
        push_backbone(build_backbone("stid", splits), "org/p", dataset=DATASET, metrics={"mae": 1.0}, token="t")


def test_repository_of_another_peft_type_is_refused(hub, hub_env, splits, tmp_path):
    """Prepared: a plain LoRA adapter repository. Real: the refusal after reading its adapter_config.json over HTTP."""
    lora = get_peft_model(build_backbone("stid", splits), LoraConfig(r=2, target_modules=["regression"]))
    lora_folder = tmp_path / "lora"
    lora.save_pretrained(lora_folder)
    hub.publish(lora_folder, "org/plain-lora")

    with pytest.raises(ValueError, match=r"'org/plain-lora' holds a LORA adapter, not STLORA"):
        load_adapter(build_backbone("stid", splits), "org/plain-lora", peft_type="stlora")
    with pytest.raises(ValueError, match=r"holds a LORA adapter, not STLORA or FACTOST"):
        load_adapter(build_backbone("stid", splits), "org/plain-lora")
    assert not (hub_env / "models--org--plain-lora").exists(), "a refused pull must leave the cache as it was"


def test_backbone_repository_of_another_class_is_refused(hub, hub_env, splits, batch, tmp_path):
    """Prepared: an STGCN repository. Real: STID refusing its config.json; an adapter loader refusing a backbone."""
    model = build_backbone("stgcn", splits)
    prepare(
        hub, model, "org/stgcn-other", tmp_path, dataset=DATASET, metrics=card_metrics(model, batch, splits)
    )
    with pytest.raises(ValueError, match=r"'org/stgcn-other' holds a 'stgcn' model, not 'stid' \(STID\)"):
        load_backbone(STID, "org/stgcn-other")
    with pytest.raises(ValueError, match=r"holds a 'stgcn' model, not 'factost' \(FactoSTModel\)"):
        load_backbone(FactoSTModel, "org/stgcn-other")
    with pytest.raises(HubError, match=r"no adapter_config.json in 'org/stgcn-other'.*use load_backbone"):
        load_adapter(build_backbone("stid", splits), "org/stgcn-other")


def test_card_template_missing_a_field_writes_nothing(splits, tmp_path):
    templates = tmp_path / "cards"
    templates.mkdir()
    source = (Path(__file__).resolve().parent.parent / "hub_cards" / "adapter.md").read_text()
    (templates / "adapter.md").write_text(source.replace("{{ horizon }}", "twelve"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"adapter.md does not use the required field\(s\) \['horizon'\]"):
        save_for_hub(
            build_adapter(splits),
            out,
            repo_id="org/a",
            dataset=DATASET,
            metrics={"mae": 1.0},
            base_model="org/stid",
            template_dir=templates,
        )
    (templates / "adapter.md").write_text(source + "\n{{ no_such_field }}\n")
    with pytest.raises(ValueError, match=r"'no_such_field' is undefined"):
        save_for_hub(
            build_adapter(splits),
            out,
            repo_id="org/a",
            dataset=DATASET,
            metrics={"mae": 1.0},
            base_model="org/stid",
            template_dir=templates,
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cards"], (
        "no output or staging folder may be left"
    )


def test_card_needs_the_values_it_reports(splits):
    adapter = build_adapter(splits)
    with pytest.raises(ValueError, match=r"needs base_model.*pass base_model=\.\.\."):
        card_fields(adapter, "org/a", dataset=DATASET, metrics={"mae": 1.0})
    with pytest.raises(
        ValueError, match=r"base_model must be a Hub repo id such as org/name, got '/data/runs/stid'"
    ):
        card_fields(adapter, "org/a", dataset=DATASET, metrics={"mae": 1.0}, base_model="/data/runs/stid")
    with pytest.raises(ValueError, match=r"metric 'mae' is nan"):
        card_fields(adapter, "org/a", dataset=DATASET, metrics={"mae": float("nan")}, base_model="org/stid")
    with pytest.raises(ValueError, match=r"needs num_nodes"):
        card_fields(build_backbone("factost", splits), "org/f", dataset=DATASET, metrics={"mae": 1.0})


def test_save_failure_leaves_no_folder(splits, tmp_path, monkeypatch):
    model = build_backbone("stid", splits)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_for_hub(model, tmp_path / "out", repo_id="org/s", dataset=DATASET, metrics={"mae": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_push_reaches_the_server_and_reports_its_refusal(hub_env, splits, monkeypatch):
    """The push code path runs up to the HTTP call; olah is read-only and answers 405, which must read clearly."""
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    with pytest.raises(
        HubError,
        match=r"could not create the repository 'org/pushed' at http://127\.0\.0\.1:\d+: HTTP 405, this server does not accept uploads",
    ):
        push_adapter(
            build_adapter(splits), "org/pushed", dataset=DATASET, metrics={"mae": 1.0}, base_model="org/stid"
        )
    with pytest.raises(HubError, match=r"HTTP 405"):
        push_backbone(build_backbone("stid", splits), "org/pushed", dataset=DATASET, metrics={"mae": 1.0})
    with pytest.raises(TypeError, match="push_adapter takes a PeftModel, got STID"):
        push_adapter(build_backbone("stid", splits), "org/pushed", dataset=DATASET, metrics={"mae": 1.0})


# ---- st-peft push ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Two `st-peft train` runs on chickenpox: a small STID, then ST-LoRA on it (--backbone-from)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--dataset", DATASET, "--input-len", "8", "--horizon", "4", "--epochs", "1", "--model", "stid",
              "--model-args", "{embed_dim: 8, node_dim: 8, tod_dim: 8, dow_dim: 8, num_layers: 1}"]  # fmt: skip
    assert cli.main(["train", *common, "--output-dir", str(root / "stid")]) == 0
    assert cli.main(
        [
            "train",
            *common,
            "--adapter",
            "st_lora",
            "--backbone-from",
            str(root / "stid"),
            "--output-dir",
            str(root / "st_lora"),
        ]
    ) == 0
    return root


def test_cli_push_folder_then_pull(cli_runs, hub, hub_env, tmp_path):
    """Prepared: `st-peft push --save-dir` writes the upload folder, committed to the server. Real: the pulls by repo id."""
    assert cli.main(
        [
            "push",
            "--model-dir",
            str(cli_runs / "stid"),
            "--repo-id",
            "org/cli-stid",
            "--save-dir",
            str(tmp_path / "stid"),
        ]
    ) == 0
    assert sorted(path.name for path in (tmp_path / "stid").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    card = ModelCard.load(tmp_path / "stid" / "README.md").data.to_dict()
    reported = {metric["type"]: metric["value"] for metric in card["model-index"][0]["results"][0]["metrics"]}
    run_metrics = json.loads((cli_runs / "stid" / "metrics.json").read_text())
    assert reported == pytest.approx({key: value for key, value in run_metrics.items()
                                      if key != "loss" and isinstance(value, float)})
    hub.publish(tmp_path / "stid", "org/cli-stid")

    adapter_args = ["push", "--model-dir", str(cli_runs / "st_lora"), "--repo-id", "org/cli-st-lora"]
    assert cli.main([*adapter_args, "--base-model", "org/cli-stid", "--save-dir", str(tmp_path / "st_lora")]) == 0
    assert ModelCard.load(tmp_path / "st_lora" / "README.md").data.base_model == "org/cli-stid"
    hub.publish(tmp_path / "st_lora", "org/cli-st-lora")

    backbone = STID.from_pretrained("org/cli-stid")
    assert_same_state(backbone, load_file(cli_runs / "stid" / "model.safetensors"))
    pulled = PeftModel.from_pretrained(backbone, "org/cli-st-lora")
    assert_same_state(pulled, load_file(cli_runs / "st_lora" / "model.safetensors"))


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def test_cli_push_errors_are_one_line(cli_runs, hub_env, tmp_path, monkeypatch, capsys):
    """The upload path runs up to the HTTP call (olah refuses it); bad folders and a missing --base-model are named."""
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    cases = [
        (["--model-dir", str(cli_runs / "stid"), "--repo-id", "org/cli-x"],
         r"st-peft push: error: could not create the repository 'org/cli-x' .* HTTP 405"),
        (["--model-dir", str(cli_runs / "st_lora"), "--repo-id", "org/cli-x", "--save-dir", str(tmp_path / "a")],
         r"pass --base-model org/backbone"),
        (["--model-dir", str(tmp_path), "--repo-id", "org/cli-x"], r"holds no st-peft run \(no run.json\)"),
        (["--model-dir", str(cli_runs / "stid")], r"missing --repo-id"),
    ]
    for args, message in cases:
        assert cli.main(["push", *args]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists()


# ---- Hub failures name their cause (issue 14) ------------------------------------------------


def assert_no_cache_for(cache: Path, repo_id: str) -> None:
    left = [path for path in cache.rglob("*") if repo_id.replace("/", "--") in path.name] if cache.exists() else []
    assert left == [], "a failed pull must leave the cache as it was"


def pull_and_push_errors(splits, repo_id: str, timeout: float) -> list[tuple[HubError, float]]:
    """The HubError and the seconds it took for a load_adapter, a load_backbone and a push_backbone."""
    calls = [
        lambda: load_adapter(build_backbone("stid", splits), repo_id, timeout=timeout),
        lambda: load_backbone(STID, repo_id, timeout=timeout),
        lambda: push_backbone(build_backbone("stid", splits), repo_id, dataset=DATASET, metrics={"mae": 1.0},
                              token="hf_local_test_token", timeout=timeout),
    ]
    results = []
    for call in calls:
        start = time.monotonic()
        with pytest.raises(HubError) as error:
            call()
        results.append((error.value, time.monotonic() - start))
    return results


def test_an_unreachable_server_is_named(splits, tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    point_hub_at(monkeypatch, endpoint, tmp_path / "cache")
    refuse_non_local_hosts(monkeypatch)
    for error, _ in pull_and_push_errors(splits, "org/unreachable", timeout=1):
        assert re.search(r"could not (pull|create the repository) 'org/unreachable' at http://127\.0\.0\.1:\d+: "
                         r"the server cannot be reached", str(error)), error
    assert_no_cache_for(tmp_path / "cache", "org/unreachable")


def test_an_http_error_is_named_with_its_status(splits, tmp_path, monkeypatch):
    with failing_server(500) as endpoint:
        point_hub_at(monkeypatch, endpoint, tmp_path / "cache")
        refuse_non_local_hosts(monkeypatch)
        for error, seconds in pull_and_push_errors(splits, "org/failing", timeout=1):
            assert "HTTP 500" in str(error) and "cannot be reached" not in str(error), error
            assert seconds < 20
    assert_no_cache_for(tmp_path / "cache", "org/failing")


def test_a_server_that_never_answers_is_given_up_on(splits, tmp_path, monkeypatch):
    with silent_server() as endpoint:
        point_hub_at(monkeypatch, endpoint, tmp_path / "cache")
        refuse_non_local_hosts(monkeypatch)
        for error, seconds in pull_and_push_errors(splits, "org/silent", timeout=1):
            assert "no answer within 1 s" in str(error), error
            assert seconds < 10
        monkeypatch.setenv("ST_PEFT_HUB_TIMEOUT", "0.5")
        start = time.monotonic()
        with pytest.raises(HubError, match="no answer within 0.5 s"):
            load_backbone(STID, "org/silent")
        assert time.monotonic() - start < 10
    assert_no_cache_for(tmp_path / "cache", "org/silent")


def test_the_users_client_factory_is_back_after_a_call(tmp_path, monkeypatch):
    """The silence hooks exist only during st-peft's own push or pull: huggingface_hub's client
    factory (here the user's own) is used for that call and is the one set afterwards."""
    made = []

    def users_factory() -> httpx2.Client:
        made.append(httpx2.Client())
        return made[-1]

    before = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(users_factory)
    try:
        with silent_server() as endpoint:
            point_hub_at(monkeypatch, endpoint, tmp_path / "cache")
            refuse_non_local_hosts(monkeypatch)
            with pytest.raises(HubError, match="no answer within 0.5 s"):
                load_backbone(STID, "org/silent", timeout=0.5)
        called = len(made)
        assert called >= 1
        client = get_session()
        assert len(made) == called + 1 and client is made[-1]
        assert client.event_hooks == {"request": [], "response": []}
    finally:
        set_client_factory(before)
