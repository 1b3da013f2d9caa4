"""Experiment trackers for run.py --report_to: the Trainer's own integrations, plus what they do not log themselves.

The Trainer logs training loss and each evaluation's accuracies to every tracker asked for. RunTracking adds the
run's own configuration (run.py's flags: method, teacher, alpha, fraction, seed, ...) and, with each test
evaluation, the figure the paper reports: the best test accuracy so far (and, under --select_on valid, the test
accuracy at the best valid accuracy so far).
"""

import json
from collections.abc import Callable

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

CONFIG_KEY = "dss"  # the run's flags go under this name, apart from the Trainer's own arguments


def flat_config(config: dict) -> dict[str, str | int | float | bool]:
    """Flag values as trackers store parameters: scalars as they are, anything else (lists, None) as text."""
    return {key: value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
            for key, value in config.items()}


def config_to_tensorboard(callbacks: list, config: dict) -> None:
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            text = json.dumps(config, indent=2, default=str)
            callback.tb_writer.add_text(f"{CONFIG_KEY}_config", f"```\n{text}\n```")


def config_to_wandb(callbacks: list, config: dict) -> None:
    import wandb

    if wandb.run is not None:
        wandb.run.config.update({CONFIG_KEY: flat_config(config)}, allow_val_change=True)


def config_to_mlflow(callbacks: list, config: dict) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_params({f"{CONFIG_KEY}.{key}": value for key, value in flat_config(config).items()})


# One per config.TRACKERS name.
CONFIG_WRITERS: dict[str, Callable[[list, dict], None]] = {
    "tensorboard": config_to_tensorboard,
    "wandb": config_to_wandb,
    "mlflow": config_to_mlflow,
}


class RunTracking(TrainerCallback):
    """Put first among the trainer's callbacks, so what it adds to an evaluation's logs reaches every tracker.

    `paper_metrics(log_history)` gives the figures to add once a test accuracy is in the history."""

    def __init__(self, callbacks: list, config: dict, paper_metrics: Callable[[list[dict]], dict[str, float]]):
        self.callbacks, self.config, self.paper_metrics = callbacks, config, paper_metrics
        self.config_sent = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        # The trackers start in on_train_begin; the first log comes after, and before any evaluation.
        if not self.config_sent:
            for name in args.report_to:
                if name in CONFIG_WRITERS:
                    CONFIG_WRITERS[name](self.callbacks, self.config)
            self.config_sent = True
        if logs is not None and "eval_test_accuracy" in logs:
            logs.update({f"eval_{key}": value for key, value in self.paper_metrics(state.log_history).items()})


def track_run(trainer, config: dict, paper_metrics: Callable[[list[dict]], dict[str, float]]) -> None:
    """Give the trainer's trackers the run's config and the paper's figures (see RunTracking)."""
    callbacks = trainer.callback_handler.callbacks
    # Callbacks run in list order and the trackers' own come before any added: this one must see the logs first.
    callbacks.insert(0, RunTracking(callbacks, config, paper_metrics))
