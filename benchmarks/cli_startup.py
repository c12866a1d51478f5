"""How long ``st-peft --help``, ``st-peft train --help`` and a mistyped flag take, each a fresh process.

    python benchmarks/cli_startup.py                          # the front: python -m st_peft_cli
    python benchmarks/cli_startup.py --script /tmp/venv/bin/st-peft --repeats 21

Each command runs ``--repeats`` times as a subprocess, the three commands in turn, and the median
wall-clock time of each is reported (the machine is shared, so single runs vary). The front
(``st_peft_cli``, the installed ``st-peft`` script) is compared with ``python -m st_peft.cli``, which
parses after importing st_peft (torch, transformers, peft) as the console script did before, run
``--before-repeats`` times. Prints a table and writes ``benchmarks/results/cli_startup.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

COMMANDS = {
    "st-peft --help": ["--help"],
    "st-peft train --help": ["train", "--help"],
    "st-peft train --epohcs 3 (exit 2)": ["train", "--epohcs", "3"],
}


def seconds(program: list[str], arguments: list[str], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` runs of ``program + arguments``, each checked for its exit status."""
    expected = 2 if "--epohcs" in arguments else 0
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = subprocess.run([*program, *arguments], capture_output=True, text=True, env=os.environ.copy())
        times.append(time.perf_counter() - began)
        if result.returncode != expected:
            raise SystemExit(f"{' '.join(program + arguments)} exited {result.returncode}: {result.stderr[-500:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", help="an installed st-peft console script (default: python -m st_peft_cli)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--before-repeats", type=int, default=3, help="runs of python -m st_peft.cli (0: none)")
    options = parser.parse_args()
    front = [options.script] if options.script else [sys.executable, "-m", "st_peft_cli"]
    programs = {"front": (front, options.repeats)}
    if options.before_repeats:
        programs["python -m st_peft.cli"] = ([sys.executable, "-m", "st_peft.cli"], options.before_repeats)
    results: dict[str, dict] = {}
    for name, (program, repeats) in programs.items():
        for command, arguments in COMMANDS.items():
            times = seconds(program, arguments, repeats)
            results[f"{name}: {command}"] = {"program": " ".join(program), "arguments": arguments, "runs": repeats,
                                             "median_s": statistics.median(times), "min_s": min(times),
                                             "max_s": max(times), "seconds": times}
            print(f"{name}: {command}: median {statistics.median(times):.3f} s over {repeats}", flush=True)
    rows = [(key, value["runs"], value["median_s"], value["min_s"], value["max_s"]) for key, value in results.items()]
    print(markdown_table(["program: command", "runs", "median s", "min s", "max s"], rows))
    load = os.getloadavg()
    path = write_results("cli_startup", {"load_average_1_5_15": list(load), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
