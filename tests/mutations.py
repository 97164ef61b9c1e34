"""Re-injects the realistic decoding bugs the losslessness tests must catch (issue 13's list, plus
variants), one at a time, each in a throw-away git worktree of HEAD, and runs the tests meant to
catch it. A bug that passes its tests means the suite lost its teeth.

    .venv/bin/python tests/mutations.py                 # every bug
    .venv/bin/python tests/mutations.py row0-q stop     # some (names below)

Each bug names the file, the exact line(s) it replaces, and the tests (with an optional -k) that
must fail. It runs the repository's .venv python from inside the worktree, so the worktree's
mtpspec is the one imported. Several minutes per bug on 2 cores; not part of the suite.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = REPO / ".venv" / "bin" / "python"

# name: (file, original, buggy, tests, -k filter)
BUGS = {
    "bonus-from-pK": ("mtpspec/decoding/verify.py",
                      "emitted.append(sample(target_probs[k], generator))",
                      "emitted.append(sample(target_probs[k - 1], generator))",
                      "tests/test_verify.py tests/test_sampling_exactness.py", ""),
    "residual-next-q": ("mtpspec/decoding/verify.py",
                        "q = draft_probs[n] if draft_probs is not None",
                        "q = draft_probs[min(n + 1, k - 1)] if draft_probs is not None",
                        "tests/test_verify.py tests/test_sampling_exactness.py", ""),
    "rollback-greedy-count": ("mtpspec/decoding/loop.py",
                              "keep = torch.tensor([n + 1 if e else 0 for n, e in zip(n_accepted, emitted)], device=dev)",
                              "keep = torch.tensor([n + 1 if e else 0 for n, e in zip(greedy_n.tolist(), emitted)], device=dev)",
                              "tests/test_sampling_exactness.py", ""),
    "row0-q": ("mtpspec/decoding/loop.py",
               "q = proposal.probs[b] if proposal.probs is not None else None",
               "q = proposal.probs[0] if proposal.probs is not None else None",
               "tests/test_sampling_exactness.py", ""),
    "hidden-next": ("mtpspec/decoding/loop.py",
                    "out.hidden[torch.arange(hi, device=dev), torch.tensor(n_accepted, device=dev)]",
                    "out.hidden[torch.arange(hi, device=dev), torch.tensor([min(n + 1, k) for n in n_accepted], device=dev)]",
                    "tests/test_speculative.py", "hidden_state"),
    "hidden-prev": ("mtpspec/decoding/loop.py",
                    "out.hidden[torch.arange(hi, device=dev), torch.tensor(n_accepted, device=dev)]",
                    "out.hidden[torch.arange(hi, device=dev), torch.tensor([max(n - 1, 0) for n in n_accepted], device=dev)]",
                    "tests/test_speculative.py", "hidden_state"),
    "hidden-tree": ("mtpspec/decoding/loop.py",
                    "last = torch.tensor([p[-1] if p else 0 for p in paths], device=dev)",
                    "last = torch.tensor([p[-2] if len(p) > 1 else 0 for p in paths], device=dev)",
                    "tests/test_speculative.py", "hidden_state and tree"),
    "stop": ("mtpspec/decoding/loop.py",
             "            for tok in emitted[b]:\n                s.accept(tok)",
             "            for tok in emitted[b]:\n"
             "                check, s.request.stop_check = s.request.stop_check, (None if len(emitted[b]) > 1 else s.request.stop_check)\n"
             "                s.accept(tok)\n"
             "                s.request.stop_check = check",
             "tests/test_stop_strings.py", ""),
    # drafter training records the target's activations inside the loop: a row mix-up there
    # would teach the drafter other rows' hidden states
    "record-rows": ("mtpspec/decoding/loop.py",
                    "self.recorder.step([b for b in range(hi) if active[b]], out.hidden[:, 0], logits[:, 0])",
                    "self.recorder.step([b for b in range(hi) if active[b]], out.hidden[:, 0].flip(0), logits[:, 0])",
                    "tests/test_train.py", "recorded_while"),
    "shortlist-stale-logits": ("mtpspec/train/shortlist.py",
                               'self._buf[: self._written.shape[0]].scatter_(1, self._written, float("-inf"))',
                               "pass",
                               "tests/test_shortlist.py", "exact_on_the_shortlist"),
    "shortlist-not-answering": ("mtpspec/train/harvest.py",
                                "with shortlisted(engine.model, shortlist):",
                                "with shortlisted(engine.model, None):",
                                "tests/test_shortlist.py", "trainer_answers"),
    "shortlist-without-stop-tokens": ("mtpspec/train/trainer.py",
                                      "always=self._stop_tokens())",
                                      "always=None)",
                                      "tests/test_shortlist.py", "trainer_answers"),
    "kmeans-keeps-least-similar": ("mtpspec/train/clustering.py",
                                   "order = torch.argsort(score, descending=True)",
                                   "order = torch.argsort(score)",
                                   "tests/test_train.py", "capacity_assignment"),
    "cluster-hits-off-by-one": ("mtpspec/train/objective.py",
                                "< me.top_k).sum())",
                                "<= me.top_k).sum())",
                                "tests/test_train.py", "cluster_hits"),
    "hard-negatives-dropped": ("mtpspec/train/objective.py",
                               "parts.append(drafted_tokens(drafter, states, scores, hard_negatives, mining_head))",
                               "drafted_tokens(drafter, states, scores, hard_negatives, mining_head)",
                               "tests/test_train.py", "hard_negatives"),
    "hard-negatives-worst-clusters": ("mtpspec/train/objective.py",
                                      "top = torch.topk(sc.detach(), MINING_CLUSTERS, dim=-1).indices",
                                      "top = torch.topk(-sc.detach(), MINING_CLUSTERS, dim=-1).indices",
                                      "tests/test_train.py", "hard_negatives"),
    "anchor-grid-slot-offset": ("mtpspec/models/drafter.py",  # a row's anchors at the grid places of row 0's
                                "slots = row * w + torch.arange(packed.numel(), device=packed.device) - first[row]",
                                "slots = row * w + torch.arange(packed.numel(), device=packed.device) - first[row] * 0",
                                "tests/test_train.py", "unroll"),
    "shortlist-default-off": ("mtpspec/train/trainer.py",  # the default (None) read as off
                              "masked is None or cfg.answer_shortlist is False:",
                              "masked is None or not cfg.answer_shortlist:",
                              "tests/test_shortlist.py", "trainer_answers"),
    "keep-highest-mean": ("mtpspec/train/heldout.py",  # the old rule: a later step must beat the best mean
                          'return new["mean_accepted_length"] >= best["mean_accepted_length"] - z * difference_standard_error(new, best)',
                          'return new["mean_accepted_length"] > best["mean_accepted_length"]',
                          "tests/test_train.py", "latest_evaluation or difference_standard_error"),
    "keep-unpaired-noise": ("mtpspec/train/heldout.py",  # the difference's residuals not paired by prompt
                            "d = [ra - rb for ra, rb in zip(residuals([p[0] for p in pairs]), residuals([p[1] for p in pairs]))]",
                            "d = [abs(ra) + abs(rb) for ra, rb in zip(residuals([p[0] for p in pairs]), residuals([p[1] for p in pairs]))]",
                            "tests/test_train.py", "latest_evaluation or difference_standard_error"),
}


def run(name: str) -> bool:
    """True if the bug is caught (its tests fail)."""
    path, original, buggy, tests, k = BUGS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        wt = Path(tmp) / "wt"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(wt), "HEAD"], check=True)
        try:
            src = (wt / path).read_text()
            if src.count(original) != 1:
                print(f"{name}: the original line is not in {path} once: update tests/mutations.py", flush=True)
                return False
            (wt / path).write_text(src.replace(original, buggy))
            cmd = f"{PY} -m pytest -q -x -p no:cacheprovider {tests}" + (f" -k {shlex.quote(k)}" if k else "")
            r = subprocess.run(cmd, shell=True, cwd=wt, capture_output=True, text=True)
            failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
            print(f"{name}: {'caught by ' + failed[0][7:] if r.returncode else 'NOT CAUGHT'}", flush=True)
            return r.returncode != 0
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)


if __name__ == "__main__":
    names = sys.argv[1:] or list(BUGS)
    missed = [n for n in names if not run(n)]
    print("all caught" if not missed else f"NOT CAUGHT: {', '.join(missed)}")
    sys.exit(1 if missed else 0)
