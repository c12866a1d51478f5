"""ST-LINK against the plain GPT-2 + PFA baseline, each switch off in turn, STID and GWNet.

    python benchmarks/st_link.py                       # default protocol (random GPT-2 weights)
    python benchmarks/st_link.py --quick               # smoke test: one data set, one seed, few steps
    python benchmarks/st_link.py --timing-only         # only the training-step cost (st_link_timing.json)
    python benchmarks/st_link.py --gpt2 openai-community/gpt2 --n-layer 6 --steps 2000 --test-windows 0
                                                       # the same comparison from pretrained GPT-2

Protocol (default): NYCTaxi and NYCBike1 demand (inflow and outflow) and LOS-loop speed,
12 steps in and 12 out, chronological 7:1:2 split, scaling statistics fitted on the training
span and carried by each model (``splits.model_kwargs()``).
Every model trains for the same fixed budget of optimizer steps (``--steps``, batch
``--batch-size``, AdamW lr ``--lr``, masked MAE in original units plus the router's
balance loss, through ``STTrainer``) with no validation-based selection, and is tested on
``--test-windows`` evenly spaced windows of the test split (MAE / RMSE / MAPE over the 12
horizons, zeros masked). Medians over ``--seeds``. The GPT-2 blocks are random unless
``--gpt2`` names a checkpoint: this machine has no pretrained GPT-2, so the numbers
measure the architecture, not the transfer of language pretraining. The budget is far
below convergence (it keeps the whole run near 15 minutes on two shared CPU cores);
ranks can change with longer training.

Cost: a training step (forward, backward, AdamW) of ST-LINK and of the baseline of the same
size are timed alternately on the same batch after ``--warmup-steps`` untimed steps each,
``--timing-steps`` times each (the order of the two flips every round, so a drift in the
machine's load falls on both alike), and the medians compared; memory is the bytes of
tensors saved for backward in one step (the activation memory, counted once per storage),
the bytes of the parameters with the gradients and AdamW moments of the trainable ones,
and, on a GPU, the peak allocated memory.
Prints markdown tables and writes ``benchmarks/results/st_link.json``; ``--timing-only`` skips
the accuracy runs and writes ``benchmarks/results/st_link_timing.json`` instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, parameter_count, write_results  # noqa: E402

from st_peft.backbones import STID, GWNet  # noqa: E402
from st_peft.data import build_splits, load  # noqa: E402
from st_peft.models.st_link import STLinkForForecasting  # noqa: E402
from st_peft.outputs import TARGET_NAMES  # noqa: E402
from st_peft.training import STTrainer, st_training_args  # noqa: E402

METRICS = ("mae", "rmse", "mape")
GPT_VARIANTS = {
    "ST-LINK": {},
    "GPT-2 + PFA baseline": {"use_se_attention": False, "use_mrffn": False},
    "ST-LINK w/o SE-Attention": {"use_se_attention": False},
    "ST-LINK w/o MRFFN": {"use_mrffn": False},
    "ST-LINK w/o partial freezing": {"use_partial_freeze": False},
}
GWNET_SMALL = {"residual_channels": 16, "dilation_channels": 16, "skip_channels": 64, "end_channels": 128}


def gpt2_settings(options: argparse.Namespace) -> dict:
    """GPT-2 configuration fields: the size for random weights, or overrides of a checkpoint.

    Attention dropout is off: with it, PyTorch's CPU attention leaves its fused kernel and
    materialises the full attention matrix (measured 4x slower here).
    """
    settings = {"attn_pdrop": 0.0, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "n_layer": options.n_layer}
    if options.gpt2 is None:
        settings.update(n_embd=options.n_embd, n_head=options.n_head, n_positions=1024)
    return settings


def build_model(name: str, splits, options: argparse.Namespace, seed: int) -> torch.nn.Module:
    """One of the compared forecasters, sized for ``splits`` and seeded."""
    torch.manual_seed(seed)
    if name == "STID":
        return STID(**splits.model_kwargs(), steps_per_day=splits.steps_per_day)
    if name == "GWNet":
        return GWNet(**splits.model_kwargs(), adjacency=splits.adjacency, **GWNET_SMALL)
    return STLinkForForecasting.from_splits(
        splits,
        options.gpt2,
        gpt2_config=gpt2_settings(options),
        patch_len=options.patch_len,
        num_unfrozen_layers=options.unfrozen,
        **GPT_VARIANTS[name],
    )


def test_subset(splits, windows: int):
    """``windows`` evenly spaced windows of the test split (all of them for 0)."""
    if windows <= 0 or windows >= len(splits.test):
        return splits.test
    step = len(splits.test) / windows
    return splits.test.select([int(i * step) for i in range(windows)])


def train_and_test(model: torch.nn.Module, splits, options: argparse.Namespace, seed: int, output_dir: str):
    """Train for the fixed step budget and return the test metrics and the training seconds."""
    args = st_training_args(
        output_dir,
        batch_size=options.batch_size,
        lr=options.lr,
        seed=seed,
        max_steps=options.steps,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        load_best_model_at_end=False,
        disable_tqdm=True,
    )
    trainer = STTrainer(model, args, splits.train, None, splits.collator)
    trainer.remove_callback(PrinterCallback)  # it would print every run's training summary
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return trainer.evaluate_test(test_subset(splits, options.test_windows)), seconds


def saved_activation_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**inputs)
    del output
    return sum(storages.values())


def training_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters plus the gradients and the two AdamW moments of the trainable ones."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total + 3 * trainable


def compare_cost(splits, options: argparse.Namespace) -> dict:
    """Training-step time and memory of ST-LINK against the baseline of the same size, side by side."""
    models = {name: build_model(name, splits, options, seed=0).train() for name in ("ST-LINK", "GPT-2 + PFA baseline")}
    batch = splits.collator([splits.train[i] for i in range(options.batch_size)])
    inputs = {key: value for key, value in batch.items() if key not in TARGET_NAMES}
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
        for name, model in models.items()
    }

    def step(name: str) -> float:
        start = time.perf_counter()
        output = models[name](**inputs)
        loss = output.prediction_outputs.abs().mean()
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(options.warmup_steps):
        for name in models:
            step(name)
    order = list(models)
    for _ in range(options.timing_steps):
        for name in order:
            times[name].append(step(name))
        order.reverse()
    cost = {}
    for name, model in models.items():
        quartiles = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [times[name][0]] * 3
        cost[name] = {
            "step_seconds_median": statistics.median(times[name]),
            "step_seconds_quartiles": [quartiles[0], quartiles[2]],
            "step_seconds": times[name],
            "saved_activation_mib": saved_activation_bytes(model, inputs) / 2**20,
            "training_state_mib": training_state_bytes(model) / 2**20,
            "trainable_parameters": parameter_count(model, trainable_only=True),
        }
    cost["time_ratio"] = cost["ST-LINK"]["step_seconds_median"] / cost["GPT-2 + PFA baseline"]["step_seconds_median"]
    cost["memory_ratio"] = cost["ST-LINK"]["saved_activation_mib"] / cost["GPT-2 + PFA baseline"]["saved_activation_mib"]
    if torch.cuda.is_available():
        for name in models:
            torch.cuda.reset_peak_memory_stats()
            step(name)
            cost[name]["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return cost


def main() -> None:
    """Run the benchmark, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["nyc-taxi", "nyc-bike", "los-loop"])
    parser.add_argument("--models", nargs="+", default=[*GPT_VARIANTS, "STID", "GWNet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test-windows", type=int, default=64, help="evenly spaced test windows (0: all)")
    parser.add_argument("--gpt2", help="GPT-2 checkpoint (folder or Hub id); random weights when absent")
    parser.add_argument("--n-embd", type=int, default=64, help="width of the random GPT-2")
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=4, help="GPT-2 layers used (the first ones of a checkpoint)")
    parser.add_argument("--unfrozen", type=int, default=2, help="U, the upper layers that train")
    parser.add_argument("--patch-len", type=int, default=12, help="time steps per token (12: one token per node)")
    parser.add_argument("--timing-steps", type=int, default=30, help="timed steps of each model")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps of each model first")
    parser.add_argument("--timing-only", action="store_true",
                        help="skip the accuracy runs; write st_link_timing.json (unless --output is given)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="one data set, one seed, 5 steps, 32 test windows")
    parser.add_argument("--output")
    options = parser.parse_args()
    if options.output is None:
        options.output = "st_link_timing" if options.timing_only else "st_link"
    if options.quick:
        options.datasets, options.seeds, options.steps, options.test_windows = ["nyc-bike"], [0], 5, 32
        options.timing_steps, options.warmup_steps = 2, 1
    torch.set_num_threads(options.threads)

    import tempfile

    results: dict[str, dict] = {}
    accuracy_rows, cost_rows = [], []
    started = time.perf_counter()
    for dataset in options.datasets:
        splits = build_splits(load(dataset), input_len=12, horizon=12)
        results[dataset] = {"models": {}}
        for name in [] if options.timing_only else options.models:
            runs = []
            for seed in options.seeds:
                model = build_model(name, splits, options, seed)
                with tempfile.TemporaryDirectory() as output_dir:
                    metrics, seconds = train_and_test(model, splits, options, seed, output_dir)
                metrics["train_seconds"] = seconds
                runs.append(metrics)
                print(f"{dataset} {name} seed {seed}: MAE {metrics['mae']:.3f} ({seconds:.0f} s)", flush=True)
            median = {key: statistics.median(run[key] for run in runs) for key in (*METRICS, "train_seconds")}
            trainable = parameter_count(model, trainable_only=True)
            results[dataset]["models"][name] = {"median": median, "runs": runs, "trainable_parameters": trainable,
                                                "parameters": parameter_count(model)}
            accuracy_rows.append([dataset, name, median["mae"], median["rmse"], median["mape"], f"{trainable:,}",
                                  f"{median['train_seconds']:.0f}"])
        cost = compare_cost(splits, options)
        results[dataset]["cost"] = cost
        for name in ("ST-LINK", "GPT-2 + PFA baseline"):
            cost_rows.append([dataset, name, f"{cost[name]['step_seconds_median'] * 1000:.0f}",
                              f"{cost[name]['saved_activation_mib']:.1f}", f"{cost[name]['training_state_mib']:.1f}",
                              f"{cost[name]['trainable_parameters']:,}"])
        cost_rows.append([dataset, "ratio ST-LINK / baseline", f"{cost['time_ratio']:.2f}x", f"{cost['memory_ratio']:.2f}x",
                          "", ""])
        print(f"{dataset}: step time ratio {cost['time_ratio']:.2f}x, memory ratio {cost['memory_ratio']:.2f}x", flush=True)

    weights = f"pretrained {options.gpt2}" if options.gpt2 else "RANDOM (no pretrained GPT-2 on this machine)"
    size = (
        f"GPT-2 weights: {weights}; {options.n_layer} layers, U={options.unfrozen}, "
        f"width {options.n_embd if options.gpt2 is None else 'of the checkpoint'}, patch {options.patch_len}; "
    )
    if options.timing_only:
        training = (
            f"training-step cost only: batch {options.batch_size}, median of {options.timing_steps} alternating "
            f"steps after {options.warmup_steps} warm-up steps each; "
        )
    else:
        training = (
            f"{options.steps} steps of batch {options.batch_size} (lr {options.lr}) per run, "
            f"{options.test_windows or 'all'} test windows, median of seeds {options.seeds}; "
        )
    protocol = f"{size}{training}{options.threads} torch thread(s)"
    if accuracy_rows:
        print(f"\n### Accuracy ({protocol})\n")
        print(markdown_table(["data set", "model", "MAE", "RMSE", "MAPE %", "trainable params", "train s"],
                             accuracy_rows))
    print(f"\n### Training-step cost, batch {options.batch_size}, median of {options.timing_steps} alternating "
          f"steps after {options.warmup_steps} warm-up steps each ({options.threads} torch thread(s))\n")
    print(markdown_table(["data set", "model", "step ms", "saved activations MiB", "params + AdamW state MiB",
                          "trainable params"], cost_rows))
    results_path = write_results(
        options.output,
        {"protocol": protocol, "options": vars(options), "results": results,
         "total_seconds": time.perf_counter() - started},
    )
    print(f"\nwrote {results_path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
