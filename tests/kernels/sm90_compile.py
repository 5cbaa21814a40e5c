"""Compiles every Triton kernel for an H100 (sm_90) on a machine without a GPU, as the GPU launch would, and prints
each kernel's shared memory, registers and local memory (spills; from the cuobjdump that ships with Triton) and whether its loads were
software-pipelined. Run with TRITON_INTERPRET unset (the
interpreter accepts programs the GPU compiler rejects, e.g. tl.dot with fewer than 16 rows).

    env -u TRITON_INTERPRET python3 tests/kernels/sm90_compile.py [--all]

Without --all: bf16 only (and one float32 shape), and the smallest and largest head_dim (about 20 s with a cold Triton cache on 2 cores).
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vdeploy_kernels import attention  # noqa: E402
from vdeploy_kernels.activation import _silu_and_mul_kernel  # noqa: E402
from vdeploy_kernels.kv_cache import _write_kv_kernel  # noqa: E402
from vdeploy_kernels.linear import _fused_linear_kernel, _linear_config  # noqa: E402
from vdeploy_kernels.rms_norm import _rms_norm_kernel  # noqa: E402  (kernels.rms_norm the attribute is the function)
from vdeploy_kernels.rotary import _rotary_cache_kernel, _rotary_kernel  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 227 * 1024
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
FLOAT_ARGS = {"qk_scale", "eps"}


def compile_for_h100(kernel, dtype: str, pointer_dtypes: dict[str, str], constexprs: dict, num_warps: int = 4):
    """Pointers default to `dtype`; ints are i32. Pointers and strides get the 16-divisibility that a launch with
    torch tensors specialises them to, so the compiler sees what it sees on the GPU."""
    names = kernel.arg_names
    if "PDL" in names:  # as a Hopper launch compiles it: with programmatic dependent launch
        constexprs = {**constexprs, "PDL": True}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, dtype)
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or n.startswith("stride")]
    source = ASTSource(
        kernel,
        signature,
        {(names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    compiled = triton.compile(source, target=H100, options={"num_warps": num_warps})
    shared = compiled.metadata.shared
    pipelined = "async_copy_global_to_local" in compiled.asm["ttgir"]
    registers, local = register_use(compiled.asm["cubin"])
    print(f"{kernel.__name__:22} {dtype:4} shared {shared:6} B  regs {registers:3}  local {local:4} B  "
          f"pipelined={pipelined!s:5}  {constexprs}")
    assert shared <= H100_SHARED_MEMORY, f"{kernel.__name__} needs {shared} B of shared memory"
    assert local == 0, f"{kernel.__name__} spills {local} B per thread to local memory"
    return pipelined


def register_use(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, bytes of local memory per thread: spills or a stack array) from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(CUOBJDUMP), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    return int(re.search(r"REG:(\d+)", report.stdout).group(1)), int(re.search(r"LOCAL:(\d+)", report.stdout).group(1))


# (query heads per KV head, head_dim, block_size): Qwen2.5-0.5B, SmolLM2, Llama-3-8B, a head_dim-256 model.
ATTENTION_SHAPES = [(7, 64, 16), (3, 64, 32), (4, 128, 16), (2, 256, 16)]


def attention_kernels(dtype: str, shapes: list[tuple[int, int, int]]) -> list[bool]:
    tables = {"block_tables_ptr": "i32", "seq_lens_ptr": "i32", "cu_seqlens_q_ptr": "i32"}
    partials = {"part_out_ptr": "fp32", "part_max_ptr": "fp32", "part_sum_ptr": "fp32"}
    rotary_inputs = {"positions_ptr": "i64", "cos_sin_ptr": "fp32", "slot_mapping_ptr": "i64"}
    pipelined = []
    for group, head_dim, block_size in shapes:
        common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_N=attention._block_n(head_dim),
                      PRECISION="ieee" if dtype == "fp32" else "tf32")
        for partial in (False, True):  # the fused rotary variant with partials (the batch-1 decode path)
            decode = dict(common, BLOCK_G=16, BLOCK_SIZE=block_size, PARTIAL=partial, SLIDING=partial, ROTARY=partial,
                          HALF_ROT=head_dim // 2, IS_NEOX=True)
            pointers = {**tables, **partials, **rotary_inputs}
            pipelined.append(compile_for_h100(attention._decode_split_kernel, dtype, pointers, decode))
        reduce = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_S=attention._REDUCE_ELEMENTS // head_dim)
        compile_for_h100(attention._decode_reduce_kernel, dtype, partials, reduce)
        block_g = triton.next_power_of_2(group)
        rows, warps = attention._prefill_tile(head_dim)
        for paged, causal, sliding in [(True, True, False), (True, True, True), (False, False, False)]:
            prefill = dict(common, BLOCK_G=block_g, BLOCK_Q=rows // block_g, BLOCK_SIZE=block_size if paged else 1,
                           PAGED=paged, CAUSAL=causal, SLIDING=sliding)
            pipelined.append(compile_for_h100(attention._prefill_kernel, dtype, tables, prefill, warps))
    return pipelined


def elementwise_kernels(dtype: str) -> None:
    compile_for_h100(_write_kv_kernel, dtype, {"slot_mapping_ptr": "i64"},
                     dict(NUM_HEADS=2, HEAD_DIM=64, BLOCK_H=2, BLOCK_D=64, BLOCK_SIZE=16))
    for add_residual in (False, True):
        compile_for_h100(_rms_norm_kernel, dtype, {}, dict(HIDDEN=896, BLOCK=1024, ADD_RESIDUAL=add_residual))
    compile_for_h100(_silu_and_mul_kernel, dtype, {}, dict(D=4864, BLOCK=1024))
    for is_neox, half_rot, head_dim in [(True, 32, 64), (False, 16, 128)]:
        rotary_constexprs = dict(NUM_Q_HEADS=14, NUM_K_HEADS=2, BLOCK_QH=16, BLOCK_KH=2, HEAD_DIM=head_dim,
                                 HALF_ROT=half_rot, BLOCK_R=half_rot, BLOCK_P=triton.next_power_of_2(max(head_dim - 2 * half_rot, 1)),
                                 IS_NEOX=is_neox)
        compile_for_h100(_rotary_kernel, dtype, {"positions_ptr": "i64", "cos_sin_ptr": "fp32"},
                         rotary_constexprs)
        compile_for_h100(_rotary_cache_kernel, dtype,
                         {"positions_ptr": "i64", "cos_sin_ptr": "fp32", "slot_mapping_ptr": "i64"},
                         dict(rotary_constexprs, BLOCK_D=head_dim, BLOCK_SIZE=16))
    # fused_linear at Qwen2.5-0.5B's qkv and down projections, with the tiles it picks for 1 and 16 rows.
    for rows in (1, 16):
        for n, k, norm, gate_up in [(1152, 896, True, False), (896, 4864, False, True)]:
            block_n, block_k, num_warps = _linear_config(rows, n, k)
            linear_constexprs = dict(N=n, K=k, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm,
                                     GATE_UP=gate_up, HAS_BIAS=norm, HAS_RESIDUAL=gate_up)
            compile_for_h100(_fused_linear_kernel, dtype, {}, linear_constexprs, num_warps)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    everything = "--all" in sys.argv
    pipelined = []
    for dtype in ("bf16", "fp16") if everything else ("bf16",):
        pipelined += attention_kernels(dtype, ATTENTION_SHAPES if everything else ATTENTION_SHAPES[::3])
        elementwise_kernels(dtype)
    attention_kernels("fp32", ATTENTION_SHAPES[:1])  # full-precision products: correctness, not speed
    assert all(pipelined), "an attention kernel's K/V loads were not software-pipelined"
    print("all kernels compile for sm_90")


if __name__ == "__main__":
    main()
