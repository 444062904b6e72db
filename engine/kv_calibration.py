"""Statistics of a model's keys, values and queries from one forward pass over a short built-in text.

Quantized KV (engine/kv_transform.py) subtracts the keys' per-channel means before storing:
q·(k - c) differs from q·k by the same amount for every key a query sees, so softmax is unchanged
(values may be centred too: softmax·(v - c_v) + c_v equals softmax·v, the weights sum to one).
What changes is the range each quantization group has to cover. The key smoothing scales come from
the measured RMS of the centred keys and of the queries. All of it must stay fixed for the pool's
life (cached prefix blocks are shared between requests), hence one calibration pass at pool creation.

Under tensor parallelism every rank creates its pool at the same point and runs this same pass
(same text, same tokens), so the collectives inside the sharded model line up; each rank gets the
statistics of its own KV heads.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .attention import ContiguousBackend, ContiguousKV

# Mixed prose, dialogue, lists, numbers and code (written for this purpose; not any evaluation text).
CALIBRATION_TEXT = """\
The old lighthouse keeper climbed the spiral stairs every evening at dusk. He counted the steps
out loud, one hundred and twelve of them, and when he reached the lamp room he wiped the glass
with a soft cloth before striking a match. Ships passing the rocks that night would never know his
name, but they would see the beam sweep across the water every nine seconds.

"Can you tell me how to get to the train station?" she asked.
"Go straight for two blocks, turn left at the bakery, and it's on your right," he answered.
"Thanks! Is it far?" "About ten minutes on foot, five if you hurry."

Recipe for a simple bread: 500 g flour, 350 ml warm water, 10 g salt, 7 g dried yeast. Mix, knead
for ten minutes, let it rise for an hour, shape, rise again for 45 minutes, bake at 220 C for 30.

Quarterly report, 2023: revenue grew 12.4% to $3.8 million; costs rose 8.1%; the company hired 14
new employees and opened offices in Lisbon, Nairobi and Osaka. Net margin: 17.2% (2022: 14.9%).

User: What is the derivative of x^3 + 2x?
Assistant: The derivative is 3x^2 + 2. Each power term n*x^(n-1); the constant factor stays.

fn main() {
    let numbers = vec![4, 8, 15, 16, 23, 42];
    let total: i32 = numbers.iter().sum();
    println!("sum = {}", total);
}

SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id
WHERE orders.created_at > '2024-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;

<ul><li>Apples</li><li>Oranges</li><li>Pears</li></ul>

Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. Chlorophyll absorbs
mostly red and blue light, which is why leaves look green. In autumn the chlorophyll breaks down
and the yellow and orange pigments that were there all along become visible.

La vie est belle quand le soleil brille. Der Hund läuft schnell über die Wiese. El mar está en calma.

const sorted = items.filter(x => x.active).map(x => x.price * 1.2).sort((a, b) => a - b);
if (sorted.length === 0) { throw new Error("no active items"); }
"""

CALIBRATION_TOKENS = 512
CALIBRATION_PIECES = 8      # the text runs as this many sequences, each starting at another position
CALIBRATION_SPAN = 4096     # ... spread over the first this-many positions (or max_position_embeddings)


class _Recorder:
    """Attention backend for the calibration pass: exact attention through one ContiguousKV per
    sequence, plus the sums of every layer's keys and values (after RoPE, as the pool receives them)."""

    def __init__(self, num_layers: int, query_lens: list[int]):
        self.inner = ContiguousBackend([ContiguousKV(num_layers) for _ in query_lens], query_lens)
        self.layout = self.inner.layout
        self.sums: dict[int, tuple] = {}

    def attend(self, layer, q, k, v, *, scale, window=None):
        k32, v32 = k.astype(mx.float32), v.astype(mx.float32)
        hkv = k.shape[1]
        q2 = mx.square(q.astype(mx.float32)).reshape(q.shape[0], hkv, -1, q.shape[2]).mean(axis=2)  # per KV head
        self.sums[layer] = (k32.sum(axis=0), mx.square(k32).sum(axis=0), v32.sum(axis=0), q2.sum(axis=0))
        return self.inner.attend(layer, q, k, v, scale=scale, window=window)


def calibration_ids(tokenizer, n: int = CALIBRATION_TOKENS) -> list[int]:
    ids = tokenizer.encode(CALIBRATION_TEXT)
    while len(ids) < n:  # a tokenizer with long tokens: repeat the text
        ids = ids + ids
    return ids[:n]


def calibration_positions(model, n: int = CALIBRATION_TOKENS, pieces: int = CALIBRATION_PIECES) -> list[int]:
    """Positions of the n calibration tokens: `pieces` runs of n / pieces tokens whose starts are
    spread over the first CALIBRATION_SPAN positions. RoPE turns a key by an angle that grows with
    its position, so a mean over positions 0..n only would centre channels that keep turning at
    later positions; spread out, those average towards zero and the mean keeps what every position
    shares (the large offsets of the slowly turning channels)."""
    length = n // pieces
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None) or CALIBRATION_SPAN
    span = max(min(int(limit), CALIBRATION_SPAN) - length, 0)
    out = []
    for i in range(pieces):
        start = span * i // max(pieces - 1, 1)
        out.extend(range(start, start + length))
    return out


def kv_stats(model, tokenizer, n: int = CALIBRATION_TOKENS) -> dict:
    """Per layer [Hkv, D] float32 numpy statistics over the calibration text (None for a layer the
    pass did not reach): "k_mean", "v_mean", "k_rms" (of the centred keys) and "q_rms" (of the
    queries, RMS over the query heads that share a KV head). Rounded to float16 precision, so ranks
    whose activations differ in the last bits (tensor parallelism sums in another order) agree."""
    pieces = CALIBRATION_PIECES if n % CALIBRATION_PIECES == 0 else 1
    ids = calibration_ids(tokenizer, n)
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab:  # a tokenizer larger than the model's vocabulary (test models): stay inside it
        ids = [i % vocab for i in ids]
    positions = calibration_positions(model, n, pieces)
    rec = _Recorder(model.num_layers, [n // pieces] * pieces)
    logits = model(mx.array(ids, dtype=mx.int32), mx.array(positions, dtype=mx.int32), rec,
                   logits_rows=mx.array([n - 1], dtype=mx.int32))
    mx.eval(logits, list(rec.sums.values()))

    def f16(a):
        return np.array(a.astype(mx.float16).astype(mx.float32))

    out = {name: [None] * model.num_layers for name in ("k_mean", "v_mean", "k_rms", "q_rms")}
    for i, (ks, k2, vs, q2) in rec.sums.items():
        km = ks / n
        out["k_mean"][i], out["v_mean"][i] = f16(km), f16(vs / n)
        out["k_rms"][i] = f16(mx.sqrt(mx.maximum(k2 / n - km * km, 0)))
        out["q_rms"][i] = f16(mx.sqrt(q2 / n))
    return out


def kv_means(model, tokenizer, n: int = CALIBRATION_TOKENS) -> tuple[list, list]:
    """(key means, value means) per layer, see kv_stats."""
    st = kv_stats(model, tokenizer, n)
    return st["k_mean"], st["v_mean"]
