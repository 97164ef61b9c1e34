"""A fresh drafter of the one command's shape (1 layer, clustered head, K = 4, batch 8, lr 1e-3)
trained the same steps on the same batches in bfloat16 autocast and in fp32, then scored on the
broad benchmark (4 prompts per category, greedy K = 4 chain rounds replayed on the target's
teacher-forced answers: `drafters/probe_features.py`'s scorer). Data: the first LIMIT sequences
of stage 12's shards (local work dir).

    .venv/bin/python docs/scripts/bf16_from_scratch.py STEPS LIMIT bf16,fp32     # as run: 400 800
"""
import sys, json, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "drafters"))
import probe_features as pf
import mtpspec
from mtpspec.models.drafter import DrafterConfig
from mtpspec.train.config import TrainConfig
from mtpspec.train.drafter_init import starting_drafter
steps = int(sys.argv[1]); limit = int(sys.argv[2])
engine = mtpspec.load(prompt_lookup=False); target = engine.model
evalset = pf.eval_set(engine, [2], 4, 64)
data = pf.train_set(target, ["drafters/smollm2-135m-instruct.stage12.work"], [2], limit)
cfg = TrainConfig(data=[], out="/tmp/x")
out = {}
for arm in sys.argv[3].split(","):
    dcfg = DrafterConfig.for_target(target.cfg, num_layers=1, clustered=cfg.clustered_for(target.cfg.vocab_size))
    d = starting_drafter(dcfg, target, seed=0, train_head=None, init_from=None)
    run = pf.train(arm, d, target, data, steps=steps, batch_size=8, lr=1e-3, seed=0, bf16=(arm == "bf16"), k=4)
    run["score"] = pf.score(d, target, evalset, 4)
    print(arm, run["seconds"], json.dumps(run["score"]), flush=True)
    out[arm] = run
json.dump(out, open("bf16-from-scratch.json", "w"), indent=1)
