"""One sequence (one choice of one request): its tokens, KV blocks and progress."""

from __future__ import annotations

import enum
import itertools

from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int = 0):
        self.seq_id = next(_ids)
        self.request_id, self.index, self.params = request_id, index, params
        self.token_ids: list[int] = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.num_computed = 0  # tokens whose K/V sit in the pool
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_hashes: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.admitted = False
        self.pending_forks = params.n - 1 if index == 0 else 0  # children created after the prefill
        # per-sequence sampling state, set by the engine
        self.rng_key = None
        self.detok = None
        self.matcher = None
        self.grammar_done = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __repr__(self):
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, computed={self.num_computed}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
