"""A step's int32 inputs as views of one array (engine/step_arrays.py), and the model runner's use of them."""

import mlx.core as mx
import numpy as np

from jang_serve.engine.kv_pool import KVPool
from jang_serve.engine.model_runner import ModelRunner
from jang_serve.engine.paged_attention import PagedBackend
from jang_serve.engine.sampling_params import SamplingParams
from jang_serve.engine.sequence import Sequence
from jang_serve.engine.step_arrays import pack, step_inputs


def test_pack_gives_back_every_part_with_its_shape_and_values():
    parts = dict(a=[7], b=np.arange(6).reshape(2, 3), c=[], d=[-1, 5])
    out = pack(parts)
    assert list(out) == ["a", "b", "c", "d"]
    for name, want in parts.items():
        got = np.array(out[name])
        assert got.dtype == np.int32 and got.shape == np.shape(want), name
        assert got.tolist() == np.asarray(want).tolist(), name


def test_pack_of_one_value_and_of_nothing():
    # one token's position alone would be a 4-byte array; the buffer behind the view holds MIN_ENTRIES
    out = pack(dict(p=[3]))
    assert out["p"].shape == (1,) and np.array(out["p"]).tolist() == [3]
    assert pack({}) == {}


def test_step_inputs_split_slots_into_blocks_and_offsets():
    slots = [0, 15, 16, 37]
    tok, pos, slot, tab, aux = step_inputs([1, 2, 3, 4], [0, 1, 2, 3], slots, [[0, 1, 2], [2, 0, 0]],
                                           [4, 9], [3], block_size=16)
    assert np.array(aux.blocks).tolist() == [0, 0, 1, 2]
    assert np.array(aux.offsets).tolist() == [0, 15, 0, 5]
    assert np.array(aux.lens).tolist() == [4, 9]
    assert np.array(aux.rows).tolist() == [3]
    assert np.array(tab).tolist() == [[0, 1, 2], [2, 0, 0]]
    assert np.array(slot).tolist() == slots and np.array(tok).tolist() == [1, 2, 3, 4]
    assert np.array(pos).tolist() == [0, 1, 2, 3]
    assert step_inputs([1], [0], [0], [[0]], [1], [], block_size=16)[4].rows is None


def test_runner_prepare_matches_the_sequences():
    pool = KVPool(1, 8, 4, 1, 8)
    a, b = Sequence("a", list(range(6)), SamplingParams()), Sequence("b", list(range(3)), SamplingParams())
    a.block_table, b.block_table = [5, 2], [7]
    a.num_computed = 5   # decodes token 5; b prefills all 3
    tok, pos, slots, tables, ql, cl, rows, aux, idx = ModelRunner(None, pool).prepare([a, b], [1, 3])
    assert np.array(tok).tolist() == [5, 0, 1, 2] and np.array(pos).tolist() == [5, 0, 1, 2]
    assert np.array(slots).tolist() == [2 * 4 + 1, 28, 29, 30]
    assert np.array(tables).tolist() == [[5, 2], [7, 0]]
    assert (ql, cl, rows, idx) == ([1, 3], [6, 3], [0, 3], [0, 1])
    be = PagedBackend(pool, slots, tables, ql, cl, aux)
    assert np.array(be.context_lens_arr).tolist() == [6, 3]
    assert [np.array(s).tolist() for s in be.slots] == [[2, 7, 7, 7], [1, 0, 1, 2]]
    assert np.array(aux.rows).tolist() == [0, 3]
