"""Run ``st-peft`` and hold it in the middle of a checkpoint save, so a test can act at that moment.

Usage: ``python tests/scripts/pause_at_save.py SIGNAL_FILE STEP st-peft-arguments...``

The arguments after ``STEP`` go to ``st_peft.cli.main`` unchanged. When the Trainer saves the
checkpoint of step ``STEP`` it has written the weights, the optimizer and the scheduler but
not yet the RNG states or ``trainer_state.json``; there this script writes its process id
to ``SIGNAL_FILE`` and waits until the test deletes that file (at most 300 s), then lets the
save go on. ``tests/test_cli.py`` uses it to start a second run while the first one holds
its folder, and to kill a run during a checkpoint save.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from transformers import Trainer

from st_peft import cli

WAIT_LIMIT_S = 300


def main() -> int:
    signal_file, step, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    save_rng_state = Trainer._save_rng_state

    def paused_save(self: Trainer, output_dir: str) -> None:
        if self.state.global_step == step:
            signal_file.write_text(str(os.getpid()))
            deadline = time.monotonic() + WAIT_LIMIT_S
            while signal_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        save_rng_state(self, output_dir)

    Trainer._save_rng_state = paused_save
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
