"""What STGCN's fast Chebyshev sum is worth: its graph convolution summed by Clenshaw's recurrence on
``theta``'s weight, against ``theta`` called on the paper's Chebyshev terms.

    OMP_NUM_THREADS=1 python benchmarks/stgcn_graph_conv.py [--sizes 250 1024] [--repeats 15]

``ChebGraphConv`` reads ``theta``'s weight (Clenshaw) while ``theta`` is a plain ``nn.Linear`` or a PEFT
layer with its adapters disabled; anything else is called on the terms, because an adapter may
change the map per node. This measures the price of calling ``theta`` always (the one way not to look
at what stands in its place), in the paper's first block (64 -> 16 channels, ``Ks = 3``, 10 steps
after the first temporal convolution), on a random dense symmetric graph of each size:

- ``plain``: ``theta`` is the ``nn.Linear`` (Clenshaw);
- ``LoRA disabled``: peft's LoRA on ``theta`` under ``disable_adapter`` (Clenshaw on the base layer);
- ``called``: the same weights behind an ``nn.Sequential``, so ``theta`` is called on the terms;
- ``LoRA enabled``: peft's LoRA (r = 4) on ``theta``, called on the terms.

The median CPU seconds of ``--repeats`` forwards (``torch.no_grad``, one thread) each, and each
path's ratio to ``plain``, measured side by side. Prints a table and writes
``benchmarks/results/stgcn_graph_conv.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from st_peft.backbones.stgcn import ChebGraphConv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, timed, write_results  # noqa: E402

IN_CHANNELS, OUT_CHANNELS, ORDER, STEPS = 64, 16, 3, 10


class OneConv(nn.Module):
    """One graph convolution over a fixed rescaled Laplacian, so that peft can wrap its ``theta``."""

    def __init__(self, laplacian: torch.Tensor) -> None:
        super().__init__()
        self.conv = ChebGraphConv(IN_CHANNELS, OUT_CHANNELS, ORDER)
        self.register_buffer("laplacian", laplacian)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, N, T) -> (B, C_out, N, T)``."""
        return self.conv(hidden, self.laplacian)


def cpu_median(function: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of ``repeats`` calls after one warm-up."""
    function()
    return statistics.median(timed(function, repeats, clock=time.process_time))


def measure(num_nodes: int, batch: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds of each path at ``num_nodes`` nodes."""
    torch.manual_seed(0)
    weights = torch.rand(num_nodes, num_nodes)
    laplacian = (weights + weights.T) / num_nodes - torch.eye(num_nodes)
    hidden = torch.randn(batch, IN_CHANNELS, num_nodes, STEPS)
    plain = OneConv(laplacian).eval()
    called = OneConv(laplacian).eval()
    called.load_state_dict(plain.state_dict())
    called.conv.theta = nn.Sequential(called.conv.theta)
    lora = get_peft_model(OneConv(laplacian), LoraConfig(r=4, target_modules=["theta"], init_lora_weights=False))
    lora.base_model.model.load_state_dict(plain.state_dict(), strict=False)
    lora.eval()

    def disabled() -> torch.Tensor:
        with lora.disable_adapter():
            return lora(hidden)

    with torch.no_grad():
        return {"plain": cpu_median(lambda: plain(hidden), repeats),
                "LoRA disabled": cpu_median(disabled, repeats),
                "called": cpu_median(lambda: called(hidden), repeats),
                "LoRA enabled": cpu_median(lambda: lora(hidden), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1024])
    parser.add_argument("--batch", type=int, default=8, help="windows a forward")
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args()
    torch.set_num_threads(1)
    results = {size: measure(size, options.batch, options.repeats) for size in options.sizes}
    paths = list(next(iter(results.values())))
    rows = [[size, *(f"{1e3 * seconds[path]:.1f} ms ({seconds[path] / seconds['plain']:.2f}x)" for path in paths)]
            for size, seconds in results.items()]
    print(markdown_table(["nodes", *paths], rows))
    path = write_results("stgcn_graph_conv", {"command": " ".join(sys.argv), "batch": options.batch,
                                              "repeats": options.repeats, "cpu_seconds": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
