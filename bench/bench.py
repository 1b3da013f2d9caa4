"""Throughput of the project's training and evaluation path, measured against the paper's formulation in one run.

    OMP_NUM_THREADS=2 python bench/bench.py --random_init tiny --dataset cqa --mode both --batch_size 8 \
        --max_input_length 256 --eval --eval_reference --process_memory --out bench.json

Per mode (task_prefix, standard) it trains the same batches from the same initial weights along two paths:

- optimized: train_utils.build_trainer exactly as run.py uses it (TaskPrefixTrainer with fast_loss.grouped_loss, the fused
  GELU, OneDNNLinear and CPUDropout modules, fused AdamW);
- two_pass: the same build_trainer with every speed-up switched off (DSS_DISABLE_SPEEDUPS=all while it is built and
  runs): the paper's formulation, two full forward passes per step, each view padded on its own
  (model_utils.one_pass_per_view), the stock T5 modules and SDPA attention, and the foreach AdamW kernel.

Each round trains both paths once, alternating which goes first (ABBA), so load drifting on a shared machine hits
both alike; speed-ups are ratios within a round (wall clock, and process CPU time, which shared cores disturb
less). Before training, both paths compute the loss of one batch from the same weights without dropout (in fp32,
TF32 off); they must agree to 1e-5 relative (step0_loss). Peak memory is the peak RSS of each training phase (on
Linux, reset between phases), or torch.cuda.max_memory_allocated on a GPU.

--eval times one trainer.evaluate of the test split (greedy generation of up to --gen_max_len tokens; random
weights never stop early) with fresh weights: the optimized path as run.py runs it (sorted by length, batches of
4 x --batch_size, no loss pass); --eval_reference adds the paper's evaluation (a loss pass, then generation, in
dataset order, batches of --batch_size, stock modules) for an in-run ratio, and the optimized path in batches of
--batch_size too (same_batch).

--process_memory (CPU) runs run.py itself for the same steps and reports its peak RSS, and the RSS of a process that
only imports run.py's modules: library import sizes differ a lot between transformers 4.30 and 5, so "working"
memory (peak - imports) is what compares. Against the original code itself, see bench_original.py.

Model FLOPs (real tokens only; padding is not useful work). For a T5 with d_model d, d_ff f, h heads of d_kv k
(hk = h * k), L_e encoder and L_d decoder layers, vocabulary V, gated activation (g = 3 matrices: wi_0, wi_1, wo;
g = 2 without), one row with S input and T target tokens costs, in one forward pass,

    encoder   L_e * [ S * (2*4*d*hk + 2*g*d*f) + 2*2*S*S*hk ]            q/k/v/o, feed-forward; scores and sums
    decoder   L_d * [ T * (2*4*d*hk + 2*2*d*hk + 2*g*d*f) + S * 2*2*d*hk  self q/k/v/o, cross q/o, FF; cross k/v
                      + 2*2*T*T*hk + 2*2*T*S*hk ]                         self and cross scores and sums
    lm_head   T * 2*d*V

(a multiply-add counts 2; attention over whole score matrices, as the kernels compute them). A training step is
3x the forward (the backward pass costs twice the forward). task_prefix counts both views. "padded" FLOPs apply the
same formula to each view's padded batch shape: what the two-pass formulation executes. Achieved FLOP/s divides model
FLOPs by the measured time, next to the machine's dense fp32 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where run.py and the library live
SHARED = ROOT.parent / "shared"

# t5-v1_1 shapes (gated-GELU, untied lm_head, dropout 0.1); tiny is the issue's reference model.
RANDOM_CONFIGS = {
    "tiny": {"d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 4, "num_decoder_layers": 4, "num_heads": 8},
    "t5-v1_1-small": {"d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_decoder_layers": 8, "num_heads": 6},
    "t5-v1_1-base": {"d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12, "num_decoder_layers": 12,
                     "num_heads": 12},
}

# Decoder-only students (--random_causal): real architectures' widths and vocabulary sizes, at the depth
# --causal_layers gives; "tiny" keeps Qwen2's 151,936-token vocabulary on a 64-wide model, for CI.
CAUSAL_CONFIGS = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama-3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "tiny": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
}
LOSS_RTOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="cqa", choices=["cqa", "svamp"])
    add("--data_dir", default=str(SHARED / "datasets"), help="the unzipped datasets.zip folder")
    add("--mode", default="both", choices=["task_prefix", "standard", "both"])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--from_pretrained", help="a saved T5 model and tokenizer (directory or hub id)")
    model.add_argument("--random_init", choices=sorted(RANDOM_CONFIGS),
                       help="a t5-v1_1-shaped model with random weights (default: tiny)")
    add("--tokenizer", default=str(SHARED / "t5-tokenizer"), help="tokenizer for --random_init")
    add("--batch_size", type=int, default=8)
    add("--eval_batch_size", type=int, default=None, help="default: run.py's (4 x --batch_size)")
    add("--max_input_length", type=int, default=256)
    add("--steps", type=int, default=20, help="timed training steps per path and round")
    add("--warmup", type=int, default=3, help="untimed steps before them")
    add("--rounds", type=int, default=2, help="rounds of both paths, alternating which goes first")
    add("--eval", action="store_true", help="also time one evaluation of the test split (generation)")
    add("--eval_rows", type=int, default=None, help="evaluate only the first N test rows (quick runs)")
    add("--eval_reference", action="store_true",
        help="also time the paper's evaluation: a loss forward pass, then generation, in dataset order")
    add("--process_memory", action="store_true",
        help="CPU: also the peak RSS of a whole run.py process (the reference's measure) and of its imports alone")
    add("--gen_max_len", type=int, default=64)
    add("--bf16", action="store_true", help="bfloat16 mixed precision (the loss check stays fp32)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--seed", type=int, default=0)
    add("--random_causal", choices=sorted(CAUSAL_CONFIGS),
        help="instead: the decoder-only configuration, a random model of this shape, task_prefix training steps by "
        "fast_loss.causal_grouped_loss against the plain formulation (one forward pass per view, full logits)")
    add("--causal_layers", type=int, default=2, help="--random_causal: decoder layers")
    add("--out", default="bench.json", help="where the JSON report goes")
    add("--overwrite", action="store_true", help="replace an existing --out report")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists: pass another --out, or --overwrite to replace it")
    if not args.from_pretrained and not args.random_init:
        args.random_init = "tiny"
    for name in ("batch_size", "max_input_length", "steps", "rounds", "gen_max_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step allocates optimizer state)")
    return args


# ---- analytic FLOPs ----


def forward_flops(config, source: int, target: int) -> int:
    """FLOPs of one forward pass for one row with `source` input and `target` target tokens (see the module doc)."""
    d, f, hk, vocab = config.d_model, config.d_ff, config.num_heads * config.d_kv, config.vocab_size
    g = 3 if config.is_gated_act else 2
    s, t = source, target
    encoder = config.num_layers * (s * (8 * d * hk + 2 * g * d * f) + 4 * s * s * hk)
    decoder = config.num_decoder_layers * (
        t * (8 * d * hk + 4 * d * hk + 2 * g * d * f) + s * 4 * d * hk + 4 * t * t * hk + 4 * t * s * hk
    )
    return encoder + decoder + t * 2 * d * vocab


VIEWS = (("input_ids", "labels"), ("expl_input_ids", "rationale_labels"))


class CountingCollator:
    """Wraps the trainer's collator and records, per batch, its real and padded tokens and training FLOPs."""

    def __init__(self, collator, config):
        self.collator, self.config, self.batches = collator, config, []

    def __call__(self, features):
        real = padded = flops = padded_flops = 0
        for input_key, label_key in VIEWS:
            if input_key not in features[0]:
                continue
            sources = [len(f[input_key]) for f in features]
            targets = [len(f[label_key]) for f in features]
            real += sum(sources) + sum(targets)
            padded += len(features) * (max(sources) + max(targets))
            flops += 3 * sum(forward_flops(self.config, s, t) for s, t in zip(sources, targets))
            padded_flops += 3 * len(features) * forward_flops(self.config, max(sources), max(targets))
        self.batches.append({"rows": len(features), "tokens": real, "padded_tokens": padded, "flops": flops,
                             "padded_flops": padded_flops})
        return self.collator(features)


# ---- clocks and memory ----


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory():
    """Collect garbage and hand freed heap back to the OS, so the next phase's peak starts from what is live."""
    import torch

    from speedups import return_freed_memory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_freed_memory()


def reset_peak_memory():
    import torch

    release_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: peak since the last reset), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory() -> dict:
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "memory_kind": "cuda_max_allocated"}
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return {"peak_memory_bytes": peak, "memory_kind": "peak_rss_since_phase_start"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory_kind": "peak_rss_of_process"}


def child_peak_rss(code: str) -> int:
    """Peak resident memory of a fresh Python process running code, from its own VmHWM (Linux).

    Not from the child's rusage: Linux counts the memory of the process that forked it (this one) in that.
    """
    import subprocess
    import textwrap

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "vmhwm_bytes"
        wrapped = (f"try:\n{textwrap.indent(code, '    ')}\nfinally:\n    import pathlib, sys\n"
                   f"    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n    import bench\n"
                   f"    pathlib.Path({str(report)!r}).write_text(str(bench.proc_status_bytes('VmHWM')))\n")
        proc = subprocess.run([sys.executable, "-c", wrapped], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"a --process_memory child failed:\n{proc.stderr[-2000:]}")
        return int(report.read_text())


def matmul_peak_flops(device: str, seconds: float = 1.0) -> float:
    """Best rate of a large dense fp32 matmul (TF32 if the run enables it), timed here and now."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    synchronize()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """(wall, process CPU) time at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.marks.append((time.perf_counter(), time.process_time()))

    return StepClock()


# ---- the two formulations ----


@contextmanager
def formulation(reference: bool):
    """While a path's trainer is built and runs: for the reference, every speed-up switched off (the switches that
    speedups.py and train_utils read at build and at run time); the optimized path keeps the switches as set."""
    from speedups import DISABLE_VARIABLE

    previous = os.environ.get(DISABLE_VARIABLE)
    if reference:
        os.environ[DISABLE_VARIABLE] = "all"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DISABLE_VARIABLE, None)
        else:
            os.environ[DISABLE_VARIABLE] = previous


def paper_evaluation_trainer():
    """TaskPrefixTrainer with the paper's evaluation step: a loss forward pass (which accuracy does not need), then
    generation."""
    import torch

    from model_utils import TaskPrefixTrainer

    class PaperEvaluationTrainer(TaskPrefixTrainer):
        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
            with torch.no_grad():
                loss = self.compute_loss(model, self._prepare_inputs(inputs)).detach()  # speed-ups off: two passes
            _, predictions, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            return loss, predictions, labels

    return PaperEvaluationTrainer


# ---- the benchmark ----


class Bench:
    def __init__(self, args: argparse.Namespace, device: str):
        import torch
        from transformers import AutoTokenizer

        self.args, self.device, self.torch = args, device, torch
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-")
        if args.from_pretrained:
            self.tokenizer = AutoTokenizer.from_pretrained(args.from_pretrained)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    def make_model(self):
        """The same initial weights on every call: reloaded, or rebuilt from the seed (no copy kept in memory)."""
        torch = self.torch
        from transformers import T5Config, T5ForConditionalGeneration

        if self.args.from_pretrained:
            from config import StudentConfig
            from students import load_student

            _, _, model = load_student(StudentConfig(from_pretrained=self.args.from_pretrained), self.args.seed)
            return model
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.args.seed)
        vocab = -(-len(self.tokenizer) // 128) * 128  # 32,100 -> 32,128, as the public checkpoints
        config = T5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", dropout_rate=0.1, tie_word_embeddings=False,
                          pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                          decoder_start_token_id=self.tokenizer.pad_token_id, **RANDOM_CONFIGS[self.args.random_init])
        model = T5ForConditionalGeneration(config)
        # t5-v1_1: decoder outputs not rescaled (tie_word_embeddings=False above) and an lm_head of its own, which
        # transformers 5 ties to the input embeddings when it builds T5 from a config.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
        torch.random.set_rng_state(generator_state)
        return model

    def run_config(self, mode: str):
        """The configuration run.py gets from run_argv: its defaults (alpha, learning rate, optimizer, ...) and the
        benchmark's sizes."""
        from config import DataConfig, RunConfig, StudentConfig, TrainingConfig

        a = self.args
        return RunConfig(
            data=DataConfig(dataset=a.dataset, data_dir=a.data_dir, llm="palm" if mode == "task_prefix" else "none"),
            student=StudentConfig(from_pretrained=a.from_pretrained or f"random-{a.random_init}"),
            training=TrainingConfig(
                model_type=mode, seed=a.seed, batch_size=a.batch_size, eval_batch_size=a.eval_batch_size,
                max_input_length=a.max_input_length, max_steps=a.warmup + a.steps, eval_steps=10**9,
                gen_max_len=a.gen_max_len, bf16=a.bf16, report_to=("none",), no_log=True,
            ),
        )

    def run_argv(self, mode: str, from_pretrained: str | None = None) -> list[str]:
        a = self.args
        argv = ["--dataset", a.dataset, "--data_dir", a.data_dir, "--model_type", mode,
                "--from_pretrained", from_pretrained or a.from_pretrained or f"random-{a.random_init}",
                "--llm", "palm" if mode == "task_prefix" else "none", "--batch_size", str(a.batch_size),
                "--max_input_length", str(a.max_input_length), "--max_steps", str(a.warmup + a.steps),
                "--eval_steps", str(10**9), "--gen_max_len", str(a.gen_max_len), "--no_log", "--run", str(a.seed)]
        if a.eval_batch_size:
            argv += ["--eval_batch_size", str(a.eval_batch_size)]
        if a.bf16:
            argv.append("--bf16")
        return argv

    def process_memory(self, mode: str) -> dict:
        """Peak RSS of run.py training this configuration for warmup + steps steps, as a user runs it (one process,
        then a checkpoint and an 8-row evaluation), and of a process that only imports what run.py imports."""
        out = Path(self.tmp.name)
        model_dir = self.args.from_pretrained
        if not model_dir:
            model_dir = str(out / "student")
            if not Path(model_dir).is_dir():
                self.make_model().save_pretrained(model_dir)
                self.tokenizer.save_pretrained(model_dir)
        argv = [str(ROOT / "run.py"), *self.run_argv(mode, model_dir), "--output_dir", str(out / f"run-{mode}"),
                "--max_eval_samples", "8", "--no_log"]
        peak = child_peak_rss(f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')")
        return {"run_py_peak_rss_bytes": peak, "import_rss_bytes": self.import_rss,
                "working_bytes": peak - self.import_rss}

    @functools.cached_property
    def import_rss(self) -> int:
        """Peak RSS of a process that only imports what run.py imports: the same for every mode, so measured once."""
        return child_peak_rss("import run, train_utils, model_utils, speedups, data_utils, metrics")

    def trainer(self, mode: str, training, tokenized, reference: bool):
        """build_trainer as run.py calls it; call it, and use what it gives, within formulation(reference).
        The reference evaluates in batches of --batch_size, with the paper's evaluation step."""
        from transformers.trainer_utils import IntervalStrategy, SaveStrategy

        from model_utils import TaskPrefixTrainer
        from train_utils import build_trainer, training_arguments

        if reference:
            training = replace(training, eval_batch_size=training.batch_size)
        out = Path(self.tmp.name) / mode
        training_args = training_arguments(training, out / "ckpt", out / "log")
        # Training is timed on its own: no evaluation and no checkpoint when it ends (evaluate() is timed apart).
        training_args.eval_strategy, training_args.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
        training_args.load_best_model_at_end = False
        trainer, _ = build_trainer(training, training_args, self.make_model(), self.tokenizer, tokenized,
                                   "text" if self.args.dataset == "cqa" else "equation",
                                   trainer_class=paper_evaluation_trainer() if reference else TaskPrefixTrainer)
        return trainer

    def check_loss(self, mode, training, tokenized) -> dict:
        """Both formulations on one training batch, from the same weights, without dropout, in fp32."""
        torch = self.torch
        optimized = self.trainer(mode, training, tokenized, reference=False)
        with formulation(reference=True):
            reference = self.trainer(mode, training, tokenized, reference=True)
        batch = optimized._prepare_inputs(next(iter(optimized.get_train_dataloader())))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            results = {}
            for name, trainer in (("two_pass", reference), ("optimized", optimized)):
                model = trainer.model.to(optimized.args.device).eval()
                with formulation(reference=name == "two_pass"):
                    loss = trainer.compute_loss(model, batch)
                    loss.backward()
                grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
                results[name] = (loss.item(), grad)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        (ref_loss, ref_grad), (opt_loss, opt_grad) = results["two_pass"], results["optimized"]
        rel = abs(opt_loss - ref_loss) / abs(ref_loss)
        grad_rel = ((opt_grad - ref_grad).norm() / ref_grad.norm()).item()
        del optimized, reference, batch, results, ref_grad, opt_grad
        release_memory()
        return {"two_pass": ref_loss, "optimized": opt_loss, "rel_diff": rel, "grad_rel_diff": grad_rel,
                "equal": rel <= LOSS_RTOL, "rtol": LOSS_RTOL,
                "note": "one training batch, same initial weights, dropout off, fp32 (TF32 off)"}

    def train_once(self, mode, training, tokenized, reference: bool) -> dict:
        a = self.args
        with formulation(reference):
            trainer = self.trainer(mode, training, tokenized, reference)
            counter = CountingCollator(trainer.data_collator, trainer.model.config)
            trainer.data_collator = counter
            clock = step_clock()
            trainer.add_callback(clock)
            reset_peak_memory()
            resident = proc_status_bytes("VmRSS")
            output = trainer.train()
            memory = peak_memory()
        marks, batches = clock.marks, counter.batches[a.warmup : a.warmup + a.steps]
        (wall0, cpu0), (wall1, cpu1) = marks[a.warmup], marks[a.warmup + a.steps]
        step_times = [marks[i + 1][0] - marks[i][0] for i in range(a.warmup, a.warmup + a.steps)]
        seconds = wall1 - wall0
        flops = sum(b["flops"] for b in batches)
        result = {
            "examples_per_s": sum(b["rows"] for b in batches) / seconds,
            "tokens_per_s": sum(b["tokens"] for b in batches) / seconds,
            "seconds": seconds,
            "median_step_s": statistics.median(step_times),
            "cpu_s_per_step": (cpu1 - cpu0) / a.steps,
            "model_flops_per_step": flops / a.steps,
            "padded_flops_per_step": sum(b["padded_flops"] for b in batches) / a.steps,
            "achieved_flops_per_s": flops / seconds,
            "padding_fraction": 1 - sum(b["tokens"] for b in batches) / sum(b["padded_tokens"] for b in batches),
            "train_loss": output.training_loss,
            **memory,
            "rss_at_start_bytes": resident,
        }
        del trainer, output
        release_memory()
        return result

    def evaluate(self, mode, training, tokenized, reference: bool) -> dict:
        with formulation(reference):
            trainer = self.trainer(mode, training, tokenized, reference)
            # The optimized path evaluates the test split sorted by length (build_trainer); the paper, in dataset
            # order.
            test = tokenized["test"] if reference else trainer.eval_dataset["test"]
            reset_peak_memory()
            start = time.perf_counter()
            metrics = trainer.evaluate(eval_dataset=test, metric_key_prefix="test")
            synchronize()
            seconds = time.perf_counter() - start
        result = {"rows": len(test), "batch_size": trainer.args.per_device_eval_batch_size, "seconds": seconds,
                  "rows_per_s": len(test) / seconds, "accuracy": metrics.get("test_accuracy"), **peak_memory()}
        del trainer
        release_memory()
        return result

    def mode(self, mode: str) -> dict:
        from train_utils import prepare_splits
        from views import tokenize_seq2seq

        a = self.args
        config = self.run_config(mode)
        training = config.training
        splits = prepare_splits(config.data, training.seed, self.tokenizer.eos_token)
        if a.eval_rows:
            splits["test"] = splits["test"].select(range(min(a.eval_rows, len(splits["test"]))))
        tokenized = tokenize_seq2seq(splits, self.tokenizer, mode, a.max_input_length)
        report = {"step0_loss": self.check_loss(mode, training, tokenized), "rounds": []}
        for r in range(a.rounds):
            order = ("optimized", "two_pass") if r % 2 == 0 else ("two_pass", "optimized")
            runs = {name: self.train_once(mode, training, tokenized, name == "two_pass") for name in order}
            runs["speedup"] = runs["optimized"]["examples_per_s"] / runs["two_pass"]["examples_per_s"]
            runs["cpu_speedup"] = runs["two_pass"]["cpu_s_per_step"] / runs["optimized"]["cpu_s_per_step"]
            report["rounds"].append(runs)
            print(f"{mode} round {r + 1}: optimized {runs['optimized']['examples_per_s']:.2f} ex/s, two_pass "
                  f"{runs['two_pass']['examples_per_s']:.2f} ex/s ({runs['speedup']:.2f}x)", file=sys.stderr)
        report["train"] = {name: summarize([r[name] for r in report["rounds"]]) for name in ("optimized", "two_pass")}
        report["train"]["speedup"] = statistics.median(r["speedup"] for r in report["rounds"])
        report["train"]["cpu_speedup"] = statistics.median(r["cpu_speedup"] for r in report["rounds"])
        if a.process_memory and self.device == "cpu":
            report["process_memory"] = self.process_memory(mode)
        if a.eval:
            report["eval"] = {"optimized": self.evaluate(mode, training, tokenized, reference=False)}
            if a.eval_reference:
                report["eval"]["two_pass"] = self.evaluate(mode, training, tokenized, reference=True)
                if report["eval"]["optimized"]["batch_size"] != a.batch_size:  # also at the paper's batch size
                    same_batch = replace(training, eval_batch_size=a.batch_size)
                    report["eval"]["same_batch"] = self.evaluate(mode, same_batch, tokenized, reference=False)
                report["eval"]["speedup"] = report["eval"]["two_pass"]["seconds"] / report["eval"]["optimized"]["seconds"]
        return report


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds (peak memory: the largest)."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0] if isinstance(runs[0][key], (int, float))}
    out["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in runs)
    out["memory_kind"] = runs[0]["memory_kind"]
    return out


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{report['config']['model']} on {m['device_name']} ({m['torch_threads']} threads), load average "
          f"{m['load_average_start']} -> {m['load_average_end']}; dense fp32 matmul "
          f"{m['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    header = f"{'mode':12} {'path':10} {'ex/s':>7} {'tok/s':>8} {'step ms':>8} {'cpu s/step':>10} " \
             f"{'GFLOP/s':>8} {'peak MB':>8} {'step-0 loss':>12}"
    print(header)
    print("-" * len(header))
    for mode, result in report["modes"].items():
        for path in ("two_pass", "optimized"):
            t = result["train"][path]
            print(f"{mode:12} {path:10} {t['examples_per_s']:7.2f} {t['tokens_per_s']:8.0f} "
                  f"{t['median_step_s'] * 1e3:8.0f} {t['cpu_s_per_step']:10.2f} "
                  f"{t['achieved_flops_per_s'] / 1e9:8.1f} {t['peak_memory_bytes'] / 2**20:8.0f} "
                  f"{result['step0_loss'][path]:12.6f}")
        loss = result["step0_loss"]
        print(f"{mode:12} speed-up {result['train']['speedup']:.2f}x (CPU time {result['train']['cpu_speedup']:.2f}x); "
              f"model GFLOP/step {result['train']['optimized']['model_flops_per_step'] / 1e9:.1f} "
              f"(padded {result['train']['two_pass']['padded_flops_per_step'] / 1e9:.1f}); step-0 loss rel. diff "
              f"{loss['rel_diff']:.1e} ({'equal' if loss['equal'] else 'DIFFERENT'}), grad {loss['grad_rel_diff']:.1e}")
        process = result.get("process_memory")
        if process:
            print(f"{mode:12} run.py process: peak RSS {process['run_py_peak_rss_bytes'] / 2**20:.0f} MB, of which "
                  f"imports {process['import_rss_bytes'] / 2**20:.0f} MB, working {process['working_bytes'] / 2**20:.0f} MB")
        for path, e in result.get("eval", {}).items():
            if isinstance(e, dict):
                print(f"{mode:12} eval {path:10} {e['rows']} rows (batches of {e['batch_size']}) in {e['seconds']:.1f} s "
                      f"= {e['rows_per_s']:.2f} rows/s, peak {e['peak_memory_bytes'] / 2**20:.0f} MB")


def causal_batches(args, tokenizer, device) -> list[dict]:
    """task_prefix batches of decoder-only sequences from the dataset's train rows and PaLM rationales."""
    from datasets import DatasetDict

    from data_utils import load_data
    from model_utils import CausalViewsCollator
    from views import tokenize_causal

    train = load_data(args.dataset, args.data_dir, llm="palm")["train"].rename_column("llm_rationale", "rationale")
    rows = train.select(range(min(len(train), args.batch_size * (args.warmup + args.steps))))
    tokenized = tokenize_causal(DatasetDict({"train": rows}), tokenizer, "task_prefix", args.max_input_length)
    tokenized = list(tokenized["train"])
    collate = CausalViewsCollator(tokenizer)
    batches = [collate(tokenized[i : i + args.batch_size]) for i in range(0, len(tokenized), args.batch_size)]
    return [{view: {k: t.to(device) for k, t in batch[view].items()} for view in ("pred", "expl")} for batch in batches]


def causal_bench(args, device: str) -> dict:
    """Loss, backward and time per training step of a decoder-only student: the fused path against the plain one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from model_utils import LABEL_PAD, one_pass_per_view
    from students import FAMILIES

    shape = dict(CAUSAL_CONFIGS[args.random_causal])
    config = AutoConfig.for_model(shape.pop("model_type"), num_hidden_layers=args.causal_layers, **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    # The tokenizer only turns text into ids; they all fall within the larger vocabulary of the model.
    batches = causal_batches(args, AutoTokenizer.from_pretrained(args.tokenizer), device)
    alpha = 0.5
    paths = {
        "optimized": lambda b: FAMILIES["causal"].fast_loss(model, [b["pred"], b["expl"]], [alpha, 1 - alpha]),
        "two_pass": lambda b: one_pass_per_view(model, [b["pred"], b["expl"]], [alpha, 1 - alpha])[0],
    }
    model.eval()
    with torch.no_grad():
        check = {name: float(loss(batches[0])) for name, loss in paths.items()}
    rel = abs(check["optimized"] - check["two_pass"]) / abs(check["two_pass"])
    model.train()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
    timings = {name: [] for name in paths}
    cpu_times = {name: [] for name in paths}  # process CPU time: less disturbed than wall time on shared cores
    memory = {}
    for r in range(args.rounds):
        for name in (("optimized", "two_pass") if r % 2 == 0 else ("two_pass", "optimized")):
            reset_peak_memory()
            for i, batch in enumerate(batches):
                synchronize()
                start, cpu_start = time.perf_counter(), time.process_time()
                with autocast:
                    loss = paths[name](batch)
                loss.backward()
                model.zero_grad(set_to_none=True)
                synchronize()
                if i >= args.warmup:
                    timings[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
            memory[name] = max(memory.get(name, 0), peak_memory()["peak_memory_bytes"])
    rows = args.batch_size * 2  # both views
    result = {name: {"median_step_s": statistics.median(t), "examples_per_s": args.batch_size / statistics.median(t),
                     "cpu_s_per_step": statistics.median(cpu_times[name]), "peak_memory_bytes": memory[name]}
              for name, t in timings.items()}
    targets = sum(int((b[v]["labels"] != LABEL_PAD).sum()) for b in batches for v in ("pred", "expl"))
    positions = sum(b[v]["input_ids"].numel() for b in batches for v in ("pred", "expl"))
    return {
        "model": {"shape": args.random_causal, "layers": args.causal_layers, "vocab_size": config.vocab_size,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "step0_loss": {**check, "rel_diff": rel, "equal": rel <= LOSS_RTOL},
        "train": {**result, "speedup": result["two_pass"]["median_step_s"] / result["optimized"]["median_step_s"],
                  "cpu_speedup": result["two_pass"]["cpu_s_per_step"] / result["optimized"]["cpu_s_per_step"],
                  "memory_ratio": result["optimized"]["peak_memory_bytes"] / result["two_pass"]["peak_memory_bytes"]},
        "logit_rows_per_step": {"two_pass": positions / len(batches), "optimized": targets / len(batches)},
        "rows_per_step": rows,
    }


def causal_main(args, device: str) -> int:
    from train_utils import library_versions

    report = {"config": vars(args), "device": device, "versions": library_versions(), **causal_bench(args, device)}
    t, loss = report["train"], report["step0_loss"]
    print(f"decoder-only {args.random_causal} x {args.causal_layers} layers ({report['model']['parameters']:,} "
          f"parameters, vocabulary {report['model']['vocab_size']:,}), {args.dataset}, batch {args.batch_size}, "
          f"{device}")
    for name in ("optimized", "two_pass"):
        print(f"  {name:9s} {t[name]['examples_per_s']:8.2f} ex/s  step {t[name]['median_step_s']:.3f} s "
              f"(CPU {t[name]['cpu_s_per_step']:.3f} s)  "
              f"peak memory {t[name]['peak_memory_bytes'] / 2**30:.2f} GiB  "
              f"logit rows/step {report['logit_rows_per_step'][name]:.0f}")
    print(f"  speed-up {t['speedup']:.2f}x (CPU time {t['cpu_speedup']:.2f}x), memory {t['memory_ratio']:.2f}x; "
          f"step-0 loss {loss['optimized']:.6f} vs {loss['two_pass']:.6f} ({loss['rel_diff']:.1e} relative, "
          f"must be <= {LOSS_RTOL:g})")
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\nreport in {args.out}")
    return 0 if loss["equal"] else 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, str(ROOT))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 1
    if args.random_causal:
        return causal_main(args, device)
    from train_utils import library_versions

    load_start = os.getloadavg()
    bench = Bench(args, device)
    peak_start = matmul_peak_flops(device)
    model = bench.make_model()
    report = {
        "config": {**vars(args), "model": args.from_pretrained or f"random {args.random_init}",
                   "parameters": sum(p.numel() for p in model.parameters())},
        "machine": {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda"
                    else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "versions": library_versions()},
        "modes": {},
    }
    del model
    for mode in ("task_prefix", "standard") if args.mode == "both" else (args.mode,):
        report["modes"][mode] = bench.mode(mode)
    peak_end = matmul_peak_flops(device)
    report["machine"].update({"matmul_flops_per_s": max(peak_start, peak_end), "matmul_flops_per_s_start": peak_start,
                              "matmul_flops_per_s_end": peak_end,
                              "load_average_start": [round(x, 2) for x in load_start],
                              "load_average_end": [round(x, 2) for x in os.getloadavg()]})
    for result in report["modes"].values():
        for path in ("optimized", "two_pass"):
            t = result["train"][path]
            t["fraction_of_matmul_peak"] = t["achieved_flops_per_s"] / report["machine"]["matmul_flops_per_s"]
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\nreport in {args.out}")
    return 0 if all(r["step0_loss"]["equal"] for r in report["modes"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
