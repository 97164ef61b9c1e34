"""Drafter training: `train_drafter(TrainConfig(...))` or `mtpspec train-drafter` (see trainer.py)."""

from .config import TrainConfig
from .data import DataBuilder, Sample, build_samples, heldout_prompts
from .self_instruct import generate_prompts
from .trainer import Trainer, TrainResult, train_drafter

__all__ = ["TrainConfig", "Trainer", "TrainResult", "train_drafter", "DataBuilder", "Sample", "build_samples",
           "heldout_prompts", "generate_prompts"]
