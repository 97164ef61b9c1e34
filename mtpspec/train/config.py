"""The options of a drafter training run (`mtpspec train-drafter` maps its flags onto them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    target: str | None = None  # None = the default model
    work_dir: str | None = None  # checkpoints + shards (default: <out>.work)
    draft_tokens: int = 4
    num_layers: int = 1
    hidden_size: int | None = None  # default: the target's width (head initialised from the target)
    intermediate_size: int | None = None
    clustered: bool = False
    num_centroids: int | None = None
    centroid_top_k: int | None = None
    self_distill: bool = True
    distill_max_new_tokens: int = 192
    distill_batch: int = 32
    self_instruct_temperature: float = 1.0  # the `self-instruct` recipe's sampling (see self_instruct.py)
    self_instruct_top_p: float = 1.0
    self_instruct_max_tokens: int = 128  # a generated prompt not ending its turn within this is dropped
    max_len: int = 384
    shard_size: int = 64
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: float = 1.0
    replay: float = 0.5
    max_steps: int | None = None
    time_budget: float | None = None  # seconds of training (building shards included)
    full_vocab_loss: bool = False
    soft_labels: bool = False  # teacher: the target top-k distribution where shards hold it (else its argmax)
    feature_weight: float = 0.2
    train_head: bool | None = None  # None: frozen when copied from the target, else trained
    checkpoint_every: float = 300.0  # seconds
    eval_every: float | None = None  # seconds (None: only at the end)
    eval_prompts: str | None = None  # .jsonl ({"prompt"}) or .txt (one per line)
    eval_max_new_tokens: int = 64
    eval_limit: int = 16
    save_dtype: str = "float16"
    bf16: bool = False  # bfloat16 autocast for the drafter's forward/backward (weights stay fp32)
    init_from: str | None = None  # a drafter folder to start from (fine-tuning) instead of a fresh init
    replay_from: list[str] = field(default_factory=list)  # other runs' work dirs (or shards/ folders) to replay
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        """Raise InputError naming the first option out of its range."""
        if self.draft_tokens < 1:
            raise InputError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise InputError("batch_size and shard_size must be >= 1")
        if not 0 <= self.replay < 1:
            raise InputError(f"replay must be in [0, 1), got {self.replay}")
        if not self.self_instruct_temperature > 0:
            raise InputError(f"self_instruct_temperature must be > 0, got {self.self_instruct_temperature}")
        if not 0 < self.self_instruct_top_p <= 1:
            raise InputError(f"self_instruct_top_p must be in (0, 1], got {self.self_instruct_top_p}")
        if self.self_instruct_max_tokens < 1:
            raise InputError(f"self_instruct_max_tokens must be >= 1, got {self.self_instruct_max_tokens}")
