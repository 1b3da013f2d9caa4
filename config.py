"""The configuration of a training run, typed and complete: what run.py's flags parse into and what the library
takes. Grouped by what uses each value; the defaults are defined here once (run.py's flags take theirs from here).

No torch here: run.py answers a mistyped flag before torch loads.
"""

from dataclasses import dataclass, fields
from pathlib import Path

from data_utils import DATA_URL

# The original's generation_max_length; predict.py generates one token less by default (the start token counts).
GEN_MAX_LEN = 64
OPTIMIZER_NAMES = ("AdamW", "Adafactor")
# --kd_loss's divergences (distill.DIVERGENCES, named here so run.py checks its flags before torch loads).
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
# --report_to name -> (the package it needs, how to install it).
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "uv sync (it is a core dependency)"),
    "wandb": ("wandb", "uv sync --extra wandb (or pip install wandb)"),
    "mlflow": ("mlflow", "uv sync --extra mlflow (or pip install mlflow)"),
}


@dataclass(frozen=True)
class DataConfig:
    """Which rows the run trains and is scored on (train_utils.prepare_splits)."""

    dataset: str
    llm: str = "palm"  # the teacher: palm, gpt, none, dataset or an annotate.py folder
    label_type: str = "gt"  # gt: ground-truth labels; llm: the teacher's
    rationales: str = "first"  # which teacher samples become rationale rows (rationales.py)
    custom_metric: str | None = None
    subsample: float = 1.0
    fixed_valid: bool = False
    max_eval_samples: int | None = None
    tolerant_equations: bool = False
    data_dir: str = "./datasets"
    download: bool = False
    data_url: str = DATA_URL


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters of rank r instead of training all weights; r None trains all weights."""

    r: int | None = None
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None  # None: the family's attention and MLP projections (students.py)

    @property
    def enabled(self) -> bool:
        return self.r is not None

    def name(self) -> str:
        """The run folder part that keeps LoRA runs apart from full finetuning and from each other."""
        targets = "+".join(self.targets) if self.targets else "default"
        return f"lora_r{self.r}_a{self.alpha:g}_d{self.dropout:g}_{targets}"


@dataclass(frozen=True)
class StudentConfig:
    """Which model is trained and how it is loaded (students.load_student)."""

    from_pretrained: str = "google/t5-v1_1-base"
    chat_template: bool = False  # decoder-only students: prompts in the tokenizer's chat template
    parallelize: bool = False  # one model split across all visible GPUs
    lora: LoraConfig = LoraConfig()


@dataclass(frozen=True)
class TrainingConfig:
    """How the student is trained and evaluated (train_utils.training_arguments, build_trainer)."""

    model_type: str = "task_prefix"  # task_prefix: label and rationale views; standard: label only
    alpha: float = 0.5  # weight of the label loss; 1 - alpha weighs the rationale loss
    seed: int = 0  # run.py --run: data subsample, shuffling, dropout, LoRA initialisation
    batch_size: int = 64
    eval_batch_size: int | None = None  # None: a multiple of batch_size (train_utils.EVAL_BATCH_FACTOR)
    grad_steps: int = 1
    max_input_length: int = 1024
    eval_steps: int = 250
    max_steps: int = 10000
    lr: float = 5e-5
    optimizer_name: str = "AdamW"
    gen_max_len: int = GEN_MAX_LEN
    output_rationale: bool = False
    eval_rationales: bool = False  # after training: the selected model's test rationales scored (rationale_eval.py)
    bf16: bool = False
    gradient_checkpointing: bool = False
    select_on: str = "test"  # test: the paper's best test accuracy; valid: the best valid checkpoint's
    save_total_limit: int = 1
    report_to: tuple[str, ...] = ("tensorboard",)
    no_log: bool = False
    deepspeed: str | None = None
    local_rank: int | None = None  # passed by some launchers; the LOCAL_RANK variable they also set is what counts
    # Token-level distillation (distill.py): beta * kd_loss added to the paper's loss; beta 0 trains without it.
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    kd_loss: str = KD_LOSSES[0]
    kd_teacher: str | None = None  # an online teacher: local folder or hub id of the student's family and vocabulary
    kd_logits: str | None = None  # a teacher_logits.py store of the teacher's top-k log-probabilities

    def effective_batch_size(self, data_parallel: int) -> int:
        """Rows per optimizer step, for data_parallel model copies each taking batch_size rows per micro-batch."""
        return self.batch_size * self.grad_steps * data_parallel


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes and what it does with earlier results and the tokenisation cache."""

    output_dir: str = "."
    resume: bool = False
    overwrite: bool = False
    dump_data: str | None = None  # write the prepared rows to this file and train nothing
    cache_dir: str | None = None
    no_cache: bool = False


# run.py's flags in the order it defines them, which results.json's "config" keeps.
FLAGS = (
    "dataset", "from_pretrained", "model_type", "label_type", "llm", "custom_metric", "rationales", "alpha",
    "batch_size", "eval_batch_size", "grad_steps", "max_input_length", "eval_steps", "max_steps", "lr",
    "optimizer_name", "run", "subsample", "max_eval_samples", "gen_max_len", "fixed_valid", "tolerant_equations",
    "dump_data", "output_rationale", "eval_rationales", "bf16", "gradient_checkpointing", "chat_template", "lora_r", "lora_alpha",
    "lora_dropout", "lora_targets", "report_to", "no_log", "parallelize", "deepspeed", "local_rank", "data_dir",
    "output_dir", "select_on", "save_total_limit", "resume", "overwrite", "download", "data_url", "cache_dir",
    "no_cache", "kd_weight", "kd_temperature", "kd_loss", "kd_teacher", "kd_logits",
)
GROUPS = {"data": DataConfig, "student": StudentConfig, "lora": LoraConfig, "training": TrainingConfig,
          "output": OutputConfig}


def flag_name(group: str, name: str) -> str:
    """The run.py flag of a field: its own name, but --run for the seed and --lora_<field> for LoRA's."""
    if group == "lora":
        return f"lora_{name}"
    return "run" if name == "seed" else name


# flag -> (group, field), in FLAGS order.
FLAG_FIELDS: dict[str, tuple[str, str]] = dict(sorted(
    ((flag_name(group, f.name), (group, f.name)) for group, cls in GROUPS.items() for f in fields(cls)
     if f.name != "lora"),
    key=lambda item: FLAGS.index(item[0]),
))


@dataclass(frozen=True)
class RunConfig:
    """One training run, complete: run.py parses its flags into this, and from there on nothing sees the flags."""

    data: DataConfig
    student: StudentConfig = StudentConfig()
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig = OutputConfig()

    def groups(self) -> dict:
        return {"data": self.data, "student": self.student, "lora": self.student.lora, "training": self.training,
                "output": self.output}

    def flags(self) -> dict:
        """{flag: value} as run.py's parser gives them (lists, not tuples): what results.json's "config",
        run_args.json and the trackers record."""
        groups = self.groups()
        values = {}
        for flag, (group, name) in FLAG_FIELDS.items():
            value = getattr(groups[group], name)
            values[flag] = list(value) if isinstance(value, tuple) else value
        return values

    @classmethod
    def from_flags(cls, flags: dict) -> "RunConfig":
        """The configuration of run.py's parsed flags ({flag: value}, every flag of FLAG_FIELDS)."""
        unknown = sorted(flags.keys() - FLAG_FIELDS.keys())
        if unknown:
            raise ValueError(f"flags without a place in RunConfig: {', '.join(unknown)}")
        values: dict[str, dict] = {group: {} for group in GROUPS}
        for flag, (group, name) in FLAG_FIELDS.items():
            value = flags[flag]
            values[group][name] = tuple(value) if isinstance(value, list) else value
        return cls(
            data=DataConfig(**values["data"]),
            student=StudentConfig(lora=LoraConfig(**values["lora"]), **values["student"]),
            training=TrainingConfig(**values["training"]),
            output=OutputConfig(**values["output"]),
        )

    def config_dir(self, data_parallel: int) -> str:
        """The experiment's folder name, as in the paper's code, so sweeps over any flag land side by side;
        data_parallel: the model copies of this launch (train_utils.data_parallel_size)."""
        data, training = self.data, self.training
        model_name = Path(self.student.from_pretrained.rstrip("/")).name
        parts = [
            data.dataset, model_name, training.model_type, data.llm, data.subsample, data.label_type, training.alpha,
            training.max_input_length, training.effective_batch_size(data_parallel), training.optimizer_name,
            training.lr,
        ]
        if training.select_on != "test":
            parts.append(f"select_{training.select_on}")
        if data.rationales != "first":  # the paper's choice keeps the paper's folder names
            parts.append(f"rationales_{data.rationales}")
        # Runs on other data or scored otherwise than the paper's land apart from the faithful ones.
        if data.fixed_valid:
            parts.append("fixed_valid")
        if data.tolerant_equations:
            parts.append("tolerant_equations")
        if self.student.chat_template:
            parts.append("chat_template")
        if self.student.lora.enabled:
            parts.append(self.student.lora.name())
        if training.kd_weight > 0:
            teacher = training.kd_teacher or ""
            source = f"teacher_{Path(teacher.rstrip('/')).name}" if teacher else \
                f"logits_{Path(str(training.kd_logits).rstrip('/')).name}"
            parts.append(f"kd{training.kd_weight:g}_{training.kd_loss}_t{training.kd_temperature:g}_{source}")
        return "/".join(str(part) for part in parts)

    def run_dirs(self, data_parallel: int) -> tuple[Path, Path]:
        """(checkpoint folder, TensorBoard folder): <out>/ckpts/<config>/<run>, <out>/logs/<config>/<run>."""
        base = Path(self.output.output_dir)
        config = self.config_dir(data_parallel)
        seed = str(self.training.seed)
        return base / "ckpts" / config / seed, base / "logs" / config / seed


def default_flag_values() -> dict:
    """{flag: default} for run.py's parser, read from the dataclasses above (dataset has none)."""
    defaults = RunConfig(data=DataConfig(dataset="")).flags()
    del defaults["dataset"]
    return defaults
