"""Continuous-batching scheduler: waiting and running queues under a per-step token budget.

Each step, running sequences go first (decodes take 1 token, unfinished prefills take what is
left of the budget: chunked prefill), then waiting sequences are admitted in arrival order while
the budget, `max_num_seqs` and free blocks allow. When a running sequence cannot get a block, the
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
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
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
        # Decodes first, then unfinished prefills (stable), so a long prompt never starves decodes.
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1)
        scheduled: set[int] = set()
        for seq in order:
            if budget <= 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.ensure(seq, seq.num_computed + n):
                victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
                victim = victims[-1] if victims else seq
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            batch.seqs.append(seq)
            batch.num_new.append(n)
            scheduled.add(seq.seq_id)
            budget -= n
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
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
            budget -= n
        return batch
