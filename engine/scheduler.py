"""Continuous-batching scheduler: waiting and running queues under a per-step token budget.

Each step, running decodes go first (1 token each), then unfinished prefills and then waiting
sequences (admitted in arrival order while `max_num_seqs` and free blocks allow) share the prefill
allowance: what is left of the token budget, capped at `prefill_chunk` tokens when the step also
decodes, so a long prompt is prefilled in chunks between decode steps and never stalls the
running streams for long (chunked prefill). When a running sequence cannot get a block, the
most recently admitted running sequence is preempted by recompute: its blocks are freed and it
goes back to the front of the waiting queue, to be prefilled again (prompt + output so far).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens to compute per sequence this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int | None = None):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.prefill_chunk = prefill_chunk or max_num_batched_tokens  # prefill cap while decodes run
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # Decodes first, so every running stream gets its token each step.
        for seq in [s for s in self.running if s.num_tokens - s.num_computed == 1]:
            if budget <= 0:
                break
            if seq.status == Status.RUNNING and self._reserve(seq, 1, batch, scheduled):
                budget -= 1
        # Prefill tokens: the rest of the budget when nothing decodes, else at most prefill_chunk.
        prefill = budget if not batch.seqs else min(budget, self.prefill_chunk)
        for seq in [s for s in self.running if s.num_tokens - s.num_computed > 1]:
            if prefill <= 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.num_tokens - seq.num_computed, prefill)
            if self._reserve(seq, n, batch, scheduled):
                prefill -= n
        if batch.preempted:
            return batch
        while self.waiting and prefill > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, prefill)
            if not self.blocks.ensure(seq, seq.num_computed + n):
                self.blocks.free_seq(seq)  # hold nothing while waiting
                seq.num_computed = 0
                break
            self.blocks.count_lookup(seq.num_tokens, hit)
            if not seq.admitted:
                seq.cached_tokens = hit
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.admitted = True
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            prefill -= n
        return batch

    def _reserve(self, seq: Sequence, n: int, batch: ScheduledBatch, scheduled: set[int]) -> bool:
        """Get blocks for n more tokens of a running seq, preempting the most recently admitted
        unscheduled sequence (or seq itself, last) while blocks run out. True if seq was scheduled."""
        while not self.blocks.ensure(seq, seq.num_computed + n):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim, batch)
            if victim is seq:
                return False
        batch.seqs.append(seq)
        batch.num_new.append(n)
        scheduled.add(seq.seq_id)
        return True
