"""The synchronous engine: one `step()` schedules, runs the model, samples and emits deltas.

`AsyncEngine` drives this from its background thread; tests and benchmarks may drive it directly.
"""

from __future__ import annotations

import random
import threading

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .async_decode import DecodePipeline
from .block_manager import BlockManager
from .engine_config import EngineConfig
from .kv_pool import KVPool
from .model_runner import ModelRunner
from .sampler import sample
from .sampling_params import Delta, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status


def model_dtype(model) -> mx.Dtype:
    """The activation dtype: that of the first floating-point parameter."""
    for _, a in tree_flatten(model.parameters()):
        if mx.issubdtype(a.dtype, mx.floating):
            return a.dtype
    return mx.float32


def unpack_loaded(loaded):
    """(model, tokenizer, config dict) from a LoadedModel or a (model, tokenizer, config) triple."""
    if isinstance(loaded, (tuple, list)):
        if len(loaded) != 3:
            raise ValueError("expected a LoadedModel or a (model, tokenizer, config) triple")
        return tuple(loaded)
    return loaded.model, getattr(loaded, "tokenizer", None), getattr(loaded, "config", {}) or {}


class EngineCore:
    def __init__(self, loaded, config: EngineConfig | None = None):
        self.model, self.tokenizer, self.model_config = unpack_loaded(loaded)
        self.config = config or EngineConfig()
        self.dtype = model_dtype(self.model)
        self.pool = KVPool.for_model(self.model, self.config, self.dtype, self.tokenizer)
        from .models.dense import densify_for_device  # after the pool: its KV transform rewrites k/v weights

        self.dense = densify_for_device(self.model, self.dtype, self.config.cpu_dense_gb)
        if self.config.on_gpu_by_default("fuse_projections"):  # after the pool: its KV transform reads q/k/v
            from .models.layers import fuse_projections

            fuse_projections(self.model)
        from .models.compiled import compile_blocks

        compile_blocks(self.model, self.config.max_num_seqs, on=self.config.compile_decode is not False)
        self.blocks = BlockManager(self.pool.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   self.config.prefill_chunk())
        self.runner = ModelRunner(self.model, self.pool)
        self.pipeline = DecodePipeline(self)  # pipelined decode (engine/async_decode.py)
        limit = self.config.max_model_len or self.model_config.get("max_position_embeddings") or 1 << 30
        self.max_model_len = min(int(limit), self.pool.capacity_tokens)
        self.vocab_size = int(self.model_config.get("vocab_size") or 0) or None
        self.eos_ids = self._eos_ids()
        self.requests: dict[str, list[Sequence]] = {}
        self._rng = random.Random(self.config.seed)
        self._grammar = None
        self._grammar_lock = threading.Lock()
        self.num_steps = 0
        self.generated_tokens = 0
        self.num_requests = 0

    def _eos_ids(self) -> set[int]:
        ids = set(getattr(self.tokenizer, "eos_token_ids", None) or ())
        eos = self.model_config.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    # -- requests -----------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this engine's max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        if self.vocab_size:
            bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        if params.needs_grammar:
            if self.tokenizer is None:
                raise ValueError("response_format json needs a tokenizer; this engine has none")
            self.grammar.grammar(params.response_format)  # compile now: a bad schema fails here

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, prompt_ids, params, 0)
        self._init_seq(seq)
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)
        self.num_requests += 1

    def _init_seq(self, seq: Sequence) -> None:
        p = seq.params
        seed = p.seed if p.seed is not None else self._rng.getrandbits(63)
        seed = (seed + 0x9E3779B97F4A7C15 * seq.index) % (1 << 63) if seq.index else seed % (1 << 63)
        seq.rng_key = mx.random.key(seed)
        if self.tokenizer is not None:
            from .detokenizer import IncrementalDetokenizer

            seq.detok = IncrementalDetokenizer(self.tokenizer, stop=list(p.stop))
        if p.needs_grammar:
            seq.matcher = self.grammar.matcher(p.response_format)

    @property
    def grammar(self):
        with self._grammar_lock:
            if self._grammar is None:
                from .grammar import GrammarFactory

                self._grammar = GrammarFactory(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammar

    def abort(self, request_id: str) -> list[Delta]:
        """Stop a request now; its blocks go back to the pool before this returns."""
        out = []
        for seq in self.requests.pop(request_id, []):
            if seq.is_finished:
                continue
            self.scheduler.remove(seq)
            self.pipeline.drop(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            out.append(self._delta(seq, "", [], None, "abort"))
        return out

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _async_decode(self) -> bool:
        """Pipelined decode is on: config.async_decode (None: on a GPU), and a plain ModelRunner
        (tensor-parallel followers replay host-side batches, so TP runs synchronously)."""
        return self.config.on_gpu_by_default("async_decode") and type(self.runner) is ModelRunner

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        if self._async_decode() and self.pipeline.eligible():
            return self.pipeline.step()
        flushed = self.pipeline.resolve()  # an in-flight pipelined step ends before a synchronous one
        if not self.scheduler.has_work():
            return flushed
        return flushed + self._step_sync()

    def _step_sync(self) -> list[Delta]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        self.num_steps += 1
        logits, idx = self.runner.run(batch.seqs, batch.num_new)
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
        if logits is None:
            return []
        seqs = [batch.seqs[i] for i in idx]
        rows = list(range(len(seqs)))
        for r, seq in enumerate(list(seqs)):
            if seq.pending_forks:
                for child in self._fork(seq):
                    seqs.append(child)
                    rows.append(r)
        if len(rows) != logits.shape[0]:
            logits = logits[mx.array(rows)]
        masks = self._grammar_masks(seqs, logits.shape[-1])
        tokens, lps = sample(logits, seqs, masks)
        out = []
        for seq, tok, lp in zip(seqs, tokens, lps):
            out.append(self._append(seq, tok, lp))
        return out

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Children of an n > 1 request after its prompt's prefill: they share the full blocks
        and get a copy of the partial last block (or, if none is free, queue for recompute)."""
        kids, bs = [], self.config.block_size
        for index in range(1, parent.pending_forks + 1):
            child = Sequence(parent.request_id, parent.token_ids, parent.params, index)
            child.cached_tokens = parent.cached_tokens
            child.admitted = True
            self._init_seq(child)
            self.requests[parent.request_id].append(child)
            full = parent.num_computed // bs
            partial = parent.num_computed % bs != 0
            if partial and self.blocks.num_free == 0:
                self.scheduler.add(child)  # recompute later: prefix caching makes it cheap
                continue
            self.blocks.share(child, parent.block_table[:full])
            if partial:
                b = self.blocks.allocate_new()
                self.pool.copy_blocks([(parent.block_table[full], b)])
                child.block_table.append(b)
            child.num_computed = parent.num_computed
            child.block_hashes = list(parent.block_hashes)
            child.num_hashed_blocks = parent.num_hashed_blocks
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
            kids.append(child)
        parent.pending_forks = 0
        return kids

    def _grammar_masks(self, seqs: list[Sequence], vocab: int) -> np.ndarray | None:
        if not any(s.matcher is not None for s in seqs):
            return None
        masks = np.ones((len(seqs), vocab), dtype=bool)
        for r, seq in enumerate(seqs):
            if seq.matcher is not None:
                masks[r] = self.grammar.allowed(seq.matcher, vocab)
        return masks

    def _append(self, seq: Sequence, tok: int, lp, replace: bool = False) -> Delta:
        """Record a sampled token (replace=True: it fills the placeholder of a pipelined step)."""
        p = seq.params
        if replace:
            seq.token_ids[-1] = tok
        else:
            seq.token_ids.append(tok)
        self.generated_tokens += 1
        finish, text = None, ""
        if seq.matcher is not None:
            self.grammar.consume(seq.matcher, tok)
            if self.grammar.finished(seq.matcher):
                finish = "stop"
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            finish = "stop"
        elif seq.detok is not None:
            text = seq.detok.add(tok)
            if seq.detok.stopped:
                finish = "stop"
        if finish is None and p.max_tokens is not None and seq.num_output >= p.max_tokens:
            finish = "length"
        if finish is None and seq.num_tokens >= self.max_model_len:
            finish = "length"
        if finish is not None:
            if seq.detok is not None:
                text += seq.detok.flush()
            self.scheduler.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, finish
            group = self.requests.get(seq.request_id, [])
            if all(s.is_finished for s in group) and not seq.pending_forks:
                self.requests.pop(seq.request_id, None)
        return self._delta(seq, text, [tok], lp, finish)

    def _delta(self, seq, text, toks, lp, finish) -> Delta:
        return Delta(request_id=seq.request_id, index=seq.index, text=text, token_ids=toks,
                     logprobs=[lp] if (lp is not None and toks) else None, finish_reason=finish,
                     prompt_tokens=seq.prompt_len, completion_tokens=seq.num_output,
                     cached_tokens=seq.cached_tokens)

    # -- helpers ------------------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "blocks_total": b.num_blocks,
            "blocks_used": b.num_used,
            "blocks_free": b.num_free,
            "blocks_cached": b.num_cached,
            "block_size": self.config.block_size,
            "kv_dtype": self.config.kv_dtype,
            "kv_capacity_tokens": self.pool.capacity_tokens,
            "kv_bytes": self.pool.nbytes,
            "prefix_hit_rate": b.hit_rate,
            "prefix_hit_tokens": b.hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.num_steps,
            "generated_tokens": self.generated_tokens,
            "requests": self.num_requests,
            "max_model_len": self.max_model_len,
        }

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; returns the generated token ids of each (index 0)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{self.num_requests + i}" for i in range(len(prompts))]
        for rid, pr, p in zip(ids, prompts, plist):
            self.add_request(rid, pr, p)
        out = {rid: [] for rid in ids}
        while self.has_work():
            for d in self.step():
                if d.index == 0 and d.request_id in out:
                    out[d.request_id].extend(d.token_ids)
        return [out[r] for r in ids]
