"""Rank 0's step plan, broadcast to the other ranks through mx.distributed.

Rank 0 alone runs the scheduler and block manager; every step it broadcasts the prepared flat
batch (token ids, positions, slots, block tables, query/context lengths, logits rows) plus the
KV block copies made since the last step (forks of n > 1 requests). The followers replay it
through `ModelRunner.execute`, so all ranks write the same slots of their own pools and join the
same collectives in the same order. A broadcast is an all_sum where only rank 0 contributes:
a fixed 8-int header first (op and sizes), then one int32 payload of the announced length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

HEADER = 8
OP_STEP = 1
OP_STOP = 2


def broadcast_ints(values, length: int, group, root: bool) -> np.ndarray:
    """Rank 0's int32 values (length `length`) on every rank."""
    if root:
        a = mx.array(np.asarray(values, dtype=np.int32).reshape(length))
    else:
        a = mx.zeros((length,), dtype=mx.int32)
    out = mx.distributed.all_sum(a, group=group)
    mx.eval(out)
    return np.array(out)


def broadcast_json(obj, group, root: bool):
    """A small JSON value from rank 0 to every rank."""
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8).astype(np.int32) if root else None
    n = int(broadcast_ints([len(data)] if root else None, 1, group, root)[0])
    got = broadcast_ints(data, n, group, root)
    return json.loads(got.astype(np.uint8).tobytes().decode())


@dataclass
class StepPlan:
    tokens: list[int]
    positions: list[int]
    slots: list[int]
    tables: np.ndarray  # int32 [B, W]
    query_lens: list[int]
    context_lens: list[int]
    rows: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)

    def encode(self) -> tuple[list[int], np.ndarray]:
        b, w = self.tables.shape
        header = [OP_STEP, len(self.tokens), b, w, len(self.rows), len(self.copies), 0, 0]
        parts = [self.tokens, self.positions, self.slots, self.tables.reshape(-1), self.query_lens,
                 self.context_lens, self.rows, np.asarray(self.copies, dtype=np.int64).reshape(-1)]
        return header, np.concatenate([np.asarray(p, dtype=np.int32).reshape(-1) for p in parts])

    @classmethod
    def decode(cls, header, payload: np.ndarray) -> "StepPlan":
        _, t, b, w, r, c = (int(x) for x in header[:6])
        cuts = np.cumsum([t, t, t, b * w, b, b, r, 2 * c])
        tok, pos, slot, tab, ql, cl, rows, cp, _ = np.split(payload, cuts)
        return cls(tok.tolist(), pos.tolist(), slot.tolist(), tab.reshape(b, w), ql.tolist(), cl.tolist(),
                   rows.tolist(), [tuple(x) for x in cp.reshape(c, 2).tolist()])

    def arrays(self):
        """The `ModelRunner.execute` arguments."""
        i32 = mx.int32
        return (mx.array(self.tokens, dtype=i32), mx.array(self.positions, dtype=i32),
                mx.array(self.slots, dtype=i32), mx.array(self.tables, dtype=i32),
                self.query_lens, self.context_lens, self.rows)


def send_plan(plan: StepPlan, group) -> None:
    header, payload = plan.encode()
    broadcast_ints(header, HEADER, group, root=True)
    broadcast_ints(payload, len(payload), group, root=True)


def recv_plan(group) -> StepPlan | None:
    """The next plan from rank 0, or None when rank 0 says stop."""
    header = broadcast_ints(None, HEADER, group, root=False)
    if int(header[0]) == OP_STOP:
        return None
    if int(header[0]) != OP_STEP:
        raise RuntimeError(f"unexpected tensor-parallel op {int(header[0])} from rank 0")
    n = int(header[1]) * 3 + int(header[2]) * (int(header[3]) + 2) + int(header[4]) + 2 * int(header[5])
    return StepPlan.decode(header, broadcast_ints(None, n, group, root=False))
