"""recipes/finetune.py as a module (recipes are scripts, not a package), and the arguments that shrink the
embedded default to a few seconds: 64 generated samples, 12 steps of 8, evaluation at the end."""

import importlib.util
import os


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("finetune", os.path.join(REPO, "recipes", "finetune.py"))
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)

TINY = [
    "--synthetic_train_size", "64", "--synthetic_eval_size", "16", "--max_steps", "12",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--logging_steps", "1",
    "--eval_strategy", "no", "--save_strategy", "no", "--warmup_steps", "0", "--disable_tqdm", "true",
]  # fmt: skip


def losses(trainer) -> list[float]:
    """Training losses logged by `trainer`, in order."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
