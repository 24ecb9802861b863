"""Option names the configs choose from and the trainers validate against (no JAX)."""

from __future__ import annotations

TRAIN_MODES = ("finetune", "linear_probe")        # all parameters / the head alone
INIT_KINDS = ("scratch", "pretrain", "converted")  # where a fine-tuned encoder starts
LOSSES = ("bce", "ce", "ce_ignore", "ce_weighted")  # downstream losses (tasks.finetune)
FINETUNE_SCHEDULES = ("warmup_cosine", "plateau", "constant")
PRETRAIN_SCHEDULES = ("warmup_cosine", "constant")
NONFINITE = ("stop", "skip")                        # what a non-finite pretraining loss does
EVALUATORS = ("classification", "segmentation", "change_detection")


def check(name: str, value: str, allowed: tuple[str, ...]) -> None:
  """Raises ValueError naming the config key ``name`` if ``value`` is not in ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
