"""Prometheus metrics of the server (its own registry, so several servers can live in one process).

The scheduler reports finished sequences and rounds (`on_finished`, `on_round`); the HTTP layer
counts requests by endpoint and status and their latencies.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..acceptance import AcceptanceTotals
from ..decoding.loop import SequenceStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self.requests = Counter("mtpspec_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mtpspec_prompt_tokens", "Prompt tokens of finished sequences", registry=r)
        self.generation_tokens = Counter("mtpspec_generation_tokens", "Generated tokens of finished sequences",
                                         registry=r)
        self.sequences = Counter("mtpspec_sequences_finished", "Finished sequences by finish reason", ["reason"],
                                 registry=r)
        self.proposed = Counter("mtpspec_draft_tokens_proposed", "Draft tokens proposed", registry=r)
        self.accepted = Counter("mtpspec_draft_tokens_accepted", "Draft tokens accepted by the target", registry=r)
        self.pos_proposed = Counter("mtpspec_draft_position_proposed", "Draft tokens proposed at each draft position",
                                    ["position"], registry=r)
        self.pos_accepted = Counter("mtpspec_draft_position_accepted", "Draft tokens accepted at each draft position",
                                    ["position"], registry=r)
        self.acceptance = Gauge("mtpspec_draft_acceptance_rate",
                                "Accepted / proposed at each draft position (since start)", ["position"], registry=r)
        self.verify_rounds = Counter("mtpspec_decode_rounds",
                                     "Per-sequence decode rounds (target forwards after the prefill)", registry=r)
        self.round_tokens = Counter("mtpspec_decode_round_tokens", "Tokens emitted by those rounds", registry=r)
        self.mean_accepted = Gauge("mtpspec_mean_accepted_length",
                                   "Tokens emitted per target forward in decoding (since start; 1 = plain)",
                                   registry=r)
        self.queue_length = Gauge("mtpspec_queue_length", "Requests waiting for a slot", registry=r)
        self.batch_size = Gauge("mtpspec_batch_size", "Sequences in the running batch", registry=r)
        self.batch_rounds = Counter("mtpspec_batch_rounds", "Decoding rounds of the batch", registry=r)
        self.batch_size_hist = Histogram("mtpspec_round_batch_size", "Batch size of each decoding round",
                                         buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.latency = Histogram("mtpspec_request_latency_seconds", "Request latency (to the last token)",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mtpspec_time_to_first_token_seconds", "Time to the first token", ["endpoint"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._totals = AcceptanceTotals()  # since start: the gauges' source

    # ---- scheduler observer ---------------------------------------------------------------------
    def on_finished(self, stats: SequenceStats, finish_reason: str) -> None:
        self.sequences.labels(finish_reason).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.verify_rounds.inc(stats.rounds)
        self.round_tokens.inc(stats.round_tokens)
        with self._lock:
            self._totals.add(stats)
            rates = self._totals.acceptance_per_position
            for i, (p, a) in enumerate(zip(stats.proposed_per_position, stats.accepted_per_position)):
                pos = str(i + 1)
                self.pos_proposed.labels(pos).inc(p)
                self.pos_accepted.labels(pos).inc(a)
                if rates[i] is not None:
                    self.acceptance.labels(pos).set(rates[i])
            self.proposed.inc(sum(stats.proposed_per_position))
            self.accepted.inc(sum(stats.accepted_per_position))
            if self._totals.mean_accepted_length is not None:
                self.mean_accepted.set(self._totals.mean_accepted_length)

    def on_round(self, batch_size: int, queue_length: int) -> None:
        self.batch_rounds.inc()
        self.batch_size_hist.observe(batch_size)
        self.batch_size.set(batch_size)
        self.queue_length.set(queue_length)

    # ---- exposition -----------------------------------------------------------------------------
    def render(self, batch_size: int, queue_length: int) -> tuple[bytes, str]:
        self.batch_size.set(batch_size)
        self.queue_length.set(queue_length)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
