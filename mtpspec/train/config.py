"""The options of a drafter training run (`mtpspec train-drafter` maps its flags onto them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError


DEFAULT_SELF_INSTRUCT = 2000  # prompts when no data is given (`data_specs`)
SELF_INSTRUCT_SHARE = 0.7  # of them written by the target itself; the rest from the `tasks` recipe
SELF_TEXT_SHARE = 0.5  # the same for a target without a chat template: openings it writes, the rest `tasks`
MORE_PROMPTS_SHARE = 0.25  # each later chunk of the one command's data: this share of the first's prompts


@dataclass
class TrainConfig:
    data: list[str]  # empty: the target's own prompts (`data_specs`)
    out: str
    target: str | None = None  # None = the default model
    work_dir: str | None = None  # checkpoints + shards (default: <out>.work)
    draft_tokens: int = 4
    num_layers: int = 1
    hidden_size: int | None = None  # default: the target's width (head initialised from the target)
    intermediate_size: int | None = None
    clustered: bool | None = None  # None: a clustered head when the vocabulary has >= 32768 tokens
    num_centroids: int | None = None
    centroid_top_k: int | None = None
    self_distill: bool = True
    distill_max_new_tokens: int = 192
    # rows the target decodes at once (self-distillation, self-instruct): on a 2-core Xeon the default
    # model answered 448 / 536 / 578 tok/s with 64 / 128 / 256 (bulk mode, 256 prompts)
    distill_batch: int = 128
    # answer with the shortlist LM head (shortlist.py) once the first shard, answered with the full
    # head, has fitted it; needs a clustered drafter head. None: on exactly when the drafter head is
    # clustered (on Gemma 3 270M, 2 hours on the same machine class: 1.929 with it, 1.780 without,
    # drafters/README.md)
    answer_shortlist: bool | None = None
    self_instruct_temperature: float = 1.0  # the `self-instruct` recipe's sampling (see self_instruct.py)
    self_instruct_top_p: float = 1.0
    self_instruct_max_tokens: int = 128  # a generated prompt not ending its turn within this is dropped
    self_instruct_prompts: int = DEFAULT_SELF_INSTRUCT  # used when `data` is empty
    # without `data`, in a run with a time budget or max_steps: once every sample is trained on, the
    # target writes and answers more prompts (`data_specs(chunk=1, 2, ...)`) instead of replaying
    more_prompts: bool = True
    max_len: int = 384
    shard_size: int = 128  # samples per shard: at most this many answers are generated at once
    # 4, not 8: one pass over self-distilled data learns more from twice the (half-size) steps at the
    # same compute (drafters/README.md, "Learning rate, batch size and replay")
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: float = 1.0
    replay: float = 0.5
    max_steps: int | None = None
    time_budget: float | None = None  # seconds of the whole run: setup (prompt writing), shards, steps, final eval
    full_vocab_loss: bool = False
    soft_labels: bool = False  # teacher: the target top-k distribution where shards hold it (else its argmax)
    acceptance_weight: float = 0.0  # share of the acceptance objective (expected accepted length) in the loss, [0, 1]
    acceptance_verify: str = "greedy"  # its per-step acceptance: "greedy" q(argmax) or "sampled" sum min(p, q)
    feature_weight: float = 0.2
    # the drafter's own top tokens per trained position join the sampled loss's candidates (hard
    # negatives; objective.drafted_tokens): a clustered head over the target's frozen embedding only
    hard_negatives: int = 0
    train_head: bool | None = None  # None: frozen when copied from the target, else trained
    checkpoint_every: float = 300.0  # seconds
    eval_every: float | None = 600.0  # seconds between held-out evaluations (None: only at the end)
    eval_prompts: str | None = None  # .jsonl ({"prompt"}) or .txt (one per line)
    eval_max_new_tokens: int = 64
    eval_limit: int = 16
    save_dtype: str = "float16"
    # bfloat16 autocast for the drafter's forward/backward (weights stay fp32); None: where the device
    # computes bfloat16 natively (`bf16_auto`)
    bf16: bool | None = None
    init_from: str | None = None  # a drafter folder to start from (fine-tuning) instead of a fresh init
    replay_from: list[str] = field(default_factory=list)  # other runs' work dirs (or shards/ folders) to replay
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    # self-distillation through an OpenAI-compatible server (remote.py); None: the local target answers
    distill_url: str | None = None
    distill_model: str | None = None  # the served model's name (checked against /v1/models)
    distill_concurrency: int = 8  # requests in flight
    distill_temperature: float = 0.0  # the server's sampling of answers: 0 = greedy
    distill_top_p: float = 1.0
    distill_top_k: int = 0  # 0 = off (not sent)
    distill_timeout: float = 600.0  # seconds per request
    distill_retries: int = 5  # retries of a request that timed out or got HTTP 408/429/5xx (exponential backoff)
    # data-parallel training (torchrun; distributed.py): the global batch is cut into micro-batches of
    # this many sequences, spread over the ranks; None = batch_size / world size (one per rank)
    micro_batch_size: int | None = None

    def data_specs(self, chat: bool = True, chunk: int = 0) -> list[str]:
        """The data to train on: `data`, or without it the one-command recipe: N =
        `self_instruct_prompts` prompts, answered by the target, held-out evaluation on a split of
        the ones it writes. A chat target: 70% `self-instruct` (user messages it writes) and 30%
        `tasks` (templated requests of kinds self-written prompts rarely hold); at equal training
        time this mix beat self-instruct alone on the broad benchmark, 1.483 against 1.424 over 12
        categories, 8 of them up (drafters/README.md). A target without a chat template
        (`chat=False`, a base model): 50% `self-text` (openings of documents it writes) and 50%
        `tasks` as plain text; at equal time this beat self-text alone on the broad benchmark, 1.575
        against 1.424, 11 of 12 categories up (drafters/README.md). `chunk` c > 0: the recipe of
        the c-th batch of more prompts (`grows`), `chunk_prompts()` of them."""
        if self.data:
            return list(self.data)
        n = self.chunk_prompts() if chunk else self.self_instruct_prompts
        recipe, share = ("self-instruct", SELF_INSTRUCT_SHARE) if chat else ("self-text", SELF_TEXT_SHARE)
        own = max(1, round(share * n))
        return [f"{recipe}:{own}"] + ([f"tasks:{n - own}"] if n > own else [])

    def chunk_prompts(self) -> int:
        """Prompts in each later chunk of the one command's data (`grows`): MORE_PROMPTS_SHARE of
        the first's, at least a shard."""
        return max(self.shard_size, round(MORE_PROMPTS_SHARE * self.self_instruct_prompts))

    def grows(self) -> bool:
        """Whether the run writes more prompts once all are trained on: the one command (no `data`)
        with `more_prompts`, in a run a time budget or max_steps ends (without one, `epochs` does)."""
        return not self.data and self.more_prompts and (self.time_budget is not None or self.max_steps is not None)

    def clustered_for(self, vocab_size: int) -> bool:
        """Whether the drafter gets a clustered head: `clustered`, or for None a large vocabulary."""
        return self.clustered if self.clustered is not None else vocab_size >= 32768

    def check(self) -> None:
        """Raise InputError naming the first option out of its range."""
        if self.draft_tokens < 1:
            raise InputError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if self.batch_size < 1 or self.shard_size < 1 or self.distill_batch < 1:
            raise InputError("batch_size, shard_size and distill_batch must be >= 1")
        if self.self_instruct_prompts < 1:
            raise InputError(f"the number of prompts (--prompts) must be >= 1, got {self.self_instruct_prompts}")
        if not 0 <= self.replay < 1:
            raise InputError(f"replay must be in [0, 1), got {self.replay}")
        if not self.self_instruct_temperature > 0:
            raise InputError(f"self_instruct_temperature must be > 0, got {self.self_instruct_temperature}")
        if not 0 < self.self_instruct_top_p <= 1:
            raise InputError(f"self_instruct_top_p must be in (0, 1], got {self.self_instruct_top_p}")
        if self.self_instruct_max_tokens < 1:
            raise InputError(f"self_instruct_max_tokens must be >= 1, got {self.self_instruct_max_tokens}")
        w = self.acceptance_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
            raise InputError(f"acceptance_weight must be in [0, 1] (the acceptance objective's share of the loss), "
                             f"got {self.acceptance_weight}")
        if isinstance(self.hard_negatives, bool) or not isinstance(self.hard_negatives, int) or self.hard_negatives < 0:
            raise InputError(f"hard_negatives must be an integer >= 0 (0 = off), got {self.hard_negatives!r}")
        if self.acceptance_verify not in ("greedy", "sampled"):
            raise InputError(f"acceptance_verify must be 'greedy' or 'sampled', got {self.acceptance_verify!r}")
        self._check_distill()

    def _check_distill(self) -> None:
        if self.distill_url is not None and not self.self_distill:
            raise InputError("distill_url (--distill-url) answers prompts for self-distillation: drop --no-self-distill")
        if self.distill_url is None and (self.distill_model is not None or self.distill_temperature != 0
                                         or self.distill_top_p != 1 or self.distill_top_k != 0):
            raise InputError("distill_model and the distill sampling settings apply to answers from a server: "
                             "give --distill-url")
        if self.distill_concurrency < 1:
            raise InputError(f"distill_concurrency must be >= 1, got {self.distill_concurrency}")
        if not 0 <= self.distill_temperature <= 2:
            raise InputError(f"distill_temperature must be in [0, 2] (0 = greedy), got {self.distill_temperature}")
        if not 0 < self.distill_top_p <= 1:
            raise InputError(f"distill_top_p must be in (0, 1], got {self.distill_top_p}")
        if self.distill_top_k < 0:
            raise InputError(f"distill_top_k must be >= 0 (0 = off), got {self.distill_top_k}")
        if not self.distill_timeout > 0:
            raise InputError(f"distill_timeout must be > 0 seconds, got {self.distill_timeout}")
        if self.distill_retries < 0:
            raise InputError(f"distill_retries must be >= 0, got {self.distill_retries}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise InputError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
