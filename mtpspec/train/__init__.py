"""Drafter training: `train_drafter(TrainConfig(...))` or `mtpspec train-drafter` (see trainer.py)."""

from .data import DataBuilder, Sample, build_samples, heldout_prompts
from .trainer import TrainConfig, Trainer, TrainResult, train_drafter

__all__ = ["TrainConfig", "Trainer", "TrainResult", "train_drafter", "DataBuilder", "Sample", "build_samples",
           "heldout_prompts"]
