"""Data-parallel drafter training (mtpspec/train/distributed.py): `torchrun --nproc-per-node 2`
(gloo, CPU) runs `mtpspec train-drafter` on a tiny target; the ranks share the harvest; after N
steps the drafter's weights equal a 1-process run with the same global batch (the same
micro-batches, accumulated) within 1e-6; a 2-process checkpoint resumes in 1 process and ends
where an uninterrupted 1-process run does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtpspec
from tiny_models import save_family_tokenizer, tiny_hf_model, write_random_chats
from mtpspec.errors import InputError
from mtpspec.train import TrainConfig, Trainer

pytestmark = pytest.mark.timeout(600)

# steps of the 2-process run (round 0: 2 steps on shard 0, round 1: shard 1 + replay); resumed to 2N. All
# steps are inside the 20 warmup steps, so the learning rate does not depend on max_steps.
N = 4
TOL = 1e-6  # max |difference| of any weight (observed: 1.2e-7, float rounding)


@pytest.fixture(scope="module")
def engine(tiny_with_tokenizer):
    return mtpspec.load(tiny_with_tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_random_chats(d / "chat.jsonl", 16, seed=1)
    return d


# the options the torchrun runs below give (the rest: the CLI's defaults), as TrainConfig fields
SMALL = dict(draft_tokens=2, hidden_size=32, distill_max_new_tokens=16, max_len=64, shard_size=8, batch_size=4, lr=1e-2)
FLAGS = {"draft_tokens": "--draft-tokens", "hidden_size": "--hidden-size", "distill_max_new_tokens": "--distill-tokens",
         "max_len": "--max-len", "shard_size": "--shard-size", "batch_size": "--batch-size", "lr": "--lr",
         "max_steps": "--max-steps", "self_instruct_prompts": "--prompts", "eval_limit": "--eval-limit",
         "distill_batch": "--distill-batch", "self_instruct_max_tokens": "--self-instruct-tokens"}


def _torchrun(target, out: Path, *args: str, **fields) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 mtpspec train-drafter --target T --out OUT ARGS`
    with `fields` as their command-line options (one thread per rank)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "mtpspec.cli", "train-drafter",
           "--target", str(target), "--out", str(out), *args, *(x for k, v in fields.items() for x in (FLAGS[k], str(v)))]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _cfg(data, out: Path, **kw) -> TrainConfig:
    """The 1-process config of the `two_ranks` launch (with `kw` changed)."""
    return TrainConfig(data=[str(data / "chat.jsonl")], out=str(out), progress=False, **{**SMALL, **kw})


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_ranks(tiny_with_tokenizer, data, tmp_path_factory):
    """`torchrun --standalone --nproc-per-node 2 mtpspec train-drafter ... --max-steps N`: (out, work
    dir, the launch's stderr)."""
    root = tmp_path_factory.mktemp("ddp")
    p = _torchrun(tiny_with_tokenizer, root / "d", "--data", str(data / "chat.jsonl"), **SMALL, max_steps=N)
    return root / "d", root / "d.work", p.stderr


@pytest.fixture(scope="module")
def one_process(engine, data, tmp_path_factory):
    """1 process, the same global batches in micro-batches of 2 (accumulated), 2N steps; its own
    shards: (trainer, its weights after N steps)."""
    tr = Trainer(_cfg(data, tmp_path_factory.mktemp("one") / "d", max_steps=2 * N, micro_batch_size=2), engine)
    at_n = {}
    tr.run(on_step=lambda rec: rec["step"] == N - 1 and at_n.update(
        {k: v.clone() for k, v in tr.drafter.state_dict().items()}))
    return tr, at_n


def test_two_ranks_train_as_one_process_with_the_same_global_batch(engine, data, two_ranks, one_process, tmp_path):
    out, work, log = two_ranks
    one, one_at_n = one_process
    # the ranks split the harvest: the first block of 2 shards, one each; both ranks train on both
    assert "rank 0: shard 1/2" in log and "rank 1: shard 2/2" in log
    assert "rank 1: shard 1/2" not in log and "rank 0: shard 2/2" not in log
    assert sorted(f.name for f in (work / "shards").glob("*.pt")) == ["shard_00000.pt", "shard_00001.pt"]
    for r in range(2):  # the same activations as one process harvesting alone
        mine = torch.load(work / "shards" / f"shard_{r:05d}.pt", weights_only=False)
        assert all(torch.equal(a.ids, b.ids) and torch.equal(a.hidden, b.hidden) for a, b in zip(mine, one.shards[r]))
    assert log.count(f"trained {N} steps") == 1  # rank 0 reports
    ck = torch.load(work / "checkpoint.pt", weights_only=False)
    assert ck["step"] == N and ck["round"] == 1  # round 1 trains on shard 1 (+ replay of shard 0)
    info = json.loads((out / "training.json").read_text())
    assert (info["world_size"], info["micro_batch_size"], info["steps"]) == (2, 2, N)

    assert _max_diff(ck["drafter"], one_at_n) <= TOL
    start = Trainer(_cfg(data, tmp_path / "fresh"), engine).drafter.state_dict()
    assert _max_diff(start, one_at_n) > 1e-3  # the weights did move
    for a, b in zip(ck["history"], one.state.history[:N], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL) and a["positions"] == b["positions"]
        assert a["acc"] == pytest.approx(b["acc"], abs=1e-9)
    # the same global batch as one micro-batch of 4 is another objective (the loss's candidate tokens
    # and normalisation are per micro-batch): visibly other weights
    shutil.copytree(work / "shards", tmp_path / "whole.work" / "shards")
    whole = Trainer(_cfg(data, tmp_path / "whole", max_steps=N), engine)
    whole.run()
    assert _max_diff(ck["drafter"], whole.drafter.state_dict()) > 100 * TOL


def test_a_two_rank_checkpoint_resumes_in_one_process(engine, data, two_ranks, one_process, tmp_path):
    out, work, _ = two_ranks
    straight, _ = one_process
    shutil.copytree(work, tmp_path / "d.work")
    resumed = Trainer(_cfg(data, tmp_path / "d", max_steps=2 * N, micro_batch_size=2), engine)
    resumed.run(resume=True)
    assert resumed.state.step == straight.state.step == 2 * N
    assert (resumed.state.round, resumed.state.round_step) == (straight.state.round, straight.state.round_step)
    assert _max_diff(resumed.drafter.state_dict(), straight.drafter.state_dict()) <= TOL
    assert [h["loss"] for h in resumed.state.history] == pytest.approx([h["loss"] for h in straight.state.history],
                                                                       abs=TOL)


def test_two_ranks_grow_the_one_commands_data_as_one_process(tmp_path):
    """The one command (no --data) under torchrun: when every shard is trained on, rank 0 writes
    more prompts (rank 0's clocks decide whether there is room), the ranks build the new shards
    together and train on them, and the run takes the steps one process takes."""
    target = tmp_path / "target"  # a tiny Llama with SmolLM2's chat template
    tiny_hf_model("llama").save_pretrained(target)
    save_family_tokenizer(target, "llama")
    out = tmp_path / "ddp" / "d"
    grow = dict(SMALL, self_instruct_prompts=8, eval_limit=2, distill_batch=16, self_instruct_max_tokens=48,
                max_len=512, max_steps=8)
    p = _torchrun(target, out, **grow)
    work = out.with_name("d.work")
    ck = torch.load(work / "checkpoint.pt", weights_only=False)
    # 8 prompts = one shard; rounds of 2, 4, 4 steps: chunks 1 and 2 were written at steps 2 and 6
    assert ck["step"] == 8 and ck["chunks"] == 3 and [h["round"] for h in ck["history"]] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert "rank 1: shard 2/2" in p.stderr and "rank 0: shard 3/3" in p.stderr  # new shards, built by both
    assert p.stderr.count("more data: chunk") == 2  # rank 0 reports
    one = Trainer(TrainConfig(data=[], target=str(target), out=str(tmp_path / "one" / "d"), micro_batch_size=2,
                              progress=False, **grow))
    one.run()
    assert one.state.chunks == 3 and one.shards.n_shards == 3
    mine = [torch.load(work / "shards" / f"shard_{r:05d}.pt", weights_only=False) for r in range(3)]
    assert [[a.ids.tolist() for a in shard] for shard in mine] == [[a.ids.tolist() for a in one.shards[r]]
                                                                    for r in range(3)]
    assert _max_diff(ck["drafter"], one.drafter.state_dict()) <= TOL


def _shared_store_worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank of `test_ranks_without_a_shared_filesystem_exchange_shards` (spawned)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from mtpspec.errors import MtpspecError
    from mtpspec.train.distributed import SharedShardStore, from_env

    g = from_env("cpu")
    result = {}

    def run(name: str, fail_rank: int | None) -> None:
        built = []

        def build(samples, label):
            if rank == fail_rank:
                raise InputError("the distillation server is down")
            built.append(samples[0])
            return [x * 10 for x in samples], {"by": rank}

        folder = Path(root) / name / f"rank{rank}"  # each rank its own work dir: no shared filesystem
        store = SharedShardStore(list(range(5)), 1, folder, build, [], group=g)
        try:
            result[name] = {"shards": [store[r] for r in range(5)], "built": built,
                            "meta": {str(k): v for k, v in store.meta.items()}}
        except MtpspecError as e:
            result[name] = {"error": f"{type(e).__name__}: {e}", "built": built,
                            "files": sorted(f.name for f in folder.glob("*.pt"))}

    run("ok", None)
    run("fail", 1)
    try:
        g.from_main(lambda: (_ for _ in ()).throw(InputError("no such file: data.jsonl")))
    except MtpspecError as e:
        result["from_main"] = f"{type(e).__name__}: {e}"
    g.close()
    (Path(root) / f"result{rank}.json").write_text(json.dumps(result))


def test_ranks_without_a_shared_filesystem_exchange_shards(tmp_path):
    """Two gloo ranks, each with its own shard folder (as on machines without a shared filesystem):
    blocks of 2 shards, each shard built once by its owner (or taken from a rank that has it from an
    earlier run) and sent to the other; an error on one rank stops both with its message."""
    import torch.multiprocessing as mp
    from mtpspec.serve.server import free_port
    from mtpspec.train.shards import save_atomic

    (tmp_path / "ok" / "rank1").mkdir(parents=True)
    save_atomic([99], tmp_path / "ok" / "rank1" / "shard_00000.pt")  # rank 1 has shard 0 from an earlier run
    mp.spawn(_shared_store_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2))
    want = [[99], [10], [20], [30], [40]]
    assert r0["ok"]["shards"] == r1["ok"]["shards"] == want
    assert (r0["ok"]["built"], r1["ok"]["built"]) == ([2, 4], [1, 3])  # shard 0 is not built again
    assert r0["ok"]["meta"] == r1["ok"]["meta"] == {"1": {"by": 1}, "2": {"by": 0}, "3": {"by": 1}, "4": {"by": 0}}
    for r in range(2):  # every rank keeps every shard in its own work dir (a resume on it reads them)
        assert [torch.load(tmp_path / "ok" / f"rank{r}" / f"shard_{q:05d}.pt") for q in range(5)] == want
    assert r1["fail"]["error"] == "InputError: the distillation server is down"
    assert r0["fail"]["error"] == "InputError: rank 1: the distillation server is down"
    assert r0["fail"]["files"] == ["shard_00000.pt"]  # what rank 0 built before is kept
    assert r0["from_main"] == "InputError: no such file: data.jsonl"
    assert r1["from_main"] == "InputError: rank 0: no such file: data.jsonl"


def test_micro_batches_must_cover_the_ranks(engine, data, tmp_path):
    from mtpspec.train.distributed import check_micro_batches

    check_micro_batches(8, 2, 4)
    with pytest.raises(InputError, match="gives 2 per step, fewer than the 4 ranks"):
        check_micro_batches(8, 4, 4)
    with pytest.raises(InputError, match="micro_batch_size must be >= 1"):
        Trainer(_cfg(data, tmp_path / "x", micro_batch_size=0), engine)
