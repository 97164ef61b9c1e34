"""Data-parallel drafter training across processes and machines, started by `torchrun`.

`from_env` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; gloo on CPU, NCCL on CUDA, each rank on GPU LOCAL_RANK); without torchrun (or with one
process) `Group` is a single process whose collectives do nothing.

What the ranks share:
- the samples: rank 0 builds them (the self-instruct recipe generates its prompts once) and sends
  them to the others; so too each later chunk of the one command's growing data, written when
  every rank reaches the end of its shards at the same step, if rank 0's clocks find room in the
  time budget (`Trainer._more_data`);
- the shards (`SharedShardStore`): shards are taken in blocks of world-size consecutive shards;
  in a block, a shard no rank has yet is harvested by rank (index mod world size), all of them at
  once, then every rank receives the block's shards it lacks from a rank that has them (nothing is
  sent when the work dir is on a shared filesystem) and stores them in its work dir;
- each step's global batch: the schedule is a pure function of (seed, round, step) and every rank
  holds every shard, so every rank forms the same global batch. It is cut into micro-batches of
  `micro_batch_size` items; rank k trains micro-batches k, k + world, ...; the loss is the mean of
  the micro-batches' losses, so the gradients are summed over the ranks (one all-reduce of all
  gradients, as DDP does) and every rank takes the same optimiser step. A 1-process run with the
  same micro-batch size takes the same steps (gradient accumulation), up to float rounding;
- the run's state: the elapsed time (it sets the learning rate under a time budget) is the ranks'
  maximum and a stop request (SIGTERM, Ctrl-C) on any rank stops all at the same step;
- checkpoints and output: rank 0 writes them and evaluates; a resumed run reads the checkpoint
  on rank 0 and sends it to the others, so it resumes with any world size.

DDP's own wrapper is not used: it reduces gradients through the module's forward(), and the
objective runs the drafter through its step methods; the all-reduce here is the same arithmetic.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Callable

import torch

from ..errors import InputError, MtpspecError
from .harvest import Activations
from .shards import ShardStore

TIMEOUT = datetime.timedelta(hours=2)  # a collective waits this long (rank 0 evaluating, a slow shard)


class Group:
    """A single process: rank 0 of 1; every collective is the identity."""

    rank = 0
    world = 1
    local_rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_main(self, fn: Callable):
        """fn() computed on rank 0 and sent to every rank (an error it raises is raised on all)."""
        return fn()

    def all_gather(self, obj) -> list:
        """Every rank's obj, in rank order."""
        return [obj]

    def broadcast(self, obj, src: int):
        """src's obj on every rank."""
        return obj

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """t reduced (sum or max) over the ranks, in place."""
        return t

    def check(self, error: BaseException | None) -> None:
        """Collectively: raise on every rank if any rank had an error (its message)."""
        if error is not None:
            raise error

    def close(self, finished: bool = True) -> None:
        """Leave the group; `finished`: every rank got here without an error."""

    def device(self, device: str) -> str:
        """The torch device this rank trains on."""
        return device


class TorchGroup(Group):
    """The torch.distributed process group torchrun set up for this process."""

    def __init__(self, device: str) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
        try:
            dist.init_process_group("nccl" if self.cuda else "gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise MtpspecError(f"cannot join the torchrun process group (rank {self.rank} of {self.world}, "
                               f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                               f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}") from None

    def device(self, device: str) -> str:
        return f"cuda:{self.local_rank}" if self.cuda else device

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.cuda() if self.cuda else t

    def from_main(self, fn: Callable):
        box: list = [None]
        error = None
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001  (sent to the other ranks, raised here)
                error = e
                box[0] = ("error", type(e).__name__, str(e))
        self.dist.broadcast_object_list(box, 0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise (InputError if box[0][1] == "InputError" else MtpspecError)(f"rank 0: {box[0][2]}")
        return box[0][1]

    def all_gather(self, obj) -> list:
        out: list = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int):
        box = [obj if self.rank == src else None]
        self.dist.broadcast_object_list(box, src)
        return box[0]

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        c = self._comm(t)
        self.dist.all_reduce(c, op=self.dist.ReduceOp.MAX if op == "max" else self.dist.ReduceOp.SUM)
        if c is not t:
            t.copy_(c)
        return t

    def check(self, error: BaseException | None) -> None:
        msgs = self.all_gather(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        for r, m in enumerate(msgs):
            if m is not None:
                cls = InputError if m[0] == "InputError" else MtpspecError
                raise cls(f"rank {r}: {m[1]}")

    def close(self, finished: bool = True, timeout: float = 60.0) -> None:
        # After a normal end the ranks first wait for each other (rank 0 still writes the output):
        # tearing gloo's connections down while the peer still uses them aborted a rank at exit now
        # and then ("terminate called without an active exception"). A barrier alone still let a
        # rank that left it first close its connections while the other was finishing it (1 clean
        # clone in ~5), so each rank then also reports through the rendezvous store, outside gloo,
        # and none tears down before all have left the barrier. After an error a barrier could wait
        # for a rank stuck in another collective, so the group is torn down at once.
        if self.dist.is_initialized():
            if finished:
                self.dist.barrier()
                self._all_left_barrier(timeout)
            self.dist.destroy_process_group()

    def _all_left_barrier(self, timeout: float) -> None:
        """Wait (at most timeout seconds) until every rank has counted itself in the store."""
        store = self.dist.distributed_c10d._get_default_store()
        key = "mtpspec/left-final-barrier"
        store.add(key, 1)
        end = time.monotonic() + timeout
        while store.add(key, 0) < self.world and time.monotonic() < end:
            time.sleep(0.01)


def from_env(device: str) -> Group:
    """The process group of a torchrun launch (WORLD_SIZE > 1), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TorchGroup(device)
    return Group()


# ---- what a training step shares ---------------------------------------------------------------
def micro_batches(items: list, size: int) -> list[list]:
    """The global batch cut into consecutive micro-batches of `size` items (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_micro_batches(batch_size: int, micro_batch_size: int, world: int) -> None:
    n = math.ceil(batch_size / micro_batch_size)
    if n < world:
        raise InputError(f"batch_size {batch_size} in micro-batches of {micro_batch_size} gives {n} per step, fewer "
                         f"than the {world} ranks: raise --batch-size or lower --micro-batch-size")


def reduce_gradients(group: Group, params: list[torch.nn.Parameter]) -> None:
    """Each parameter's gradient summed over the ranks (one all-reduce per dtype); a parameter no
    rank has a gradient for keeps none (AdamW then leaves it alone, as in one process)."""
    if group.world == 1:
        return
    has = group.all_reduce(torch.tensor([float(p.grad is not None) for p in params]))
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        group.all_reduce(flat)
        i = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[i : i + n].view_as(p).clone()
            i += n
    for p, h in zip(params, has.tolist()):
        if not h:
            p.grad = None


def broadcast_parameters(group: Group, module: torch.nn.Module) -> None:
    """Rank 0's weights on every rank (as DDP does at the start)."""
    if group.world == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            c = group._comm(t.data.clone())
            group.dist.broadcast(c, 0)
            t.data.copy_(c)


def reduce_record(group: Group, loss: float, stats: list[tuple[int, int, int]]) -> tuple[float, list]:
    """A step's loss (each rank's share of the mean) and per-step counts summed over the ranks."""
    if group.world == 1:
        return loss, stats
    t = torch.tensor([loss] + [float(x) for s in stats for x in s], dtype=torch.float64)
    group.all_reduce(t)
    v = t.tolist()
    return v[0], [(int(v[1 + 3 * i]), int(v[2 + 3 * i]), int(v[3 + 3 * i])) for i in range(len(stats))]


def sync_state(group: Group, elapsed: float, stop: bool, done: bool = False) -> tuple[float, bool, bool]:
    """(the ranks' largest elapsed time, whether any rank asks to stop, whether any rank's limit is
    reached)."""
    if group.world == 1:
        return elapsed, stop, done
    t = group.all_reduce(torch.tensor([elapsed, float(stop), float(done)], dtype=torch.float64), op="max")
    return float(t[0]), bool(t[1]), bool(t[2])


# ---- shards --------------------------------------------------------------------------------------
class SharedShardStore(ShardStore):
    """A `ShardStore` whose shards the ranks build together, a block of world-size shards at a
    time (module docstring). Every rank must ask for shards in the same order (the schedule does)."""

    def __init__(self, *args, group: Group, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self._block: dict[int, list[Activations]] = {}

    def _load_or_build(self, r: int) -> list[Activations]:
        if r not in self._block:
            self._block = self._load_block(r - r % self.group.world)
        return self._block.pop(r)

    def _load_block(self, start: int) -> dict[int, list[Activations]]:
        g = self.group
        block = range(start, min(self.n_shards, start + g.world))
        have = g.all_gather([q for q in block if self.path(q).is_file()])
        anywhere = {q for h in have for q in h}
        built: dict[int, tuple] = {}
        error = None
        for q in block:
            if q not in anywhere and q % g.world == g.rank:
                try:
                    built[q] = self.build(q)
                    self.store(q, *built[q])
                except Exception as e:  # noqa: BLE001  (every rank raises it: none waits for this shard)
                    error = e
        g.check(error)
        have = g.all_gather([q for q in block if self.path(q).is_file()])
        out = {}
        for q in block:
            holders = [rank for rank, h in enumerate(have) if q in h]
            if len(holders) == g.world:  # every rank has it (a shared work dir, or already sent)
                out[q] = built[q][0] if q in built else self.read(q)
                continue
            src = holders[0]
            mine = (built[q] if q in built else (self.read(q), self.meta.get(q))) if g.rank == src else None
            acts, meta = g.broadcast(mine, src)
            if g.rank not in holders:
                self.store(q, acts, meta)
            out[q] = acts
        return out
