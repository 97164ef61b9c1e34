"""`mtpspec train-drafter`: the command (registered in mtpspec/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MtpspecError
from .config import DEFAULT_SELF_INSTRUCT


def train_drafter_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output drafter folder (gemma4_assistant format).")],
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Training data (repeatable; default, the one command: --prompts prompts, 70% self-instruct (written by the target itself, with held-out evaluation on a split of them) and 30% tasks; for a target without a chat template 50% self-text, openings of documents it writes, and 50% tasks as plain text): a .jsonl of chats/prompts/texts, a text file or folder, or a recipe: chitchat[:N] (prompts), chitchat-text[:N] (whole chats as text), humaneval[:N], instructions[:N], python-stdlib[:N], self-instruct[:N] (N prompts, default 1000, written by the target itself: Magpie), self-text[:N] (N openings of documents the target writes, continued as plain text: for base models), tasks[:N] (templated translate / summarize / extract / math / role-play / write / rewrite / reason / code requests).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", "-m", help="Target checkpoint folder or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Checkpoints and activation shards (default: OUT.work).")] = None,
    draft_tokens: Annotated[int, typer.Option("--draft-tokens", "-k", help="K: drafting steps unrolled in training, written as num_assistant_tokens.")] = 4,
    layers: Annotated[int, typer.Option("--layers", help="Drafter layers.")] = 1,
    hidden_size: Annotated[Optional[int], typer.Option("--hidden-size", help="Drafter width (default: the target's; the head is then the target's own embedding, frozen).")] = None,
    clustered: Annotated[Optional[bool], typer.Option("--clustered/--no-clustered", help="Clustered head (balanced k-means token_ordering + trained centroids); default: when the vocabulary has >= 32768 tokens.")] = None,
    num_centroids: Annotated[Optional[int], typer.Option("--num-centroids")] = None,
    centroid_top_k: Annotated[Optional[int], typer.Option("--centroid-top-k")] = None,
    self_distill: Annotated[bool, typer.Option("--self-distill/--no-self-distill", help="Train on the target's own (greedy) responses to the data's prompts.")] = True,
    distill_tokens: Annotated[int, typer.Option("--distill-tokens", help="Max response tokens generated per prompt.")] = 192,
    distill_batch: Annotated[int, typer.Option("--distill-batch", help="Sequences the target decodes at once when it answers a shard's prompts or writes self-instruct prompts (more rows use the cores better; each costs a KV cache of --max-len tokens).")] = 128,
    answer_shortlist: Annotated[Optional[bool], typer.Option("--answer-shortlist/--no-answer-shortlist", help="Answer prompts with a shortlist LM head after the first shard: the target's exact logits of the few token clusters a scorer fitted on the first shard's answers ranks highest (~1.7-2.4x faster answering for a 262k vocabulary; the answers are the target's greedy ones wherever its argmax is shortlisted, >= 99% of held-out positions or it is not used). Needs a clustered drafter head (vocabularies of 32768 tokens or more). Default: on exactly when the head is clustered (2 hours on Gemma 3 270M: 1.929 with it, 1.780 without, on the same machine class; drafters/README.md).")] = None,
    self_instruct_temperature: Annotated[float, typer.Option("--self-instruct-temperature", help="Sampling temperature of the prompts the target writes (self-instruct recipe); seeded by --seed.")] = 1.0,
    self_instruct_top_p: Annotated[float, typer.Option("--self-instruct-top-p", help="Top-p of the prompts the target writes (1 = off).")] = 1.0,
    prompts: Annotated[int, typer.Option("--prompts", help="Without --data (the one command): how many prompts to train on, 70% written by the target itself (self-instruct) and 30% from the tasks recipe; a target without a chat template writes 50% as openings of documents (self-text), the rest from tasks. With --more-prompts the run writes more once these are trained on.")] = DEFAULT_SELF_INSTRUCT,
    more_prompts: Annotated[bool, typer.Option("--more-prompts/--no-more-prompts", help="Without --data, in a run that --time-budget or --max-steps ends: once every prompt is trained on, the target writes a quarter of --prompts more (a new seed, none it wrote before), answers them and trains on them, again and again, instead of replaying what it has seen (the time budget counts the writing; under torchrun rank 0 writes).")] = True,
    self_instruct_tokens: Annotated[int, typer.Option("--self-instruct-tokens", help="Max tokens of a prompt the target writes; one not ending its turn within them is dropped.")] = 128,
    max_len: Annotated[int, typer.Option("--max-len", help="Max tokens per training sequence.")] = 384,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per activation shard (the prompts of a shard are answered together, --distill-batch at a time).")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = 4,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over each new shard.")] = 1.0,
    replay: Annotated[float, typer.Option("--replay", help="Fraction of each batch replayed from earlier shards.")] = 0.5,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps")] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Minutes for the whole run: loading the target, writing and answering prompts, training and the final held-out evaluation (the median time of the evaluations is kept for it); a chunk of --more-prompts starts only if the budget has room to write it and answer its first shard. With --resume: the total over the run's processes.")] = None,
    full_vocab_loss: Annotated[bool, typer.Option("--full-vocab-loss", help="Cross-entropy over the whole vocabulary (default: over the batch's target top-k candidates).")] = False,
    soft_labels: Annotated[bool, typer.Option("--soft-labels/--hard-labels", help="Teacher: the target's top-8 distribution (soft) or only its argmax (hard, default).")] = False,
    acceptance_weight: Annotated[float, typer.Option("--acceptance-weight", help="Share in [0, 1] of the loss given to the acceptance objective, which maximises the expected number of drafts accepted per K-step chain (from the drafter's per-step acceptance probabilities); the cross-entropy keeps the rest, which keeps early training stable. 0 = cross-entropy only (default), 1 = acceptance only.")] = 0.0,
    hard_negatives: Annotated[int, typer.Option("--hard-negatives", min=0, help="With a clustered head (the target's embedding, frozen): the drafter's own top N tokens at each trained position join the sampled cross-entropy's candidates, so tokens outside the target's top-8 that it would draft are pushed down where they are wrong. 0 = off.")] = 0,
    acceptance_verify: Annotated[str, typer.Option("--acceptance-verify", help="The acceptance objective's per-step acceptance: greedy (the drafter's probability of the target's argmax: greedy verification, default) or sampled (sum over tokens of min(p, q), p = the target's top-8 distribution: speculative sampling).")] = "greedy",
    eval_prompts: Annotated[Optional[Path], typer.Option("--eval-prompts", help="Held-out prompts (.jsonl with 'prompt' or .txt, one per line): mean accepted length is measured on them and the latest drafter kept unless it is worse than the best by more than their noise (default: --eval-limit prompts the target writes, held out of the self-instruct data).")] = None,
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help="Held-out prompts evaluated (the first N of --eval-prompts, or N generated prompts held out of the self-instruct data).")] = 16,
    eval_every: Annotated[float, typer.Option("--eval-every", help="Minutes between held-out evaluations (the curve in training.png; the latest kept unless worse than the best beyond noise), at most half of what is left of --time-budget; 0 = only at the end.")] = 10.0,
    checkpoint_every: Annotated[float, typer.Option("--checkpoint-every", help="Minutes between checkpoints.")] = 5.0,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dtype of the written drafter.")] = "float16",
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bfloat16 autocast for the drafter's training steps (weights stay fp32). Default: on where the device computes bfloat16 natively (CPUs with AVX512_BF16 or AMX: ~2.8x faster steps than fp32 on a 2-core Xeon; CUDA GPUs with bf16), fp32 elsewhere.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this drafter's weights (fine-tune it on new data) instead of a fresh init; same shape options required.")] = None,
    replay_from: Annotated[Optional[list[Path]], typer.Option("--replay-from", help="Another run's work dir (or its shards/ folder) whose activation shards are replayed with this run's (repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the work dir from its last checkpoint.")] = False,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, ...")] = "cpu",
    distill_url: Annotated[Optional[str], typer.Option("--distill-url", help="Self-distill through an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, mtpspec serve) serving the target, e.g. http://127.0.0.1:8000: prompts go as token ids to /v1/completions, many at a time; each answer is kept in the work dir as it arrives (a restarted run asks only for the missing ones). The activations are still computed locally from the target's weights. API key: the MTPSPEC_DISTILL_API_KEY environment variable.")] = None,
    distill_model: Annotated[Optional[str], typer.Option("--distill-model", help="The served model's name (must be listed by the server's /v1/models); default: the one it lists.")] = None,
    distill_concurrency: Annotated[int, typer.Option("--distill-concurrency", help="Requests in flight to --distill-url (per rank).")] = 8,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature", help="The server's sampling temperature for the answers (0 = greedy, default).")] = 0.0,
    distill_top_p: Annotated[float, typer.Option("--distill-top-p", help="Top-p of sampled answers (1 = off).")] = 1.0,
    distill_top_k: Annotated[int, typer.Option("--distill-top-k", help="Top-k of sampled answers (0 = off; not every server supports it).")] = 0,
    distill_timeout: Annotated[float, typer.Option("--distill-timeout", help="Seconds to wait for one answer.")] = 600.0,
    distill_retries: Annotated[int, typer.Option("--distill-retries", help="Retries (exponential backoff from 1 s) of a request that timed out, lost its connection or got HTTP 408/429/5xx.")] = 5,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size", help="Sequences per forward/backward: each step's batch is cut into micro-batches of this size (their gradients averaged), spread over the ranks under torchrun. Default: batch size / number of ranks. The same value gives the same steps whatever the number of ranks.")] = None,
) -> None:
    """Train an MTP drafter for a target (self-distilled, K-step unrolled); resumable. Data-parallel
    under torchrun (e.g. `torchrun --nproc-per-node 4 --no-python mtpspec train-drafter ...`)."""
    from . import TrainConfig, train_drafter

    try:
        cfg = TrainConfig(
            data=list(data or []), out=str(out), target=target, work_dir=str(work_dir) if work_dir else None,
            draft_tokens=draft_tokens, num_layers=layers, hidden_size=hidden_size, clustered=clustered,
            num_centroids=num_centroids, centroid_top_k=centroid_top_k, self_distill=self_distill,
            distill_max_new_tokens=distill_tokens, distill_batch=distill_batch, answer_shortlist=answer_shortlist,
            max_len=max_len, shard_size=shard_size,
            batch_size=batch_size,
            self_instruct_temperature=self_instruct_temperature, self_instruct_top_p=self_instruct_top_p,
            self_instruct_max_tokens=self_instruct_tokens, self_instruct_prompts=prompts,
            more_prompts=more_prompts,
            lr=lr, epochs=epochs, replay=replay, max_steps=max_steps,
            time_budget=time_budget * 60 if time_budget else None, full_vocab_loss=full_vocab_loss, soft_labels=soft_labels,
            acceptance_weight=acceptance_weight, acceptance_verify=acceptance_verify, hard_negatives=hard_negatives,
            eval_prompts=str(eval_prompts) if eval_prompts else None, eval_limit=eval_limit,
            eval_every=eval_every * 60 if eval_every else None, checkpoint_every=checkpoint_every * 60,
            save_dtype=save_dtype, bf16=bf16, seed=seed, device=device,
            init_from=str(init) if init else None, replay_from=[str(p) for p in replay_from or []],
            distill_url=distill_url, distill_model=distill_model, distill_concurrency=distill_concurrency,
            distill_temperature=distill_temperature, distill_top_p=distill_top_p, distill_top_k=distill_top_k,
            distill_timeout=distill_timeout, distill_retries=distill_retries, micro_batch_size=micro_batch_size,
        )
        res = train_drafter(cfg, resume=resume)
        if not res.is_main:  # another rank of a torchrun launch: rank 0 reports
            return
        msg = f"trained {res.steps} steps ({res.seconds / 60:.1f} min of run, setup included); drafter in {res.out}"
        kept = next((e for e in res.evals if e["step"] == res.kept_step), None)
        if kept is not None:
            last = res.evals[-1]
            msg += (f" = step {kept['step']}'s drafter (held-out mean accepted length "
                    f"{kept['mean_accepted_length']:.3f}, per position {kept['acceptance_per_position']})")
            if kept is not last:
                msg += (f"; the last evaluation (step {last['step']}: {last['mean_accepted_length']:.3f}) fell "
                        f"below the best by more than the held-out noise")
        typer.echo(msg, err=True)
    except MtpspecError as e:
        typer.echo(f"mtpspec: error: {e}", err=True)
        raise typer.Exit(2) from None


def eval_drafter_cmd(
    drafter: Annotated[Path, typer.Argument(help="Drafter folder (gemma4_assistant format).")],
    prompts_file: Annotated[Optional[list[Path]], typer.Option("--prompts-file", "-p", help="Held-out prompts (.jsonl with 'prompt' or one per line); repeatable. Give -p, --heldout or both.")] = None,
    heldout: Annotated[bool, typer.Option("--heldout", help="Run the broad held-out benchmark (mtpspec/bench/heldout: 12 chat categories, ~24 prompts each, multi-turn ones whole): tau = mean accepted length per category, and the headline, the unweighted mean over categories.")] = False,
    categories: Annotated[Optional[str], typer.Option("--categories", help="With --heldout: only these categories, comma-separated (e.g. math,coding); default all.")] = None,
    per_category: Annotated[Optional[int], typer.Option("--per-category", help="With --heldout: the first N prompts of each category (quick runs); default all.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", "-m", help="Target checkpoint folder or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    draft_tokens: Annotated[Optional[int], typer.Option("--draft-tokens", "-k", help="K (default: the drafter's num_assistant_tokens).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N prompts of each file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    compare_heads: Annotated[bool, typer.Option("--compare-heads", help="For a clustered drafter: also evaluate the full head (same weights) and measure both heads' cost.")] = False,
    tree: Annotated[Optional[str], typer.Option("--tree", help="Draft trees of K levels instead of chains, NODES:BEAM:BRANCH (e.g. 8:2:3).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text (held-out: each evaluation's \"heldout\" holds \"categories\" {name: prompts, rounds, mean_accepted_length, acceptance_per_position} and \"mean_over_categories\").")] = False,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, ...")] = "cpu",
    drafter_dtype: Annotated[str, typer.Option("--drafter-dtype", help="'auto' = bfloat16 on CPU (as generate/serve), or float32 / bfloat16 / float16.")] = "auto",
    drafter_quantize: Annotated[str, typer.Option("--drafter-quantize", help="'auto' = int8 on CPU (as generate/serve), or none / int8 / int4.")] = "auto",
    prompt_lookup: Annotated[bool, typer.Option("--prompt-lookup", help="Evaluate the drafter with prompt lookup in front of it (as generate/serve run it by default) instead of alone.")] = False,
) -> None:
    """Held-out mean accepted length and per-position acceptance of a drafter (greedy, fixed K), on
    prompts files (-p) and/or the broad held-out benchmark (--heldout: tau per category and the
    unweighted mean over categories), optionally clustered vs full head with their costs."""
    import json

    import mtpspec

    from ..bench.heldout import load_heldout
    from ..drafter_checkpoint import read_drafter_config
    from ..errors import InputError
    from .evaluate import evaluate_drafter, evaluate_drafter_heldout, head_costs

    try:
        if not heldout and (categories is not None or per_category is not None):
            raise InputError("--categories and --per-category select held-out benchmark prompts: add --heldout")
        if not prompts_file and not heldout:
            raise InputError("give --prompts-file (-p) and/or --heldout")
        selection = load_heldout(categories, per_category) if heldout else None  # bad names fail before loading
        _, k_ckpt = read_drafter_config(drafter)
        k = draft_tokens or k_ckpt or 4
        eng = mtpspec.load(target, drafter=str(drafter), draft_tokens=k, draft_tree=tree or None, device=device,
                           drafter_dtype=drafter_dtype, prompt_lookup=prompt_lookup, drafter_quantize=drafter_quantize)
        clustered = eng.proposer.drafter.cfg.clustered
        heads = [False, True] if compare_heads and clustered else [False]
        res = {"drafter": str(drafter), "draft_tokens": k, "tree": tree and str(eng.plan.tree), "prompt_lookup": prompt_lookup,
               "drafter_dtype": str(eng.proposer.drafter.dtype).removeprefix("torch."),
               "drafter_quantize": eng.proposer.drafter.quantization or "none", "evaluations": []}
        for path in prompts_file or []:
            for full in heads:
                res["evaluations"].append(evaluate_drafter(drafter, path, k=k, max_new_tokens=max_new_tokens, limit=limit,
                                                           batch_size=batch_size, full_head=full, engine=eng))
        for full in heads if selection is not None else []:
            res["evaluations"].append(evaluate_drafter_heldout(drafter, selection, k=k, max_new_tokens=max_new_tokens,
                                                               batch_size=batch_size, full_head=full, engine=eng))
        if compare_heads:
            res["head_costs"] = head_costs(eng)
        if json_out:
            typer.echo(json.dumps(res))
            return
        for e in res["evaluations"]:
            _echo_evaluation(e, res)
        if "head_costs" in res:
            _echo_head_costs(res["head_costs"])
    except MtpspecError as e:
        typer.echo(f"mtpspec: error: {e}", err=True)
        raise typer.Exit(2) from None


def _echo_evaluation(e: dict, res: dict) -> None:
    """One evaluation as text; a held-out one with its table of tau per category."""
    from ..bench.heldout_scores import heldout_lines

    acc = " ".join(f"{a:.2f}" for a in e["acceptance_per_position"])
    shape = (f", tree {res['tree']}" if res["tree"] else "") + (", with prompt lookup" if res.get("prompt_lookup") else "")
    what = e["prompts_file"] or f"held-out benchmark, {len(e['heldout']['categories'])} categories"
    overall = "all rounds pooled: mean accepted length" if e.get("heldout") else "mean accepted length"
    typer.echo(f"{what} ({e['prompts']} prompts, {e['head']} head, K={res['draft_tokens']}{shape}): {overall} "
               f"{e['mean_accepted_length']:.3f}, acceptance per position [{acc}]")
    if e.get("heldout"):
        typer.echo("\n".join(heldout_lines(e["heldout"])))


def _echo_head_costs(hc: dict) -> None:
    for name in ("clustered", "full"):
        if name in hc:
            typer.echo(f"{name} head: {hc[name]['head_ms']} ms alone, drafting step {hc[name]['draft_step_ms']} ms (batch 1)")
    if "head_cost_ratio_full_over_clustered" in hc:
        typer.echo(f"clustered head {hc['head_cost_ratio_full_over_clustered']}x cheaper than the full head "
                   f"(drafting step {hc['step_cost_ratio_full_over_clustered']}x)")
