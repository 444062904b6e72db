"""Custom CUDA kernels are named after their text: MLX's on-disk PTX cache is keyed by name, across processes."""

import subprocess
import sys

from jang_serve.kernels import backend, qmm_cuda


def test_a_kernel_name_changes_with_its_defines_and_source():
    base, _ = qmm_cuda.fused_variant(3, True, 1e-5, (64, 12))
    other_heads, _ = qmm_cuda.fused_variant(3, True, 1e-5, (64, 16))   # another model's RoPE head count
    other_eps, _ = qmm_cuda.fused_variant(3, True, 1e-6, (64, 12))     # another model's norm eps
    names = [backend.kernel_name("jang_qgemv_fused_e3n1_0", qmm_cuda.SOURCE, h) for h in (base, other_heads, other_eps)]
    assert len(set(names)) == 3 and all(n.startswith("jang_qgemv_fused_e3n1_0_") for n in names)
    assert backend.kernel_name("k", qmm_cuda.SOURCE + " ", base) != names[0]      # another release's source


def test_a_kernel_name_is_the_same_in_every_process():
    code = "from jang_serve.kernels import backend; print(backend.kernel_name('k', 'src', '#define A 1'))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert runs == {backend.kernel_name("k", "src", "#define A 1") + "\n"}
