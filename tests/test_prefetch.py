"""kernels/prefetch.py off CUDA: nothing is queued and nothing changes (the CUDA path is measured on the device:
bench/prefetch_probe.py, bench/results/prefetch-h100.json)."""

import mlx.core as mx
import numpy as np

from jang_serve.kernels import prefetch


def test_prefetch_is_a_no_op_off_cuda(monkeypatch):
    a = mx.array(np.arange(16, dtype=np.int32))
    assert prefetch.to_gpu(a) is False
    assert np.array(a).tolist() == list(range(16))
    monkeypatch.setenv("JANG_PREFETCH", "0")
    assert prefetch.enabled() is False


def test_the_buffer_protocol_view_shares_the_arrays_memory():
    # to_gpu finds the pointer through numpy's view of the array: it must be the array's own memory, not a copy
    a = mx.array(np.arange(4, dtype=np.int32))
    v = np.asarray(a)
    assert not v.flags.owndata
    assert np.asarray(a).__array_interface__["data"][0] == v.__array_interface__["data"][0]
