"""What a training run saves: its resumable checkpoint (weights, optimiser, where the schedule is,
RNG states, elapsed time) and the drafter folder it produces."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import MtpspecError
from ..models.drafter import MTPDrafter
from .optim import Optimiser
from .shards import save_atomic


# TrainConfig fields a resumed run must keep besides its resolved data specs (which already hold the
# one command's prompt count): they decide which samples exist, how they are cut into shards and
# batches, and the drafter's shape
RESUME_FIXED = ("seed", "max_len", "shard_size", "batch_size", "replay", "epochs", "replay_from",
                "self_distill", "distill_max_new_tokens", "self_instruct_temperature",
                "self_instruct_top_p", "self_instruct_max_tokens", "draft_tokens", "num_layers",
                "hidden_size", "intermediate_size", "clustered", "num_centroids", "centroid_top_k",
                "more_prompts")


@dataclass
class RunState:
    """Where a run is: steps taken, round and step in round (see schedule.py), training seconds,
    per-step records, held-out evaluations, the step whose drafter is the output and how many
    chunks of data it has (the one command's data grows: `TrainConfig.grows`)."""

    step: int = 0
    round: int = 0
    round_step: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    kept_step: int | None = None  # the held-out evaluation kept as the output (trainer._eval_and_keep)
    chunks: int = 1


class Checkpoint:
    """The checkpoint file of a run; resuming restores the run exactly (global RNGs included)."""

    def __init__(self, path: Path, config: dict, n_samples: int, data_specs: list[str] | None = None) -> None:
        """config: the run's TrainConfig as a dict; data_specs: the data it trains on, resolved
        (`TrainConfig.data_specs`: what an empty --data means changes between versions)."""
        self.path, self.config, self.n_samples = path, config, n_samples
        self.data_specs = list(data_specs) if data_specs is not None else list(config.get("data") or [])

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: RunState, drafter: MTPDrafter, opt: Optimiser) -> None:
        save_atomic({"config": self.config, "data_specs": self.data_specs, "drafter": drafter.state_dict(),
                     "optimizer": opt.state_dict(),
                     **asdict(state), "n_samples": self.n_samples,
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, self.path)

    def load(self, drafter: MTPDrafter, opt: Optimiser, read=None) -> RunState:
        """The run's state restored into drafter and opt. read(fn): how the checkpoint file is
        read (data-parallel runs: by rank 0, sent to every rank); default: fn()."""
        st = (read or (lambda fn: fn()))(self._read)
        self.check_same_run(st.get("config") or {}, st.get("data_specs"))
        if st["n_samples"] != self.n_samples:
            raise MtpspecError(f"{self.path}: the checkpoint was made with {st['n_samples']} samples, the data "
                               f"now gives {self.n_samples}: resume with the same --data and options")
        drafter.load_state_dict(st["drafter"])
        opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"]["torch"])
        random.setstate(st["rng"]["python"])
        if "kept_step" not in st and st.get("evals"):  # older runs kept the highest held-out mean
            st["kept_step"] = max(st["evals"], key=lambda e: e["mean_accepted_length"])["step"]
        return RunState(**{f: st[f] for f in RunState.__dataclass_fields__ if f in st})  # older: fewer fields

    def check_same_run(self, saved: dict, saved_specs: list[str] | None = None) -> None:
        """Refuse to resume with other data or with options that fix its shards, the batch schedule
        or the drafter's shape changed (others, such as --time-budget or --eval-every, may change):
        the shards already built and the schedule's position would no longer mean the same samples.
        saved_specs: the checkpoint's resolved data; checkpoints from before it was stored trained an
        empty --data on `self-instruct:N` (a chat target) or `self-text:N`."""
        if saved_specs is None and "data" in saved:
            base_model = bool(self.data_specs) and self.data_specs[0].startswith("self-text:")
            saved_specs = list(saved["data"]) or [f"{'self-text' if base_model else 'self-instruct'}:"
                                                  f"{saved.get('self_instruct_prompts')}"]
        changed = []
        if saved_specs is not None and saved_specs != self.data_specs:
            changed.append(f"data {saved_specs} -> {self.data_specs}: resume with "
                           + " ".join(f"--data {d}" for d in saved_specs))
        changed += [f"{key} {saved[key]!r} -> {self.config[key]!r}" for key in RESUME_FIXED
                    if key in saved and key in self.config and saved[key] != self.config[key]]
        if changed:
            raise MtpspecError(f"{self.path}: the run was made with other options ({'; '.join(changed)}): resume "
                               "with the options it was started with")

    def _read(self) -> dict:
        if not self.path.is_file():
            raise MtpspecError(f"{self.path}: no checkpoint to resume from")
        return torch.load(self.path, weights_only=False)


def write_drafter(drafter: MTPDrafter, folder: Path, *, dtype: torch.dtype, draft_tokens: int, info: dict,
                  full_head: bool = False) -> Path:
    """A copy of `drafter` in `dtype` as a drafter folder (gemma4_assistant format; with full_head a
    clustered head is written as the full head) and `info` as its training.json."""
    from ..drafter_checkpoint import save_drafter

    d = copy.deepcopy(drafter).to(dtype).eval()
    if full_head and d.cfg.clustered:
        d = d.full_head_copy().eval()
    save_drafter(d, folder, draft_tokens=draft_tokens, target_model_type=None)
    (Path(folder) / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(folder)
