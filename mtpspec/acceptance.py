"""Acceptance statistics of speculative decoding summed over many sequences.

Each sequence counts its verification rounds, the tokens those rounds emitted and, per draft
position, how many drafts were proposed and accepted (`decoding.loop.SequenceStats`). Summing
those counts and dividing once gives the exact aggregate; averaging per-sequence means would
weight short and long sequences alike, and averaging rounded means adds rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol


class SequenceCounts(Protocol):
    """What `AcceptanceTotals` reads of a sequence's statistics (`SequenceStats` has it)."""

    rounds: int
    round_tokens: int
    proposed_per_position: list[int]
    accepted_per_position: list[int]
    draft_time: float
    decode_time: float


@dataclass
class AcceptanceTotals:
    """Counts summed over sequences, and the statistics derived from them.

    mean_accepted_length: tokens emitted per verification round (accepted drafts + the bonus
        token), over all rounds of all sequences; None before any round.
    acceptance_per_position: for draft position i (1-based), accepted / proposed over all rounds
        that proposed a token at i; None for a position nothing was proposed at.
    mean_k: drafted tokens per round.
    drafter_time_share: drafting time / decode time, summed over the sequences.
    """

    sequences: int = 0
    rounds: int = 0
    round_tokens: int = 0
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_time: float = 0.0
    decode_time: float = 0.0

    @classmethod
    def of(cls, stats: Iterable[SequenceCounts]) -> "AcceptanceTotals":
        totals = cls()
        for st in stats:
            totals.add(st)
        return totals

    def add(self, st: SequenceCounts) -> None:
        """Add one sequence's counts."""
        self.sequences += 1
        self.rounds += st.rounds
        self.round_tokens += st.round_tokens
        self.draft_time += st.draft_time
        self.decode_time += st.decode_time
        for i, (p, a) in enumerate(zip(st.proposed_per_position, st.accepted_per_position)):
            if i == len(self.proposed_per_position):
                self.proposed_per_position.append(0)
                self.accepted_per_position.append(0)
            self.proposed_per_position[i] += p
            self.accepted_per_position[i] += a

    @property
    def proposed(self) -> int:
        return sum(self.proposed_per_position)

    @property
    def mean_accepted_length(self) -> float | None:
        return self.round_tokens / self.rounds if self.rounds else None

    @property
    def acceptance_per_position(self) -> list[float | None]:
        return [a / p if p else None for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    @property
    def mean_k(self) -> float | None:
        return self.proposed / self.rounds if self.rounds else None

    @property
    def drafter_time_share(self) -> float | None:
        return self.draft_time / self.decode_time if self.decode_time > 0 else None
