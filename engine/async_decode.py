"""Pipelined decode: build step t+1's graph on the host while the GPU still runs step t.

A synchronous step builds the lazy graph (Python, ~6 ms for a 32-layer model), evaluates it and
reads the sampled tokens back before the next step can start, so host and GPU take turns. Here
a pure-decode step instead:
  1. feeds each sequence's previous token as the device array it was sampled into (no read-back),
  2. samples on the device and queues the step with `mx.async_eval`,
  3. only then reads the previous step's tokens (which are done by now, or nearly) and runs the
     host-side bookkeeping for them: detokenizer, stop strings, EOS, max_tokens, deltas.
Each sequence carries one placeholder token (`PLACEHOLDER`) for its in-flight sample, so the
scheduler's counts (num_tokens, blocks) are those of the synchronous engine. Finish checks lag
one step, as in mlx-lm: a sequence that stops on a token still has one more token computed and
thrown away. The tokens, and with a seed the samples, are the same as the synchronous engine's.

Only decode batches whose every sequence samples on the device take this path (no penalties,
logit_bias, grammar or logprobs); anything else flushes the pipeline and runs synchronously.
"""

from __future__ import annotations

import time

import mlx.core as mx

from .paged_attention import PagedBackend
from .sampler import draw_tokens
from .sequence import Sequence

PLACEHOLDER = -1


def device_samplable(seq: Sequence) -> bool:
    """True when the sampler's work for this sequence needs nothing from the host."""
    p = seq.params
    return (seq.matcher is None and not seq.pending_forks and not p.logprobs and p.top_logprobs == 0
            and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and not p.logit_bias)


def sample_on_device(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    """Token ids [S] (int32, lazy) with the math of sampler.sample for penalty-free rows."""
    return draw_tokens(logits, seqs).astype(mx.int32)


class DecodePipeline:
    """Owns the in-flight step of an EngineCore (see the module docstring)."""

    def __init__(self, core):
        self.core = core
        self.tokens: mx.array | None = None   # device tokens of the in-flight step
        self.seqs: list[Sequence] = []        # their sequences, row by row
        self.rows: dict[int, int] = {}        # seq_id -> row, for sequences holding a placeholder
        self.timing: dict | None = None       # set to {} to accumulate host time per phase (benchmarks)

    @property
    def pending(self) -> bool:
        return self.tokens is not None

    def eligible(self) -> bool:
        """Would the next scheduled batch be a pure decode we can run on device tokens?"""
        sch = self.core.scheduler
        if sch.waiting or not sch.running:
            return False
        return all(s.num_tokens - s.num_computed == 1 and device_samplable(s) for s in sch.running)

    def step(self) -> list:
        """One pipelined decode step (call only when eligible()). Returns the previous step's deltas."""
        core = self.core
        batch = core.scheduler.schedule()
        if batch.empty or any(n != 1 for n in batch.num_new):  # cannot happen after eligible(); be safe
            raise RuntimeError("pipelined decode got a batch that is not a pure decode")
        core.num_steps += 1
        seqs = batch.seqs
        t0 = time.perf_counter()
        logits = self._forward(seqs)
        toks = sample_on_device(logits, seqs)
        t1 = time.perf_counter()
        mx.async_eval(toks, core.pool.arrays())
        t2 = time.perf_counter()
        out = self.resolve()  # the previous step's tokens, read while this one runs
        if self.timing is not None:  # build the graph / dispatch it / wait for and process the previous step
            t3, tm = time.perf_counter(), self.timing
            for key, dt in (("build_s", t1 - t0), ("dispatch_s", t2 - t1), ("resolve_s", t3 - t2)):
                tm[key] = tm.get(key, 0.0) + dt
            tm["steps"] = tm.get("steps", 0) + 1
        for seq in seqs:
            seq.num_computed += 1
            if seq.is_finished:   # stopped on the previous token: this step's row is thrown away
                continue
            core.blocks.register_full_blocks(seq)
        self.tokens, self.seqs = toks, seqs
        for r, seq in enumerate(seqs):
            if not seq.is_finished:
                seq.token_ids.append(PLACEHOLDER)
                self.rows[seq.seq_id] = r
        return out

    def _forward(self, seqs: list[Sequence]) -> mx.array:
        """The model on one new token per sequence, lazy; inputs come from the in-flight step's
        device tokens where a sequence holds a placeholder."""
        runner = self.core.runner
        # the runner's flat batch (positions, slots, block tables); placeholder rows hold PLACEHOLDER
        host, positions, slots, tables, qlens, clens, _, aux, _ = runner.prepare(seqs, [1] * len(seqs))
        src = [self.rows.get(seq.seq_id, -1) for seq in seqs]
        if self.tokens is None or all(r < 0 for r in src):
            tokens = host
        elif src == list(range(len(self.seqs))) and len(seqs) == len(self.seqs):
            tokens = self.tokens  # the same sequences in the same order: feed the samples straight back
        else:
            n = self.tokens.shape[0]
            both = mx.concatenate([self.tokens, host])
            tokens = both[mx.array([r if r >= 0 else n + i for i, r in enumerate(src)], dtype=mx.int32)]
        backend = PagedBackend(self.core.pool, slots, tables, qlens, clens, aux)
        logits = runner.model(tokens, positions, backend, logits_rows=None)
        return logits.astype(mx.float32)

    def resolve(self) -> list:
        """Read the in-flight tokens and emit their deltas (finish checks, detokenizer)."""
        if self.tokens is None:
            return []
        toks = self.tokens.tolist()
        seqs, rows = self.seqs, self.rows
        self.tokens, self.seqs, self.rows = None, [], {}
        out = []
        for seq, tok in zip(seqs, toks):
            if rows.get(seq.seq_id) is None or seq.is_finished:  # aborted, or finished earlier
                continue
            out.append(self.core._append(seq, tok, None, replace=True))
        return out

    def drop(self, seq: Sequence) -> None:
        """Forget seq's in-flight token (abort): take its placeholder back out."""
        if self.rows.pop(seq.seq_id, None) is not None and seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()
