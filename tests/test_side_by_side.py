"""benchmarks/side_by_side.py: each worker imports st_peft from its own tree, and only from there."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "side_by_side.py"


@pytest.fixture(scope="module")
def side_by_side():
    return load_script(SCRIPT)


def test_workers_of_two_trees_each_see_their_own_package(tmp_path, side_by_side):
    """An exported revision and the checkout answer from their own ``st_peft``; requests and replies
    pass through anything else a worker prints."""
    exported = tmp_path / "old"
    commit = side_by_side.export_package("HEAD", exported)
    assert len(commit.removesuffix("+dirty")) == 40 and (exported / "st_peft" / "__init__.py").is_file()
    worker_script = tmp_path / "worker.py"
    # the package is found, not imported: importing st_peft takes seconds
    worker_script.write_text(textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        from side_by_side import serve
        print("a library's chatter on stdout")
        serve(importlib.util.find_spec("st_peft").origin, lambda request: request.upper())
    """))
    workers = [side_by_side.TreeWorker(worker_script, [], tree) for tree in (exported, side_by_side.REPO)]
    try:
        origins = [Path(worker.wait_ready()) for worker in workers]
        assert origins == [exported / "st_peft" / "__init__.py", side_by_side.REPO / "st_peft" / "__init__.py"]
        assert [worker.ask("gwnet train_st_lora") for worker in workers] == ["GWNET TRAIN_ST_LORA"] * 2
    finally:
        for worker in workers:
            worker.close()
    assert [worker.process.returncode for worker in workers] == [0, 0]


def test_a_worker_that_dies_is_named(tmp_path, side_by_side):
    worker_script = tmp_path / "worker.py"
    worker_script.write_text("raise SystemExit(3)\n")
    worker = side_by_side.TreeWorker(worker_script, [], tmp_path)
    with pytest.raises(RuntimeError, match=r"worker on .* exited with code 3"):
        worker.wait_ready()
    worker.close()
