"""`train_drafter`: data -> (self-distillation) -> target activations -> unrolled training ->
checkpoints / resume -> held-out evaluation -> a drafter folder in our (gemma4_assistant) format.

The `Trainer` runs the loop and owns a run's parts: the samples (data.py; prompts the target
writes itself: self_instruct.py) cut into activation shards (shards.py, harvest.py), the batch
schedule (schedule.py), the objective (objective.py) and its optimiser (optim.py), held-out
evaluation (heldout.py), checkpoints and output (checkpointing.py), progress (progress.py) and
stop requests (stop.py). Answers may come from an OpenAI-compatible server (remote.py), and
torchrun runs it data-parallel (distributed.py: ranks share the harvest and each step's batch).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError, MtpspecError
from ..kernels import bulk_matmuls, cpu_has_bf16
from ..models.drafter import DrafterConfig
from ..prompts_file import read_prompts
from . import distributed, self_instruct
from .checkpointing import Checkpoint, RunState, write_drafter
from .config import TrainConfig
from .curve import plot_training_curve
from .data import Sample, build_samples
from .distributed import Group, SharedShardStore
from .drafter_init import starting_drafter
from .harvest import Activations, build_shard
from .heldout import NOISE_Z, HeldOut, difference_standard_error, within_noise
from .memory import release_freed_memory
from .objective import Objective
from .optim import Optimiser
from .progress import Progress
from .remote import AnswerCache, RemoteTeacher, Sampling, stderr_log
from .schedule import Schedule
from .shards import ShardStore, read_external_shards
from .shortlist import MIN_RECALL, Shortlist, fit_on_answers
from .stop import StopRequest


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    is_main: bool = True  # rank 0 (or the only process): the one that wrote the output
    kept_step: int | None = None  # the step of the held-out evaluation whose drafter is the output


def _step_record(step: int, loss: torch.Tensor, stats: list[tuple[int, int, int]], clustered: bool) -> dict:
    """A step's history entry: loss, trained positions and argmax accuracy per drafting step, and
    for a clustered head the fraction of labels inside the chosen clusters."""
    rec = {"step": step, "loss": float(loss.detach()), "positions": [n for n, _, _ in stats],
           "acc": [c / n if n else 0.0 for n, c, _ in stats]}
    if clustered:
        n_all = sum(n for n, _, _ in stats)
        rec["cluster_hit"] = sum(h for _, _, h in stats) / n_all if n_all else 0.0
    return rec


def bf16_auto(device: str) -> bool:
    """Whether training steps on `device` default to bfloat16 autocast: where it computes bfloat16
    natively (CPUs with AVX512_BF16 or AMX, where a step of the default model's drafter took 3.4 s
    against 9.5 s in fp32 on a 2-core Xeon, the same loss to 3 digits; CUDA GPUs with bfloat16).
    On other CPUs bfloat16 matmuls fall back to slow paths (~18x slower than fp32)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_has_bf16()
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


class Trainer:
    def __init__(self, cfg: TrainConfig, engine=None, group: Group | None = None) -> None:
        """group: the data-parallel process group (distributed.py); None = this process alone."""
        cfg.check()
        t_begin = time.time()  # a time budget is the whole run's: loading and writing prompts count
        if cfg.bf16 is None:
            cfg = replace(cfg, bf16=bf16_auto(cfg.device))
            if group is None or group.is_main:
                print(f"train-drafter: {'bfloat16 autocast' if cfg.bf16 else 'float32'} training steps "
                      f"(this device {'computes' if cfg.bf16 else 'does not compute'} bfloat16 natively; "
                      f"--bf16 / --no-bf16 choose)", file=sys.stderr, flush=True)
        elif cfg.bf16 and torch.device(cfg.device).type == "cpu" and not cpu_has_bf16():
            print("train-drafter: --bf16 ignored: this CPU has no bfloat16 instructions (AVX512_BF16 or AMX), "
                  "where bfloat16 autocast trains ~18x slower than float32", file=sys.stderr, flush=True)
            cfg = replace(cfg, bf16=False)
        self.cfg = cfg
        self.group = g = group or Group()
        if engine is None:
            from ..api import load

            engine = load(cfg.target, device=cfg.device)
        self.engine = engine
        self.target = engine.model
        if cfg.max_len > self.target.cfg.max_position:
            raise InputError(f"--max-len {cfg.max_len} is longer than the target's context "
                             f"({self.target.cfg.max_position} tokens)")
        self.out = Path(cfg.out)
        self.work = Path(cfg.work_dir) if cfg.work_dir else self.out.with_name(self.out.name + ".work")
        dcfg = DrafterConfig.for_target(self.target.cfg, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                        clustered=cfg.clustered_for(self.target.cfg.vocab_size),
                                        intermediate_size=cfg.intermediate_size,
                                        num_centroids=cfg.num_centroids, centroid_top_k=cfg.centroid_top_k)
        t0 = time.time()
        self.drafter = starting_drafter(dcfg, self.target, seed=cfg.seed, train_head=cfg.train_head,
                                        init_from=cfg.init_from)
        if dcfg.clustered and not cfg.init_from and cfg.progress and g.is_main:
            print(f"train-drafter: clustered head: {dcfg.vocab_size} tokens in {dcfg.num_centroids} clusters "
                  f"(balanced k-means, {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        if cfg.answer_shortlist is True and self.drafter.masked_embedding is None:
            raise InputError("--answer-shortlist needs a clustered drafter head (--clustered): the shortlist is made "
                             "of its token clusters")
        if cfg.hard_negatives and (self.drafter.masked_embedding is None or cfg.full_vocab_loss
                                   or self.drafter.model.embed_tokens.weight.requires_grad):
            raise InputError("--hard-negatives needs a clustered drafter head over the target's own (frozen) "
                             "embedding and the sampled loss (not --full-vocab-loss)")
        self.opt = Optimiser(self.drafter, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                             grad_clip=cfg.grad_clip, max_steps=cfg.max_steps, time_budget=cfg.time_budget)
        self.objective = Objective(cfg.draft_tokens, cfg.full_vocab_loss, cfg.feature_weight, cfg.soft_labels,
                                   cfg.bf16, cfg.device, acceptance_weight=cfg.acceptance_weight,
                                   acceptance_verify=cfg.acceptance_verify, hard_negatives=cfg.hard_negatives)
        # prompts the target writes (self-instruct / self-text, the one-command recipe's default) and no
        # --eval-prompts: evaluate on a split of them (taken when the first such spec is read)
        self.split = cfg.eval_limit if cfg.eval_prompts is None and g.is_main else 0
        self.generated_heldout: list[str] = []
        self.written: list[str] = []  # every prompt the target wrote for this run, held-out ones too
        self.chat = self_instruct.has_chat_template(engine.tokenizer)
        self.grows = cfg.grows()  # more prompts once all are trained on (`_more_data`)
        specs = cfg.data_specs(chat=self.chat)
        t_data = time.time()
        samples = g.from_main(lambda: self._samples(0))
        self.data_seconds = time.time() - t_data  # writing the first prompts: the estimate of a chunk's
        self.chunk_seconds: float | None = None   # ... until a chunk of more data has been written live
        self.shard_seconds = 0.0  # how long the last shard took to build (answers included)
        self.seen_ids = {tuple(s.ids) for s in samples}  # a later chunk's samples are new ones
        store, extra = (ShardStore, {}) if g.world == 1 else (SharedShardStore, {"group": g})
        self.shards = store(samples, cfg.shard_size, self.work / "shards", self._build_shard,
                            read_external_shards(cfg.replay_from), **extra)
        self.micro_batch = cfg.micro_batch_size or -(-cfg.batch_size // g.world)
        distributed.check_micro_batches(cfg.batch_size, self.micro_batch, g.world)
        distributed.broadcast_parameters(g, self.drafter)
        self.teacher: RemoteTeacher | None = None
        self._shortlist: Shortlist | None | bool = False  # False: not decided yet (`_answer_shortlist`)
        self.schedule = Schedule(self.shards, batch_size=cfg.batch_size, replay=cfg.replay, epochs=cfg.epochs,
                                 seed=cfg.seed, limited=cfg.max_steps is not None or cfg.time_budget is not None)
        self.checkpoint = Checkpoint(self.work / "checkpoint.pt", asdict(cfg), len(samples), specs)
        prompts = (read_prompts(cfg.eval_prompts)[: cfg.eval_limit] if cfg.eval_prompts
                   else self.generated_heldout or None)
        # rank 0 evaluates (and writes the output)
        self.heldout = (HeldOut(engine, prompts, cfg.draft_tokens, cfg.eval_max_new_tokens) if prompts and g.is_main
                        else None)
        self.state = RunState()
        self.stop = StopRequest()
        self.setup_seconds = time.time() - t_begin

    def _samples(self, chunk: int) -> list[Sample]:
        """The samples of the run's data (chunk 0) or of its chunk-th batch of more prompts
        (`TrainConfig.data_specs`), seeded with seed + chunk."""
        cfg, seed = self.cfg, self.cfg.seed + chunk
        return build_samples(self.engine.tokenizer, cfg.data_specs(chat=self.chat, chunk=chunk),
                             self_distill=cfg.self_distill, max_len=cfg.max_len, seed=seed,
                             self_instruct=lambda n, documents=False: self._self_instruct(n, documents, seed))

    def _more_data(self, progress: Progress | None) -> None:
        """The next chunk of the one command's data, appended as new shards: the run has trained on
        every shard and its budget has not run out, so the target writes more prompts (a new seed;
        near-duplicates of any it wrote before are dropped) rather than the run replaying what it
        has seen. A chunk the target can write nothing new for ends the growth (replay follows).
        Deterministic: a resumed run rebuilds its chunks the same way (`RunState.chunks`). Every
        rank calls it at the same step; rank 0 writes the prompts and sends the samples."""
        st = self.state
        t0 = time.time()

        def fresh_samples() -> tuple[list[Sample], str]:
            try:
                return [s for s in self._samples(st.chunks) if tuple(s.ids) not in self.seen_ids], \
                    "every sample a duplicate of one trained on"
            except InputError as e:
                return [], str(e)

        fresh, why = self.group.from_main(fresh_samples)
        st.chunks += 1
        first = self.shards.n_shards
        if not fresh:
            self.grows = False
            msg = f"more data: none ({why}); replaying the {first} shards from now on"
        else:
            self.seen_ids.update(tuple(s.ids) for s in fresh)
            self.shards.extend(fresh)
            msg = (f"more data: chunk {st.chunks - 1}, {len(fresh)} new samples, shards {first + 1}-"
                   f"{self.shards.n_shards} ({time.time() - t0:.0f}s to write the prompts)")
        if progress is not None:  # written live (not rebuilt on resume from stored prompts)
            self.chunk_seconds = time.time() - t0
            progress.n_shards = self.shards.n_shards
            progress.write(msg)

    def _room_for_more_data(self) -> bool:
        """Whether the time budget has room for another chunk of data: writing its prompts (as long
        as the last chunk took, or the first prompts scaled to a chunk's size) and answering its first
        shard (as long as the last shard took), with the final evaluation still to come. Without
        room the run replays what it has: a chunk it cannot train on is time lost."""
        cfg = self.cfg
        if cfg.time_budget is None:
            return True
        write = (self.chunk_seconds if self.chunk_seconds is not None
                 else self.data_seconds * cfg.chunk_prompts() / cfg.self_instruct_prompts)
        return self.state.elapsed + write + self.shard_seconds + self._reserve() < cfg.time_budget

    def _self_instruct(self, n: int, documents: bool, seed: int) -> list[str]:
        """n prompts written by the target, user messages (the `self-instruct` recipe) or openings
        of documents (`self-text`, documents=True), sampled with `seed`, generated once and kept in the work dir: a
        resumed or repeated run reads them. Without --eval-prompts, `split` more are written and
        held out for evaluation (`generated_heldout`), never trained on. Always with the full LM
        head: the answers' shortlist leaves out 13% of the probability of the openings Gemma 3
        270M writes (drafters/README.md, `drafters/shortlist_truncation.py`)."""
        cfg, eng = self.cfg, self.engine
        split, self.split = self.split, 0  # one split, for the first self-written spec
        if split:
            prompts = self._self_instruct(n + split, documents, seed)
            if len(prompts) > split:
                self.generated_heldout = prompts[-split:]
                return prompts[:-split]
            return prompts
        opts = dict(temperature=cfg.self_instruct_temperature, top_p=cfg.self_instruct_top_p, seed=seed,
                    max_tokens=cfg.self_instruct_max_tokens)
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.progress else None

        def generate(journal):
            with bulk_matmuls():  # sampled prompts for training: bfloat16 GEMMs where the CPU has them
                return self_instruct.generate_prompts(eng.model, eng.tokenizer, n, **opts, batch_size=cfg.distill_batch,
                                                      documents=documents, exclude=self.written,
                                                      eos_ids=eng.eos_ids, log=log, journal=journal)

        path = self_instruct.prompts_path(self.work, n, **opts, documents=documents)
        prompts = self_instruct.load_or_generate(path, generate, log, self_instruct.recipe(documents))
        self.written += prompts
        return prompts

    def _build_shard(self, samples: list[Sample], label: str) -> tuple[list[Activations], dict]:
        cfg = self.cfg
        if self.group.world > 1:
            label = f"rank {self.group.rank}: {label}"
        report = {"answers_from": cfg.distill_url or "target"}
        shortlist = self._answer_shortlist()
        if shortlist is not None:
            report["answer_head"] = {"shortlist_clusters": shortlist.top_k, "clusters": shortlist.weight.shape[0],
                                     "heldout_recall": shortlist.recall}
        t0 = time.time()
        acts = build_shard(self.engine, samples, list(dict.fromkeys(self.drafter.cfg.layer_types)),
                           max_new_tokens=cfg.distill_max_new_tokens, max_len=cfg.max_len, slots=cfg.distill_batch,
                           label=label if cfg.progress else None, report=report,
                           respond=self._remote_answers if cfg.distill_url else None, shortlist=shortlist)
        self.shard_seconds = time.time() - t0
        return acts, report

    def _answer_shortlist(self) -> Shortlist | None:
        """The shortlist LM head (shortlist.py) the target answers prompts with once the run's first
        shard, answered with the full head, has fitted it; None before that, when it is off
        (`answer_shortlist` False; None, the default, is on with a clustered head) or when no shortlist size
        reaches `MIN_RECALL` on held-out positions of that shard. Fitted once per process (seeded:
        a resumed run fits the same one)."""
        cfg = self.cfg
        if self._shortlist is not False:
            return self._shortlist
        masked = self.drafter.masked_embedding
        if cfg.distill_url or not cfg.self_distill or masked is None or cfg.answer_shortlist is False:
            self._shortlist = None
            return None
        if not self.shards.loaded or not self.shards.loaded[0]:
            return None  # the first shard: the full head answers it (and labels the fit)
        t0 = time.time()
        first = self.shards.loaded[0]
        n_clusters = masked.num_centroids
        sl = fit_on_answers(self.target, masked.token_ordering, first, n_clusters=n_clusters, seed=cfg.seed,
                            always=self._stop_tokens())
        used = sl.recall is not None and sl.recall >= MIN_RECALL
        if cfg.progress and self.group.is_main:
            print(f"answer shortlist: the top {sl.top_k} of {n_clusters} token clusters hold the target's argmax at "
                  f"{sl.recall or 0:.2%} of held-out positions of shard 1 ({time.time() - t0:.0f}s to fit); "
                  + ("later shards are answered with it" if used else
                     f"below {MIN_RECALL:.0%}: the full LM head answers"), file=sys.stderr, flush=True)
        self._shortlist = sl.to(self.target.device) if used else None
        return self._shortlist

    def _stop_tokens(self) -> list[int]:
        """The tokens that end an answer or a prompt the target writes: EOS, and a chat target's
        end of a user turn."""
        stops = set(self.engine.eos_ids)
        if self.chat:
            try:
                stops |= self_instruct.user_turn(self.engine.tokenizer, self.engine.eos_ids).stop_ids
            except InputError:  # a template that cannot render a user turn: it writes no prompts either
                pass
        return sorted(stops)

    def _remote_answers(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        """Answers from the --distill-url server (remote.py), cached in <work>/distill."""
        cfg = self.cfg
        if self.teacher is None:
            prefix = f"rank {self.group.rank}: " if self.group.world > 1 else ""
            self.teacher = RemoteTeacher(
                cfg.distill_url, self.engine.tokenizer, self.target.cfg.vocab_size,
                AnswerCache(self.work / "distill", self.group.rank), model=cfg.distill_model,
                concurrency=cfg.distill_concurrency, timeout=cfg.distill_timeout, retries=cfg.distill_retries,
                sampling=Sampling(cfg.distill_temperature, cfg.distill_top_p, cfg.distill_top_k, cfg.seed),
                log=stderr_log(prefix) if cfg.progress else None)
        return self.teacher.answers(prompts, max_tokens)

    def request_stop(self) -> None:
        """Finish the current step, checkpoint and return from `run` (what SIGTERM does); the run
        can be resumed."""
        self.stop.request()

    def run(self, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> TrainResult:
        """Train until the schedule, max_steps or the time budget ends the run, or a stop request;
        `on_step(record)` is called after every step. Then the drafter folder is written: the
        kept held-out evaluation's drafter (`_eval_and_keep`), or without held-out prompts the last one."""
        main = self.group.is_main
        t_run = time.time()
        if resume:
            self.state = self.checkpoint.load(self.drafter, self.opt, read=self.group.from_main)
            chunks, self.state.chunks = self.state.chunks, 1
            while self.state.chunks < chunks:  # the chunks of more data it had, rebuilt as they were
                self._more_data(None)
        elif self.group.from_main(self.checkpoint.exists):
            raise MtpspecError(f"{self.checkpoint.path} exists: pass --resume to continue it, or choose another "
                               f"--out/--work-dir")
        # the budget counts this process's setup too (loading the target, writing the first prompts;
        # on resume, reading them back and rebuilding the chunks)
        self.state.elapsed += self.setup_seconds + (time.time() - t_run)
        if self.cfg.time_budget is not None and self.state.elapsed >= self.cfg.time_budget and not self.state.step and main:
            print(f"train-drafter: the time budget ({self.cfg.time_budget / 60:.1f} min) ran out before the first "
                  f"step ({self.setup_seconds / 60:.1f} min of setup: loading the target, writing prompts); raise "
                  f"--time-budget or lower --prompts", file=sys.stderr, flush=True)
        progress = Progress(self.cfg.progress and main, self.cfg.max_steps, self.state.step, self.shards.n_shards,
                            silent=not main)
        try:
            with self.stop.on_sigterm():
                self._train(progress, on_step)
        except KeyboardInterrupt:
            pass
        finally:
            self._save_checkpoint()
            progress.close()
            if self.teacher is not None:
                self.teacher.close()
                self.teacher = None
        st = self.state
        if self.stop.requested or not main:  # checkpointed: leave quickly (resume later); rank 0 writes
            pass
        elif self.heldout is not None:
            if not st.evals or st.evals[-1]["step"] != st.step:
                self._eval_and_keep(progress)
        else:
            self.save_output()
        return TrainResult(self.out, st.step, st.elapsed, st.history, st.evals, main, st.kept_step)

    def _limit_reached(self) -> bool:
        cfg, st = self.cfg, self.state
        return (cfg.max_steps is not None and st.step >= cfg.max_steps
                or cfg.time_budget is not None and st.elapsed + self._reserve() >= cfg.time_budget)

    def _reserve(self) -> float:
        """Seconds of a time budget kept for after the last step: the final held-out evaluation, as
        long as the evaluations took, their median (one slowed by another process on the cores,
        20 s -> 280 s on a 2-core EPYC, would otherwise end training minutes early; rank 0
        evaluates; the ranks agree through `sync_state`)."""
        if self.heldout is None or not self.state.evals:
            return 0.0
        return statistics.median(e["eval_seconds"] for e in self.state.evals)

    def _eval_interval(self) -> float | None:
        """Seconds between held-out evaluations from now: `eval_every`, but at most half of what is
        left of a time budget, so a run whose budget ends before `eval_every` still evaluates once
        before its end and keeps that evaluation's time for the final one (`_reserve`; without it
        the final evaluation ran past the budget). None: only the final evaluation."""
        cfg = self.cfg
        if not cfg.eval_every:
            return None
        if cfg.time_budget is None:
            return cfg.eval_every
        return min(cfg.eval_every, max(0.0, cfg.time_budget - self.state.elapsed) / 2)

    def _train(self, progress: Progress, on_step: Callable[[dict], None] | None) -> None:
        cfg, st = self.cfg, self.state
        last_ckpt = last_eval = time.time()
        eval_every = self._eval_interval()
        t_start = time.time() - st.elapsed
        while True:
            st.elapsed, stop, done = distributed.sync_state(self.group, st.elapsed, self.stop.requested,
                                                            self._limit_reached())
            if stop:
                self.stop.request()
            if done or self.stop.requested:
                break
            if self.grows and st.round == self.shards.n_shards and st.round_step == 0:
                if self.group.from_main(self._room_for_more_data):  # rank 0's clocks decide for all
                    self._more_data(progress)
                else:
                    self.grows = False
                    progress.write(f"more data: no room in the time budget for another chunk; replaying the "
                                   f"{self.shards.n_shards} shards from now on")
            n_steps, b_new = self.schedule.round_plan(st.round)
            if not self.schedule.has_round(st.round, n_steps):
                break
            if st.round_step >= n_steps:
                st.round += 1
                st.round_step = 0
                continue
            rec = self._train_step(self.schedule.batch(st.round, st.round_step, b_new))
            st.step += 1
            st.round_step += 1
            st.elapsed = time.time() - t_start
            rec["elapsed"] = round(st.elapsed, 1)
            rec["round"] = st.round
            st.history.append(rec)
            progress.step(rec, st.round, st.evals[-1]["mean_accepted_length"] if st.evals else None)
            if on_step is not None:
                on_step(rec)
            now = time.time()
            if eval_every is not None and now - last_eval >= eval_every and self.heldout is not None:
                self._eval_and_keep(progress)
                last_eval = time.time()
            if now - last_ckpt >= cfg.checkpoint_every:
                self._save_checkpoint()
                if self.heldout is None and self.group.is_main:
                    self.save_output()
                last_ckpt = time.time()

    def _train_step(self, items: list[Activations]) -> dict:
        """One optimiser step on a global batch: the mean of its micro-batches' losses; this rank
        takes its share of the micro-batches and the gradients are summed over the ranks."""
        st, g = self.state, self.group
        self.drafter.train()
        parts = distributed.micro_batches(items, self.micro_batch)
        self.opt.zero_grad()
        loss_sum, stats = 0.0, [(0, 0, 0)] * self.cfg.draft_tokens
        for part in parts[g.rank :: g.world]:
            loss, s = self.objective(self.drafter, self.target, part)
            if torch.is_tensor(loss) and loss.requires_grad:
                (loss / len(parts)).backward()
            loss_sum += float(loss.detach() if torch.is_tensor(loss) else loss) / len(parts)
            stats = [tuple(a + b for a, b in zip(x, y)) for x, y in zip(stats, s)]
        loss_sum, stats = distributed.reduce_record(g, loss_sum, stats)
        distributed.reduce_gradients(g, self.opt.params)
        self.opt.update(st.step, st.elapsed)
        if torch.device(self.cfg.device).type == "cpu":
            release_freed_memory()
        return _step_record(st.step, torch.tensor(loss_sum), stats, self.drafter.cfg.clustered)

    def _save_checkpoint(self) -> None:
        if self.group.is_main:
            self.checkpoint.save(self.state, self.drafter, self.opt)

    def evaluate(self) -> dict:
        """Held-out mean accepted length of the drafter as it is now (recorded in the run's evals);
        {} without held-out prompts."""
        if self.heldout is None:
            return {}
        ev = {"step": self.state.step, "elapsed": round(self.state.elapsed, 1), **self.heldout.measure(self.drafter)}
        self.state.evals.append(ev)
        return ev

    def _eval_and_keep(self, progress: Progress) -> None:
        """Evaluate on the held-out prompts and write the drafter as the run's output unless this
        evaluation is worse than the best so far by more than the held-out noise (`within_noise`):
        later steps have trained on more, so a dip within the noise keeps the later one."""
        st = self.state
        best = max(st.evals, key=lambda e: e["mean_accepted_length"], default=None)
        ev = self.evaluate()
        keep = st.kept_step is None or best is None or within_noise(ev, best)
        why = "kept" if keep else (
            f"not kept: below step {best['step']}'s {best['mean_accepted_length']:.3f} by more than {NOISE_Z:g} "
            f"standard errors ({difference_standard_error(ev, best):.3f}); the output stays step {st.kept_step}")
        progress.write(f"eval step {ev['step']}: mean accepted length {ev['mean_accepted_length']:.3f}, per position "
                       f"{ev['acceptance_per_position']} ({ev['eval_seconds']}s); {why}")
        if keep:
            st.kept_step = ev["step"]
            self.save_output()
            if self.drafter.cfg.clustered:  # the same weights with the full head, for comparison
                self.save_output(self.work / "best-full-head", full_head=True)
        self._save_checkpoint()

    def distill_report(self) -> dict | None:
        """How the answers of the shards built so far agree with the target: per shard and in all,
        the fraction of answer tokens where the target's own greedy choice differs (None: no
        answered prompts)."""
        meta = {r: m for r, m in sorted(self.shards.meta.items()) if m.get("answer_tokens")}
        if not meta:
            return None
        n, d = sum(m["answer_tokens"] for m in meta.values()), sum(m["differ"] for m in meta.values())
        return {"answers_from": sorted({m.get("answers_from", "target") for m in meta.values()}),
                "answer_tokens": n, "differ": d, "differ_fraction": d / n,
                "shards": [{"shard": r, "answer_tokens": m["answer_tokens"], "differ": m["differ"],
                            "differ_fraction": m["differ"] / m["answer_tokens"]} for r, m in meta.items()]}

    def save_output(self, folder: Path | None = None, full_head: bool = False) -> Path:
        """The drafter as it is now, as a drafter folder (default: the run's output) with its
        training.json and, once evaluated, its training curve (training.png)."""
        from ..api import resolve_dtype

        st = self.state
        info = {"steps": st.step, "training_seconds": round(st.elapsed, 1), "config": asdict(self.cfg),
                "evals": st.evals, "kept_step": st.kept_step, "last": st.history[-1] if st.history else None,
                "world_size": self.group.world, "micro_batch_size": self.micro_batch,
                "distill": self.distill_report()}
        out = write_drafter(self.drafter, folder or self.out, dtype=resolve_dtype(self.cfg.save_dtype),
                            draft_tokens=self.cfg.draft_tokens, info=info, full_head=full_head)
        plot_training_curve(info, out / "training.png")  # held-out tau against the run's minutes (curve.py)
        return out


def train_drafter(cfg: TrainConfig | None = None, *, resume: bool = False, engine=None, **kwargs) -> TrainResult:
    """Train an MTP drafter for a target (see `TrainConfig`); returns where it was written and the
    training history. `resume=True` continues the run in `work_dir` from its last checkpoint.
    Under torchrun (WORLD_SIZE > 1) the ranks train data-parallel (distributed.py)."""
    if cfg is None:
        cfg = TrainConfig(**kwargs)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    group = distributed.from_env(cfg.device)
    finished = False
    try:
        if group.world > 1:
            cfg = replace(cfg, device=group.device(cfg.device))
        result = Trainer(cfg, engine, group).run(resume=resume)
        finished = True
        return result
    finally:
        group.close(finished)


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train_drafter"]
