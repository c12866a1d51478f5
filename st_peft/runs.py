"""The run folder of ``st-peft train``: what it holds, how it is written, resumed and read back.

A run folder holds:

==========================  ==============================================================
``run.json``                the run's id, status (``running``, ``failed``, ``finished``) and
                            options (with ``data_fingerprints`` of its data and graph files);
                            written first, rewritten last: ``finished`` is the commit point
``model.safetensors``       the trained model's whole state (scaling statistics included)
``config.json``             the model's transformers config, when the run trained a backbone
                            (no adapter): the folder is then a model folder, so
                            ``AutoModelForTimeSeriesPrediction.from_pretrained(folder)`` loads it
``adapter/``                a ``PeftModel``'s adapter, saved the PEFT way
``metrics.json``            the test metrics, the baselines' beside them and the verdict
``data_summary.json``       the data summary printed before training
``checkpoints/checkpoint-N`` the Trainer's checkpoints; each complete one holds
                            ``st_peft_run.json`` naming the run that wrote it
``.lock``                   held (``flock``) by the process writing the run; names its id
==========================  ==============================================================

Every file is written to a temporary name and renamed into place, so a reader never sees a
half-written file. One process at a time writes a folder: :meth:`RunFolder.locked` refuses a
second one, naming the holder's process id, and takes over a lock whose holder died (with a
warning). ``--resume`` continues the run named in ``run.json`` from its newest complete
checkpoint; checkpoints of earlier runs, partial ones and ones with a damaged file are skipped
with a warning. JSON is written strict: a NaN metric is ``null``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
DATA_SUMMARY_FILE = "data_summary.json"
DATA_FINGERPRINTS = "data_fingerprints"
"""The entry of a run's options that fingerprints its data files (:mod:`st_peft.data.fingerprint`); --resume
checks it on its own, with its own message and override, so the options comparison leaves it out."""
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
CHECKPOINT_MARK = "st_peft_run.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")

RUNNING, FAILED, FINISHED = "running", "failed", "finished"
RUN_ENTRIES = (RUN_FILE, MODEL_FILE, CONFIG_FILE, METRICS_FILE, DATA_SUMMARY_FILE, ADAPTER_DIR, CHECKPOINT_DIR)
"""What a run writes; ``--overwrite`` removes exactly these (and ``metrics-<split>.json``)."""


class RunFolderError(Exception):
    """The run folder cannot be used as asked; the message says why and what to do."""


class RunFolderBusy(RunFolderError):
    """Another live process is writing the run folder."""


class RunWarning(UserWarning):
    """Something in a run folder was skipped or recovered; training goes on."""


@dataclass(frozen=True)
class Run:
    """What ``run.json`` records.

    Attributes:
        run_id: a fresh id per run; checkpoints carry it.
        status: ``running``, ``failed`` or ``finished``.
        options: the options the run was started with (``st-peft train``'s, as JSON values).
        error: why a failed run stopped.
    """

    run_id: str
    status: str
    options: dict[str, Any]
    error: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that it is strict JSON (``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json_atomic(path: str | os.PathLike, content: Mapping[str, Any]) -> None:
    """Write ``content`` as strict JSON (NaN as ``null``) to ``path`` through a temporary file renamed into place.

    A failed write (a full disk, a read-only folder) leaves ``path`` as it was and no temporary file behind.
    """
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        try:
            json.dump(strict_json(content), handle, indent=2, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """One ``st-peft train`` output folder.

    Args:
        path: the folder (created by :meth:`locked` when missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # ---- what it holds -------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        """The Trainer's ``output_dir``."""
        return self.path / CHECKPOINT_DIR

    def read_run(self) -> Run | None:
        """The run ``run.json`` records, or None when there is none.

        Raises:
            RunFolderError: ``run.json`` is not a run record.
        """
        path = self.path / RUN_FILE
        if not path.is_file():
            return None
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            return Run(content["run_id"], content["status"], content["options"], content.get("error"))
        except (ValueError, KeyError, TypeError) as error:
            raise RunFolderError(f"{path} is not an st-peft run record ({error})") from error

    def finished_run(self) -> Run:
        """The run of a folder that holds a finished run.

        Raises:
            RunFolderError: no run, or one that has not finished (named with its status).
        """
        run = self.read_run()
        if run is None:
            raise RunFolderError(f"{self.path} holds no st-peft run (no {RUN_FILE}); point at an `st-peft train` "
                                 "--output-dir")
        if run.status != FINISHED:
            raise RunFolderError(f"the run in {self.path} has not finished (status {run.status!r})"
                                 + (f": {run.error}" if run.error else ""))
        return run

    def read_metrics(self) -> dict[str, float]:
        """The test metrics of a finished run."""
        self.finished_run()
        return json.loads((self.path / METRICS_FILE).read_text(encoding="utf-8"))

    def load_model(self, model: nn.Module) -> None:
        """Load the finished run's weights into ``model`` (built like the run's model), strictly."""
        from safetensors.torch import load_model

        self.finished_run()
        load_model(model, str(self.path / MODEL_FILE))

    # ---- one writer at a time -----------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder's lock for the ``with`` block.

        The lock is an ``flock`` on ``.lock``, which the operating system releases when its
        holder dies; the file names the holder's process id.

        Raises:
            RunFolderBusy: a live process holds it (its id is named).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK_FILE
        handle = open(lock_path, "a+")  # noqa: SIM115  (closed in finally)
        held = False
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunFolderBusy(
                    f"{self.path} is in use by another st-peft process (pid {holder}); wait for it to end or "
                    "choose another --output-dir"
                ) from None
            handle.seek(0)
            previous = handle.read().strip()
            if previous:
                # a clean release empties the file, so a holder that died left its id behind
                state = "no longer running" if not previous.isdigit() or not _pid_alive(int(previous)) else \
                    "not holding it"
                warnings.warn(f"{self.path}: recovered the stale lock of process {previous} ({state})",
                              RunWarning, stacklevel=3)
            held = True
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield self
        finally:
            # only the holder empties the file: a refused process must leave the holder's id for the next one
            if held:
                handle.seek(0)
                handle.truncate()
                handle.flush()
            handle.close()

    # ---- how it is written --------------------------------------------------------------

    def begin(self, options: Mapping[str, Any], *, overwrite: bool = False, resume: bool = False) -> Run:
        """Record the start of a run (hold :meth:`locked` around this and the whole run).

        A new run gets a fresh id. ``overwrite`` first removes everything an earlier run wrote;
        ``resume`` continues the run recorded here, which must have the same options.

        Raises:
            RunFolderError: the folder holds a run and neither flag says what to do with it;
                ``resume`` finds no unfinished run, or one with other options.
        """
        options = json.loads(json.dumps(dict(options)))
        previous = self.read_run()
        if resume:
            if previous is None:
                raise RunFolderError(f"nothing to resume in {self.path}: it holds no run; start it without --resume")
            if previous.status == FINISHED:
                raise RunFolderError(f"the run in {self.path} has finished: nothing to resume; pass --overwrite to "
                                     "start over")
            differing = sorted(key for key in set(options) | set(previous.options)
                               if key not in ("output_dir", DATA_FINGERPRINTS)
                               and options.get(key) != previous.options.get(key))
            if differing:
                changes = ", ".join(f"{key}: {previous.options.get(key)!r} -> {options.get(key)!r}" for key in differing)
                raise RunFolderError(f"--resume continues the run in {self.path} with its own options; these differ: "
                                     f"{changes}")
            run = Run(previous.run_id, RUNNING, previous.options)
        else:
            if overwrite:
                self.clear()
            elif previous is not None or self.checkpoints.exists():
                what = f"a {previous.status} run" if previous is not None else "checkpoints of an earlier run"
                hint = "" if previous is None or previous.status == FINISHED else "pass --resume to continue it, "
                raise RunFolderError(f"{self.path} already holds {what}; {hint}pass --overwrite to start over, or "
                                     "choose another --output-dir")
            run = Run(uuid.uuid4().hex, RUNNING, options)
        self._write_run(run)
        return run

    def clear(self) -> None:
        """Remove everything a run writes (never other files)."""
        for name in RUN_ENTRIES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for stale in self.path.glob("metrics-*.json"):
            stale.unlink()

    def _write_run(self, run: Run) -> None:
        content = {"run_id": run.run_id, "status": run.status, "updated": _now(), "options": run.options}
        if run.error:
            content["error"] = run.error
        write_json_atomic(self.path / RUN_FILE, content)

    def fail(self, run: Run, error: BaseException) -> None:
        """Record that ``run`` stopped with ``error``.

        On a full disk or a read-only folder the record cannot be written either: it keeps saying
        ``running``, which ``--resume`` continues just as it continues a failed run.
        """
        try:
            self._write_run(Run(run.run_id, FAILED, run.options, f"{type(error).__name__}: {error}"))
        except OSError:
            pass

    def finish(self, run: Run, model: nn.Module, metrics: Mapping[str, float]) -> None:
        """Write the trained model and its metrics, then mark ``run`` finished.

        ``model.safetensors`` holds the whole state; a ``PreTrainedModel`` is saved with
        ``save_pretrained`` (``config.json`` next to it, so the folder is a model folder), a
        ``PeftModel`` also gets its adapter saved under ``adapter/``. Each file is renamed into place once complete, and
        ``run.json`` says ``finished`` only after all of them are.
        """
        from peft import PeftModel
        from safetensors.torch import save_model
        from transformers import PreTrainedModel

        staging = Path(tempfile.mkdtemp(prefix=".finish-", dir=self.path))
        try:
            if isinstance(model, PreTrainedModel):
                model.save_pretrained(staging)
            else:
                save_model(model, str(staging / MODEL_FILE))
            if isinstance(model, PeftModel):
                model.save_pretrained(staging / ADAPTER_DIR)
            write_json_atomic(staging / METRICS_FILE, metrics)
            for name in (MODEL_FILE, CONFIG_FILE, ADAPTER_DIR, METRICS_FILE):
                source, target = staging / name, self.path / name
                if not source.exists():
                    continue
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(source, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._write_run(Run(run.run_id, FINISHED, run.options))

    def write_metrics(self, name: str, metrics: Mapping[str, float]) -> Path:
        """Write ``metrics`` as ``<name>`` in the folder (atomically) and return its path."""
        path = self.path / name
        write_json_atomic(path, metrics)
        return path

    # ---- resumed ----------------------------------------------------------------------

    def resume_checkpoint(self, run: Run) -> Path | None:
        """The newest complete checkpoint written by ``run``, or None (training starts from step 0).

        Every newer checkpoint that is skipped, because it is partial or was written by another
        run, is named in a :class:`RunWarning`.
        """
        found = sorted(
            (path for path in self.checkpoints.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()),
            key=lambda path: int(path.name.split("-")[-1]),
            reverse=True,
        )
        for path in found:
            problem = checkpoint_problem(path, run.run_id)
            if problem is None:
                return path
            warnings.warn(f"skipping {path}: {problem}", RunWarning, stacklevel=2)
        warnings.warn(f"no complete checkpoint of run {run.run_id} in {self.checkpoints}: training starts from step 0",
                      RunWarning, stacklevel=2)
        return None

    def checkpoint_marker(self, run: Run) -> CheckpointMarker:
        """The Trainer callback that marks each checkpoint of ``run`` as complete."""
        return CheckpointMarker(run.run_id)


def checkpoint_problem(path: Path, run_id: str) -> str | None:
    """Why ``path`` cannot resume ``run_id``, or None when it is a complete checkpoint of that run."""
    mark = path / CHECKPOINT_MARK
    if not mark.is_file():
        return f"no {CHECKPOINT_MARK}: a save that did not complete, or a checkpoint of an earlier st-peft"
    try:
        owner = json.loads(mark.read_text(encoding="utf-8"))["run_id"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {CHECKPOINT_MARK}"
    if owner != run_id:
        return f"written by another run ({owner}), not by run {run_id}"
    try:
        json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {TRAINER_STATE}: a save that did not complete"
    except ValueError:
        return f"unreadable {TRAINER_STATE}"
    if not any((path / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return f"no weights ({' or '.join(CHECKPOINT_WEIGHTS)})"
    return damaged_file(path)


def damaged_file(path: Path) -> str | None:
    """Why a file of the checkpoint ``path`` cannot be read back, or None.

    A safetensors file must hold every byte its header declares; the torch files (optimizer,
    scheduler, random states, training arguments) are zip archives whose every member must
    match its checksum. Both checks read the files but build no tensor.
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError, ValueError) as error:
                return f"unreadable {file.name} ({' '.join(str(error).split())})"
        elif file.suffix in (".pt", ".pth", ".bin"):
            try:
                with zipfile.ZipFile(file) as archive:
                    broken = archive.testzip()
            except (zipfile.BadZipFile, OSError) as error:
                return f"unreadable {file.name} ({error})"
            if broken is not None:
                return f"unreadable {file.name} (member {broken} is damaged)"
    return None


class CheckpointMarker(TrainerCallback):
    """Writes ``st_peft_run.json`` into each checkpoint once the Trainer has saved all of it.

    ``on_save`` runs after the weights, optimizer, scheduler, RNG states and
    ``trainer_state.json`` are on disk, so the mark means "complete, and written by this run".
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_json_atomic(folder / CHECKPOINT_MARK, {"run_id": self.run_id, "step": state.global_step})
