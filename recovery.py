"""Nothing lost under the faults users meet: checkpoints that count only when whole, one writer per run folder,
--resume only for the same run, a diverged loss or a full disk or a Ctrl-C answered with one line.
"""

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import struct
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from cli import write_json_atomic

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
RUN_ARGS = "run_args.json"
# The model's weights in a checkpoint: whole or sharded safetensors/bin, PEFT adapters, FSDP and DeepSpeed folders.
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*", "adapter_model*", "global_step*")
# Flags that change neither what is trained nor what is measured (--eval_rationales adds a report at the end and
# changes no other figure): a resume may change them. --batch_size and
# --grad_steps may change while their product with the model copies, the effective batch in the folder name, stays.
RESUMABLE_FLAGS = frozenset({
    "resume", "overwrite", "no_log", "download", "data_url", "data_dir", "output_dir", "local_rank",
    "save_total_limit", "eval_batch_size", "batch_size", "grad_steps", "parallelize", "deepspeed",
    "report_to", "cache_dir", "no_cache", "gradient_checkpointing", "eval_rationales",
})
# Ordinary words any real tokenizer of a text model encodes without <unk>; a fallback tokenizer (a model folder
# without tokenizer files) maps nearly all of them to <unk>.
PROBE_TEXT = "the answer is 42 because there are more apples on the tree"
# Larger torch archives (a big model's optimizer state) are checked for truncation only, so a resume stays quick.
CRC_CHECK_BYTES = 4 << 30
# torch's zip writer reports a full disk as a failed write of its archive, without errno.
ZIP_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# The tokenizers library (Rust) reports a full disk as a bare Exception carrying the OS error's text.
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
# torch reports a failed CPU allocation as a plain RuntimeError (CUDA's is a torch.OutOfMemoryError).
CPU_ALLOCATION_FAILURE = "DefaultCPUAllocator: can't allocate memory"


class RunError(Exception):
    """A problem with the run's folders or flags; its message says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; the message says how to continue."""


# ---- checkpoints: complete and loadable, or not counted ----


def checkpoint_step(folder: Path) -> int:
    suffix = folder.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else -1


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors: the header's last offset
    must end exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated"
        (header_length,) = struct.unpack("<Q", head)
        if 8 + header_length > size:
            return f"{path.name} is truncated"
        try:
            header = json.loads(f.read(header_length))
        except ValueError:
            return f"{path.name} has a corrupt header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    described = 8 + header_length + max(ends, default=0)
    if described != size:
        return f"{path.name} is truncated ({size} bytes, its header describes {described})"
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose index sits at its end (a truncated file has none) and a CRC per entry,
    read back for files up to CRC_CHECK_BYTES (the trainer reads them next anyway, from the warmed page cache)."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip() if path.stat().st_size <= CRC_CHECK_BYTES else None
    except (zipfile.BadZipFile, EOFError, OSError):
        return f"{path.name} is truncated or not a torch archive"
    return f"{path.name} is corrupt (entry {broken})" if broken else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why the trainer could not resume from this checkpoint folder, or None when it is complete and readable.

    The trainer writes trainer_state.json last, so a save cut short (kill, full disk) lacks it; every file it did
    write is then checked for truncation or corruption.
    """
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"incomplete (no {TRAINER_STATE}: its save was cut short)"
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        return "it holds no model weights"
    return _first_problem(p for p in folder.rglob("*") if p.is_file())


def _file_problem(path: Path) -> str | None:
    """Why a JSON, safetensors or torch file of a checkpoint cannot be read, or None (other files are not checked)."""
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} is truncated or not valid JSON"
        return None
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _zip_problem(path) if path.stat().st_size else f"{path.name} is empty"
    return None


def _first_problem(paths) -> str | None:
    return next((problem for problem in map(_file_problem, sorted(paths)) if problem), None)


def weights_problem(folder: Path) -> str | None:
    """Why the model weights of a checkpoint folder cannot be loaded, or None: what loading the selected model
    reads, which leaves out the optimizer and trainer state that only a resume needs."""
    weights = [path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)]
    if not weights:
        return "it holds no model weights"
    return _first_problem({file for path in weights for file in ([path] if path.is_file() else path.rglob("*"))
                           if file.is_file()})


def resume_checkpoint(ckpt_dir: Path, say: bool = True) -> Path | None:
    """The newest checkpoint that is complete and readable; each newer one is skipped with a line saying why.
    Nothing is deleted: a skipped folder is overwritten when training reaches its step again."""
    folders = [p for p in ckpt_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and checkpoint_step(p) >= 0]
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if say:
            print(f"note: not resuming from {folder}: {problem}", file=sys.stderr, flush=True)
    return None


def fall_back_to_readable_best(state, args, say: bool, required: bool = True) -> list[dict]:
    """Point the trainer state's best checkpoint, where its folder is gone or its weights cannot be read, at the
    best evaluation whose checkpoint can be, saying which was skipped and why.

    Returns the skipped checkpoints ({"step", "checkpoint", "problem"}), empty where the best one is readable.
    Candidates are the evaluations of state.log_history whose checkpoint folder still exists, best first and, among
    equals, earliest first, as the trainer chooses. Where none is readable: a RunError if required (the selected
    model is being loaded), else the state forgets its best, so that the next evaluation becomes it."""
    if state.best_global_step is None:
        return []
    output_dir = Path(args.output_dir)
    best = Path(state.best_model_checkpoint or output_dir / f"{CHECKPOINT_PREFIX}{state.best_global_step}")
    problem = weights_problem(best) if best.is_dir() else "its folder no longer exists"
    if problem is None:
        return []
    skipped = [{"step": state.best_global_step, "checkpoint": str(best), "problem": problem}]
    metric = args.metric_for_best_model
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    scores = {entry["step"]: entry[metric] for entry in state.log_history if metric in entry}
    sign = -1 if args.greater_is_better else 1
    for step in sorted(scores, key=lambda step: (sign * scores[step], step)):
        folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        if step == state.best_global_step or not folder.is_dir():  # not folders the rotation removed
            continue
        problem = weights_problem(folder)
        if problem:
            skipped.append({"step": step, "checkpoint": str(folder), "problem": problem})
            continue
        if say:
            close_progress_bars()
            for skip in skipped:
                print(f"note: not loading the best checkpoint {skip['checkpoint']} (step {skip['step']}, {metric} "
                      f"{scores.get(skip['step'], math.nan):.4f}): {skip['problem']}; the selected model is {folder} "
                      f"(step {step}, {metric} {scores[step]:.4f}), the best evaluation whose checkpoint can be read",
                      file=sys.stderr, flush=True)
        state.best_model_checkpoint, state.best_metric, state.best_global_step = str(folder), scores[step], step
        return skipped
    if required:
        reasons = "; ".join(f"{skip['checkpoint']}: {skip['problem']}" for skip in skipped)
        raise RunError(f"no checkpoint of {output_dir} holds readable weights to load the selected model from "
                       f"({reasons}); start the run again with --overwrite")
    state.best_model_checkpoint, state.best_metric, state.best_global_step = None, None, None
    return skipped


class ReadableBest(TrainerCallback):
    """When a resumed run starts: the best checkpoint of the state it resumes is checked, and replaced by the best
    readable one (fall_back_to_readable_best) where its folder is gone, which the trainer would otherwise only
    ignore, keeping the last model, or its weights are damaged. `skipped` collects what was passed over."""

    def __init__(self, skipped: list[dict]):
        self.skipped = skipped

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped.extend(fall_back_to_readable_best(state, args, say=state.is_world_process_zero, required=False))


# ---- one writer per run folder ----


def lock_path(ckpt_dir: Path) -> Path:
    """Beside the run folder, so the folder itself holds only results."""
    return ckpt_dir.with_name(ckpt_dir.name + ".lock")


def _created_folders(folder: Path) -> list[Path]:
    """The folders that making `folder` creates, innermost first."""
    created = []
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    return created


class RunLock:
    """An exclusive flock on <run>.lock, held for the life of the process; the OS releases it when the process dies,
    however it dies. The file names its holder (pid, host, start time) for the refusal message."""

    def __init__(self, ckpt_dir: Path):
        self.path = lock_path(ckpt_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunError(f"{self.path.parent / self.path.stem} is in use by {self.holder()}: wait for that run "
                               "to end or stop it; two processes must not write one run folder") from None
            # The holder before us may have removed the file between our open and our lock: lock the file in place.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.write(fd, json.dumps(holder).encode())
        self.fd = fd

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"process {info['pid']} on {info['host']} (since {info['since']}: {info['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


@contextmanager
def run_folder(ckpt_dir: Path, log_dir: Path, is_main: bool, share_refusal: bool = False) -> Iterator[str | None]:
    """Hold the run's lock while the block runs; afterwards remove the lock and any folder this run created that
    is still empty (a run that failed or was interrupted before writing anything leaves nothing behind).

    With share_refusal (a launched run, whose other processes know nothing of the lock), a refused lock is not
    raised but yielded, for stop_together to tell every process; otherwise the block gets None."""
    if not is_main:
        yield None
        return
    created = _created_folders(ckpt_dir) + _created_folders(log_dir)
    try:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run folder {ckpt_dir.parent} ({e.strerror}): "
                       "choose another --output_dir") from None
    lock = RunLock(ckpt_dir)
    refusal = None
    try:
        lock.acquire()
    except OSError as e:
        _remove_empty(created)
        raise RunError(f"cannot write in {ckpt_dir.parent} ({e.strerror}): choose another --output_dir") from None
    except RunError as e:
        if not share_refusal:
            _remove_empty(created)
            raise
        refusal = str(e)
    try:
        yield refusal
    finally:
        lock.release()
        _remove_empty(created)


def stop_together(refusal: str | None) -> None:
    """Raise rank 0's refusal of the run folder (run_folder) in every process of a launched run, which would
    otherwise wait for rank 0 until the distributed timeout; in a lone process, raise it if any. Call it where
    every process has joined the process group, before any waits for the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise RunError(refusal)


def _remove_empty(folders: list[Path]) -> None:
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty, or never made: it stays


# ---- --resume continues the same run only ----


def run_settings(flags: dict) -> dict:
    """Of a run's {flag: value} (config.RunConfig.flags), those that shape what it trains and measures, as JSON
    gives them back (lists, not tuples)."""
    settings = {key: value for key, value in sorted(flags.items()) if key not in RESUMABLE_FLAGS}
    return json.loads(json.dumps(settings, default=str))


def holds_results(ckpt_dir: Path) -> bool:
    """Whether a run folder holds anything of a run besides its run_args.json (a checkpoint, even one cut short,
    best/, results.json): a run killed before its first checkpoint leaves only that record, and nothing to resume."""
    records = (RUN_ARGS, RUN_ARGS + ".tmp")
    return ckpt_dir.is_dir() and any(path.name not in records for path in ckpt_dir.iterdir())


def attempt_left_nothing(ckpt_dir: Path) -> bool:
    """Whether a run folder holds only the run_args.json of an attempt that stopped before its first checkpoint."""
    return (ckpt_dir / RUN_ARGS).is_file() and not holds_results(ckpt_dir)


def check_same_run(flags: dict, ckpt_dir: Path) -> None:
    """Refuse a resume whose flags would train or measure differently from those the run started with."""
    path = ckpt_dir / RUN_ARGS
    if not path.is_file() or not holds_results(ckpt_dir):
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a record cut short by a kill at the start: the run had not trained yet
    now = run_settings(flags)
    changed = [f"--{key} {recorded[key]} -> {now[key]}" for key in now if key in recorded and recorded[key] != now[key]]
    if changed:
        raise RunError(f"--resume continues the run in {ckpt_dir}, started with other flags ({'; '.join(changed)}): "
                       "resume with the flags it started with, or change --run/--output_dir for a new run")


def record_run_args(flags: dict, ckpt_dir: Path) -> None:
    """The run's settings as it starts, for check_same_run; the record of a run being resumed is kept, that of an
    attempt that left nothing to resume is replaced."""
    path = ckpt_dir / RUN_ARGS
    if path.is_file() and holds_results(ckpt_dir):
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, run_settings(flags))


# ---- the one-line answers ----


def check_tokenizer(tokenizer, source: str) -> None:
    """Refuse a tokenizer that maps ordinary words to <unk>: what transformers falls back to when a model folder
    has no tokenizer files, and a student trained on it learns nothing."""
    unk = tokenizer.unk_token_id
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if unk is not None and ids and sum(i == unk for i in ids) > len(ids) / 4:
        raise RunError(f"the tokenizer of {source} encodes ordinary words as {tokenizer.unk_token} (vocabulary of "
                       f"{len(tokenizer)}): the folder lacks its tokenizer files; save the model's tokenizer there "
                       "(tokenizer.save_pretrained)")


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(error, RuntimeError) and any(text in str(error) for text in ZIP_WRITE_FAILURES):
        return True
    return type(error) is Exception and any(text in str(error) for text in DISK_FULL_TEXTS)


def fault_message(error: BaseException, ckpt_dir: Path, model) -> str | None:
    """One line for the faults of the machine rather than of the code (full disk, out of memory, an unwritable
    folder); None for anything else, which keeps its traceback."""
    import torch

    if is_disk_full(error):
        saved = [_folder_bytes(p) for p in ckpt_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir()]
        # Weights plus AdamW's two moments when no checkpoint was written yet.
        need = max(saved, default=0) or 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        where = getattr(error, "filename", None) or ckpt_dir
        return (f"disk full writing {where}: {_megabytes(_free_bytes(ckpt_dir))} free, a checkpoint needs about "
                f"{_megabytes(need)}; free space there and run the same command with --resume")
    if isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                     and CPU_ALLOCATION_FAILURE in str(error)):
        return ("out of memory: lower --batch_size (raising --grad_steps keeps the effective batch) or "
                "--eval_batch_size, then run the same command with --resume")
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}; fix that and run the same command with --resume"
    return None


class FaultGuard(TrainerCallback):
    """Training's side of fault tolerance:
    - stops training when the loss or the weights stop being finite, before that model is evaluated or saved, so a
      diverged model never becomes a checkpoint or the best model;
    - before the trainer saves into a checkpoint folder left from an earlier attempt (one --resume skipped), marks
      that folder incomplete, so a save cut short again cannot pass for whole with the earlier attempt's files;
    - keeps the step reached, for the line that reports an interruption."""

    def __init__(self):
        self.step = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step
        if (control.should_evaluate or control.should_save) and model is not None:
            import torch

            with torch.no_grad():
                finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.numel())
            if not finite:
                raise RunError(self.advice(f"the weights became NaN or infinite by step {state.global_step}", args))
        if control.should_save and state.is_world_process_zero:
            stale = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}" / TRAINER_STATE
            stale.unlink(missing_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise RunError(self.advice(f"the training loss became {loss} by step {state.global_step}", args))

    @staticmethod
    def advice(what: str, args) -> str:
        return (f"{what}: training diverged, and no checkpoint or best model was kept from it; "
                f"try a smaller --lr (now {args.learning_rate:g})")


@contextmanager
def faults_explained(guard: FaultGuard, ckpt_dir: Path, model) -> Iterator[None]:
    """Training and saving, with Ctrl-C/SIGTERM and the machine's faults turned into one line that says how to go on."""
    try:
        yield
    except BaseException as error:
        close_progress_bars()
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted at step {guard.step}; run the same command with --resume to continue "
                              "from its last checkpoint") from None
        message = fault_message(error, ckpt_dir, model) if isinstance(error, Exception) else None
        if message is None:
            raise
        raise RunError(message) from None


def close_progress_bars() -> None:
    """End the trainer's open progress bars, so that the line saying what happened starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
