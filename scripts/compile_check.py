"""Compile every Triton kernel for Hopper (sm_90) on a machine without a GPU.

The CPU tests run the kernels in the Triton interpreter, which accepts code the compiler
rejects; this builds each kernel through the real pipeline (TTIR, TTGIR with wgmma, LLVM,
PTX, ptxas) for one or two representative specializations, with whatever triton is
installed. Run it with the GPU machine's triton (3.6) too: `pip install --no-deps --target
DIR triton==3.6.0` and put DIR first on PYTHONPATH.
Usage: python scripts/compile_check.py   (exit status 1 if a kernel fails to compile)
       python scripts/compile_check.py --candidates
       python scripts/compile_check.py --gluon   (the warp-specialized Gluon forward's configurations)
       python scripts/compile_check.py --gluon-bwd   (the Gluon backward prototype)
The second compiles every GPU launch candidate of the forward, backward and decode kernels
(bf16, head dim 128, causal; decoding with a contiguous cache, one query, GQA 4) and prints each one's registers, stack (spilled registers
live there) and static shared memory from the cubin: a candidate that spills kilobytes
per thread is slow before anything is timed.
"""

import os
import re
import subprocess
import sys
import tempfile
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check needs compiled kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modelaccel.attention import decode, flash_bwd, flash_fwd, kv_append  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# Scalar arguments are int32 unless named here.
FLOAT_ARGS = {"qk_scale", "softcap_scale", "softmax_scale", "dropout_p"}
# Every kernel with all of its options on where they combine: varlen, causal, ALiBi, dropout.
ATTENTION = dict(BLOCK_D=128, HEADDIM=128, HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=False, HAS_ALIBI=True,
                 HAS_DROPOUT=True, IS_VARLEN=True, UPCAST_DOT=False)
DECODE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, HEADDIM=128, PAGED=True, PAGE_SIZE=16, SAME_KV_STRIDES=True,
              HAS_BATCH_IDX=False, HAS_LEFTPAD=True, HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=True,
              HAS_ALIBI=True, UPCAST_DOT=False, MERGE_ROWS=4, MERGE_SPLITS=4, USE_PDL=True)
DECODE_PTRS = dict(Q="bf16", K="bf16", V="bf16", O_PART="fp32", LSE_PART="fp32", BLOCK_TABLE="i32",
                   CACHE_SEQLENS="i32", CACHE_BATCH_IDX="i32", CACHE_LEFTPAD="i32", ALIBI="fp32", O="bf16",
                   LSE="fp32", COUNTER="i32")
# (kernel, pointer types by argument, constexprs, num_warps, num_stages)
CASES = [
    (flash_fwd._attn_fwd_kernel, dict(Q="bf16", K="bf16", V="bf16", O="bf16", LSE="fp32", ALIBI="fp32", CU_Q="i32",
                                      CU_K="i32"), dict(ATTENTION, BLOCK_M=128, BLOCK_N=64, USE_TMA=False, LAUNCH_GROUP=8), 8, 3),
    (flash_fwd._attn_fwd_kernel, dict(Q="fp16", K="fp16", V="fp16", O="fp16", LSE="fp32", ALIBI="fp32", CU_Q="i32",
                                      CU_K="i32"),
     dict(ATTENTION, BLOCK_M=64, BLOCK_N=64, BLOCK_D=256, HEADDIM=160, HAS_LEFT=True, HAS_SOFTCAP=True,
          HAS_ALIBI=False, HAS_DROPOUT=False, IS_VARLEN=False, USE_TMA=False, LAUNCH_GROUP=0), 4, 2),
    (flash_fwd._attn_fwd_kernel, dict(Q="tensordesc<bf16[1,128,1,128]>", K="tensordesc<bf16[1,64,1,128]>",
                                      V="tensordesc<bf16[1,64,1,128]>", O="tensordesc<bf16[1,128,1,128]>",
                                      LSE="fp32", ALIBI="fp32", CU_Q="i32", CU_K="i32"),
     dict(ATTENTION, BLOCK_M=128, BLOCK_N=64, USE_TMA=True, IS_VARLEN=False, LAUNCH_GROUP=8), 8, 3),
    (flash_fwd._dropout_mask_kernel, dict(MASK="i8"), dict(BLOCK_M=32, BLOCK_N=32), 4, 2),
    (flash_bwd._attn_bwd_dq_kernel, dict(Q="bf16", K="bf16", V="bf16", O="bf16", DO="bf16", DQ="bf16", LSE="fp32",
                                         DELTA="fp32", ALIBI="fp32", CU_Q="i32", CU_K="i32"),
     dict(ATTENTION, BLOCK_M=128, BLOCK_N=64, LAUNCH_GROUP=8), 8, 2),
    *[(flash_bwd._attn_bwd_dkdv_kernel, dict(Q="bf16", K="bf16", V="bf16", DO="bf16", DK="bf16", DV="bf16",
                                             LSE="fp32", DELTA="fp32", DQ_ACC="fp32", ALIBI="fp32", CU_Q="i32",
                                             CU_K="i32"),
       dict(ATTENTION, BLOCK_M=64, BLOCK_N=128, ATOMIC_DQ=atomic, DQ_TMA=False, LAUNCH_GROUP=8 * atomic), 8, 3)
      for atomic in (False, True)],
    # Packed batches zero their dQ accumulator with torch.zeros, dense ones in this kernel.
    *[(flash_bwd._attn_bwd_delta_kernel, dict(O="bf16", DO="bf16", DELTA="fp32", DQ_ACC="fp32", CU_Q="i32"),
       dict(BLOCK_M=64, BLOCK_D=128, HEADDIM=128, IS_VARLEN=not zero, ZERO_DQ=zero), 4, 2) for zero in (False, True)],
    *[(decode._decode_split_kernel, DECODE_PTRS,
       # The unfused case reads the block table in its loop, the fused one before it.
       dict(DECODE, FUSED=fused, SPLIT_PAGES=16 * fused), 4, 3) for fused in (False, True)],
    (decode._decode_combine_kernel, dict(O_PART="fp32", LSE_PART="fp32", O="bf16", LSE="fp32"),
     dict(BLOCK_S=64, BLOCK_D=128, HEADDIM=128, USE_PDL=True), 4, 2),
    (kv_append._append_kv_kernel, dict(Q="bf16", Q_OUT="bf16", K_NEW="bf16", V_NEW="bf16", K_CACHE="bf16",
                                       V_CACHE="bf16", COS="fp32", SIN="fp32", CACHE_SEQLENS="i32",
                                       CACHE_LEFTPAD="i32", CACHE_BATCH_IDX="i32", BLOCK_TABLE="i32"),
     dict(HEADDIM=128, BLOCK_D=128, HALF=32, ROTARY=True, INTERLEAVED=False, Q_STEPS=True, HAS_LEFTPAD=True,
          HAS_BATCH_IDX=False, PAGED=True), 4, 2),
    # Atomic dQ through a TMA reduce (appended: candidate_cases() indexes the cases above).
    (flash_bwd._attn_bwd_dkdv_kernel, dict(Q="bf16", K="bf16", V="bf16", DO="bf16", DK="bf16", DV="bf16",
                                           LSE="fp32", DELTA="fp32", DQ_ACC="tensordesc<fp32[1,64,1,128]>",
                                           ALIBI="fp32", CU_Q="i32", CU_K="i32"),
     dict(ATTENTION, BLOCK_M=64, BLOCK_N=128, ATOMIC_DQ=True, DQ_TMA=True, LAUNCH_GROUP=8), 8, 2),
]


# What a real launch of the d128 benchmark row (4, 16, 16, 4096) passes for the integer
# arguments, contiguous [batch, seqlen, nheads, headdim] tensors. Triton specializes a
# launch on them: an int equal to 1 becomes a constant and one divisible by 16 is marked
# so, which lets the compiler prove 16-byte alignment, vectorize the tile loads and
# pipeline them through cp.async. Compiled without that (every int unknown), the kernels
# load 2-byte elements one by one and spill their pointer tensors: resources that no
# launch ever has.
LAUNCH_INTS = dict(
    {f"stride_{t}{a}": v for t in ("q", "k", "v", "o", "dk") for a, v in (("b", 4096 * 16 * 128), ("s", 16 * 128),
                                                                         ("h", 128))},
    stride_lse_b=16 * 4096, stride_lse_h=4096, stride_alibi_b=0, NHEADS=16, NHEADS_K=16, GROUP=1,
    SEQLEN_Q=4096, SEQLEN_K=4096)


def compile_for_hopper(kernel, pointers, constexprs, num_warps, num_stages, launch_ints=None):
    """Compile for sm_90. launch_ints: integer arguments' values to specialize on as a
    launch does (LAUNCH_INTS); pointers are then taken as 16-byte aligned too."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for name in kernel.arg_names:
        value = (launch_ints or {}).get(name)
        if name in constexprs or value == 1:
            signature[name] = "constexpr"
            constants.setdefault(name, value)
        elif name in pointers:  # a pointer's element type, or a TMA descriptor's full type
            kind = pointers[name]
            signature[name] = kind if kind.startswith("tensordesc") else "*" + kind
            if launch_ints is not None and not kind.startswith("tensordesc"):
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if value is not None and value % 16 == 0 and value != 0:
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled):
    """(registers, stack bytes) per thread from the cubin, and the shared memory Triton
    asks for at launch (bytes per program)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", out).groups())
    return regs, stack, compiled.metadata.shared


def candidate_cases():
    """Every GPU launch candidate of the d128 class, as CASES entries (labelled)."""
    fwd_ptrs, dq_ptrs, dkdv_ptrs = CASES[0][1], CASES[4][1], CASES[5][1]
    dense = dict(ATTENTION, HAS_ALIBI=False, HAS_DROPOUT=False, IS_VARLEN=False)
    for bm, bn, warps, stages in flash_fwd._GPU_CONFIGS[128]:
        yield "fwd", (flash_fwd._attn_fwd_kernel, fwd_ptrs, dict(dense, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=False, LAUNCH_GROUP=8),
                      warps, stages)
    for bm, bn, warps, stages in flash_bwd._DQ_CONFIGS[128]:
        yield "dq", (flash_bwd._attn_bwd_dq_kernel, dq_ptrs, dict(dense, BLOCK_M=bm, BLOCK_N=bn, LAUNCH_GROUP=8),
                     warps, stages)
    for atomic, tma in ((False, False), (True, False), (True, True)):
        for bm, bn, warps, stages in flash_bwd._DKDV_CONFIGS[128]:
            ptrs = dict(dkdv_ptrs, DQ_ACC=f"tensordesc<fp32[1,{bm},1,128]>") if tma else dkdv_ptrs
            yield "dkdv" + (" atomic" if atomic else "") + (" tma" if tma else ""), (
                flash_bwd._attn_bwd_dkdv_kernel, ptrs, dict(dense, BLOCK_M=bm, BLOCK_N=bn, ATOMIC_DQ=atomic,
                                                           DQ_TMA=tma, LAUNCH_GROUP=0),
                warps, stages)
    plain_decode = dict(DECODE, PAGED=False, PAGE_SIZE=1, HAS_LEFTPAD=False, HAS_SOFTCAP=False, HAS_ALIBI=False,
                        FUSED=False, SPLIT_PAGES=0)
    for bn, warps, stages, fused in sorted(set(c[:3] + (bool(c[5:]),) for c in decode._DECODE_CONFIGS)):
        yield "decode" + (" fused" if fused else ""), (
            decode._decode_split_kernel, DECODE_PTRS, dict(plain_decode, BLOCK_N=bn, FUSED=fused), warps, stages)


def print_candidate_usage():
    print("kernel        (BLOCK_M, BLOCK_N | BLOCK_N), warps, stages: registers, stack bytes, shared bytes")
    for label, (kernel, pointers, constexprs, warps, stages) in candidate_cases():
        decoding = label.startswith("decode")
        blocks = tuple(constexprs[k] for k in ("BLOCK_M", "BLOCK_N") if k in constexprs and not decoding)
        blocks = blocks if not decoding else (constexprs["BLOCK_N"],)
        regs, stack, shared = resource_usage(compile_for_hopper(kernel, pointers, constexprs, warps, stages,
                                                                LAUNCH_INTS))
        print(f"{label:12s}  {blocks}, {warps}, {stages}: {regs} registers, {stack} stack, {shared} shared",
              flush=True)


def compile_gluon_ws_fwd(block_n, stages, pingpong, headdim=128, causal=True, launch_group=16,
                         q_after_first_kv=False, trace=False, o_tma=None):
    """The warp-specialized Gluon forward prototype compiled for sm_90, bf16."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from modelaccel.attention import gluon_fwd

    kernel = gluon_fwd._attn_fwd_ws_kernel
    constexprs = dict(BLOCK_N=block_n, HEAD_D=headdim, STAGES=stages, CAUSAL=causal, PINGPONG=pingpong,
                      LAUNCH_GROUP=launch_group,
                      Q_AFTER_FIRST_KV=q_after_first_kv, TRACE=trace, O_TMA=stages == 2 if o_tma is None else o_tma)
    if not trace:
        constexprs["trace"] = None
    descriptors = {name: f"tensordesc<bf16[{rows},{headdim}],"
                         f"{gl.NVMMASharedLayout.get_default_for([rows, headdim], gl.bfloat16)!r}>"
                   for name, rows in (("q_desc", 64), ("k_desc", block_n), ("v_desc", block_n), ("o_desc", 64))}
    signature = {name: "constexpr" if name in constexprs else descriptors.get(name) or
                 {"O": "*bf16", "LSE": "*fp32", "qk_scale": "fp32", "trace": "*i64"}.get(name, "i32")
                 for name in kernel.arg_names}
    source = GluonASTSource(fn=kernel, signature=signature,
                            constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": 4, "maxnreg": gluon_fwd._WS_MAXNREG})


def compile_gluon_bwd(stages, headdim=128, causal=True, block_q=None, launch_group=16, kv_buffers=1,
                      scheduled=False, skip_idle=False, persistent=None, dq_tma=False):
    """The Gluon backward prototype (attention/gluon_bwd.py) compiled for sm_90, bf16, as a
    launch specializes it (16-byte aligned pointers, sizes divisible by 16: without that
    the dQ atomics compile to scalar ones)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from modelaccel.attention import gluon_bwd

    kernel = gluon_bwd._attn_bwd_ws_kernel
    block_q = block_q or gluon_bwd.Q_ROWS[headdim]
    constexprs = dict(HEAD_D=headdim, BLOCK_Q=block_q, STAGES=stages, CAUSAL=causal,
                      DS_LAYOUT=gl.NVMMASharedLayout.get_default_for([64, block_q], gl.bfloat16),
                      LAUNCH_GROUP=launch_group, KV_BUFS=kv_buffers, SCHEDULED=scheduled, SKIP_IDLE=skip_idle,
                      DQ_TMA=dq_tma, PERSISTENT=scheduled or kv_buffers > 1 if persistent is None else persistent)

    def tile(rows):
        return f"tensordesc<bf16[{rows},{headdim}],{gl.NVMMASharedLayout.get_default_for([rows, headdim], gl.bfloat16)!r}>"
    # Without dq_tma the kernel's dq_desc is unused and the launcher passes q_desc there.
    dq_tile = f"tensordesc<fp32[{block_q},32],{gluon_bwd._DQ_TILE_LAYOUT!r}>" if dq_tma else tile(block_q)
    descriptors = {"q_desc": tile(block_q), "do_desc": tile(block_q), "k_desc": tile(64), "v_desc": tile(64),
                   "dq_desc": dq_tile}
    pointers = {"DK": "*bf16", "DV": "*bf16", "DQ_ACC": "*fp32", "LSE": "*fp32", "DELTA": "*fp32", "SCHED": "*i32",
                "qk_scale": "fp32", "softmax_scale": "fp32"}
    signature = {name: "constexpr" if name in constexprs else descriptors.get(name) or
                 pointers.get(name, "i32") for name in kernel.arg_names}
    aligned = ("DK", "DV", "DQ_ACC", "LSE", "DELTA", "NHEADS", "SEQLEN_Q", "SEQLEN_K", "stride_dkb", "stride_dks",
               "stride_lse_b", "stride_lse_h")
    source = GluonASTSource(fn=kernel, signature=signature,
                            attrs={(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
                            constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": 4, "maxnreg": gluon_bwd._MAXNREG})


def print_gluon_bwd_usage():
    from modelaccel.attention.gluon_bwd import GLUON_BWD_CONFIGS

    print("gluon backward (head dim, STAGES, BLOCK_Q, K/V buffers, scheduled, idle steps skipped), bf16 causal: registers, stack, shared, "
          "setmaxnreg, barriers, dQ atomics")
    # Double-buffered K/V fits in shared memory with 32-row steps only.
    # ... and the persistent launch's tiles dealt on the host (the last field).
    # ... and (the last field) the causal idle steps skipped.
    builds = [(h, s, q, 1, False, False) for h in (64, 128) for s, q in GLUON_BWD_CONFIGS[h]] + [
        (128, 2, 32, 2, False, False), (128, 2, 32, 1, True, False), (128, 2, 64, 1, True, False),
        (128, 2, 32, 1, True, True), (128, 2, 64, 1, True, True)]
    for headdim, stages, block_q, kv_buffers, scheduled, skip_idle in builds:
        try:
            compiled = compile_gluon_bwd(stages, headdim, block_q=block_q, kv_buffers=kv_buffers, scheduled=scheduled,
                                         skip_idle=skip_idle)
        except Exception:  # noqa: BLE001 - report each configuration
            print(f"{headdim, stages, block_q, kv_buffers, scheduled, skip_idle}: FAIL\n{traceback.format_exc()}", flush=True)
            continue
        regs, stack, shared = resource_usage(compiled)
        ptx = compiled.asm["ptx"]
        setmax = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)
        bars = re.findall(r"bar\.sync\s+[^;]*;|barrier\.sync[^;]*;", ptx)
        atomics = sorted(set(re.findall(r"(?:red|atom)\.global[\w.]+", ptx)))
        print(f"{headdim, stages, block_q, kv_buffers, scheduled, skip_idle}: {regs} registers, {stack} stack, {shared} shared, setmaxnreg "
              f"{' '.join(setmax)}, barriers {sorted(set(bars))}, {atomics}", flush=True)


def print_gluon_usage():
    from modelaccel.attention.gluon_fwd import GLUON_WS_CONFIGS

    print("gluon warp-specialized fwd (BLOCK_N, STAGES, PINGPONG), d128 bf16 causal: registers, stack, shared, "
          "setmaxnreg")
    # Persistence is the grid's, not the kernel's; the producer's order is the kernel's.
    for config in sorted(set(c[:3] for c in GLUON_WS_CONFIGS)) + [(128, 2, True, 128, True, 8, True),
                                                                   (128, 2, True, 128, True, 8, True, True)]:
        try:
            compiled = compile_gluon_ws_fwd(*config)
        except Exception:  # noqa: BLE001 - report each configuration
            print(f"{config}: FAIL\n{traceback.format_exc()}", flush=True)
            continue
        regs, stack, shared = resource_usage(compiled)
        setmax = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", compiled.asm["ptx"])
        print(f"{config}: {regs} registers, {stack} stack, {shared} shared, setmaxnreg {' '.join(setmax)}",
              flush=True)


def main():
    if "--candidates" in sys.argv[1:]:
        print_candidate_usage()
        return 0
    if "--gluon-bwd" in sys.argv[1:]:
        print_gluon_bwd_usage()
        return 0
    if "--gluon" in sys.argv[1:]:
        print_gluon_usage()
        return 0
    builds = [triton_case(*case) for case in CASES] + gluon_cases()
    failed = 0
    for label, build in builds:
        try:
            compiled = build()
            print(f"ok    {label}: {len(compiled.asm['cubin'])} bytes of sm_90 cubin", flush=True)
        except Exception:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL  {label}\n{traceback.format_exc()}", flush=True)
    print(f"triton {triton.__version__}: {len(builds) - failed}/{len(builds)} kernels compile for sm_90")
    return 1 if failed else 0


def triton_case(kernel, pointers, constexprs, warps, stages):
    """(label, compile function) of one of CASES."""
    flags = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k in ("ATOMIC_DQ", "FUSED", "HEADDIM", "USE_TMA"))
    return f"{kernel.__name__} ({flags})", lambda: compile_for_hopper(kernel, pointers, constexprs, warps, stages)


def gluon_cases():
    """The Gluon kernels' default launches, where this triton has Gluon and modelaccel offers
    it (launch.gluon_kernels): (label, compile function)."""
    from modelaccel.attention.launch import gluon_kernels

    if gluon_kernels("gluon_fwd") is None or gluon_kernels("gluon_bwd") is None:
        return []
    return [("gluon forward (128, 2, pingpong)", lambda: compile_gluon_ws_fwd(128, 2, True)),
            ("gluon backward (2, 64)", lambda: compile_gluon_bwd(2)),
            ("gluon backward (2, 64), persistent, dealt on the host",
             lambda: compile_gluon_bwd(2, launch_group=8, scheduled=True)),
            ("gluon backward (2, 32), persistent, dealt, idle steps skipped",
             lambda: compile_gluon_bwd(2, block_q=32, launch_group=8, scheduled=True, skip_idle=True)),
            ("gluon backward (2, 32), persistent, dealt, idle steps skipped, dQ by TMA reduces",
             lambda: compile_gluon_bwd(2, block_q=32, launch_group=8, scheduled=True, skip_idle=True, dq_tma=True)),
            ("gluon backward (2, 64), dQ by TMA reduces, head dim 64",
             lambda: compile_gluon_bwd(2, headdim=64, dq_tma=True)),
            ("gluon backward (2, 64), persistent, dealt, dQ by TMA reduces",
             lambda: compile_gluon_bwd(2, launch_group=8, scheduled=True, dq_tma=True))]


if __name__ == "__main__":
    sys.exit(main())
