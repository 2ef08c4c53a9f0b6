"""Prototype: the attention forward in Gluon for Hopper, with the softmax of one key block
overlapping the matmuls of the next (FA3's intra-warpgroup pipelining).

Why: Triton 3.6 waits on every non-accumulating wgmma right after issuing it (TTGIR of
flash_fwd._attn_fwd_kernel), so a warpgroup's exp2/max/sum work and its tensor-core work
run one after the other; that is most of the gap to cuDNN (benchmarks/NOTES.md). Gluon
(triton.experimental.gluon, in triton 3.6) issues wgmma asynchronously and lets the kernel
say where to wait. Per key block j the loop here:
    issue S_j = Q K_j^T                  (async)
    issue O += P_{j-1} V_{j-1}           (async, P from registers)
    wait for S_j only (one group left in flight), softmax of S_j while P_{j-1} V_{j-1} runs
    wait for O, rescale it by exp2(m_{j-1} - m_j)
K/V tiles stream through a ring of STAGES shared-memory buffers by TMA, each with an
mbarrier; block j + STAGES - 1 is loaded once block j - 1's V has been consumed.

Scope of the prototype: dense [batch, seqlen, nheads, headdim] fp16/bf16, head dim 64 or
128, GQA, causal (bottom-right) or not; no window, softcap, ALiBi, dropout or varlen.
GPU only (Gluon does not run in the Triton interpreter). NOT RUN ON A GPU YET: compiled
for sm_90 with triton 3.6 on the CPU box only (scripts/compile_check.py --gluon). Not
wired into flash_attn_func.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .flash_fwd import LOG2E
from .launch import LaunchTuner, capability, cdiv, size_bucket

# triton 3.6 names the TMA load async_copy_global_to_shared; 3.9 only async_load.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, block, k_row0, col, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr, pred):
    """TMA of key block `block` (K and V) into ring slot block % STAGES, if pred."""
    slot = block % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    _tma_load(k_desc, [k_row0 + block * BLOCK_N, col], bar, k_smem.index(slot), pred=pred)
    _tma_load(v_desc, [k_row0 + block * BLOCK_N, col], bar, v_smem.index(slot), pred=pred)


@gluon.jit
def _online_softmax(s, m_i, l_i, offs_m, start_m, start_n, offs_n0, qk_scale, SEQLEN_K, diag,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """P = exp2(scores * qk_scale - running max) for the key block at start_n (the max kept
    in scaled log2 units, so each score costs one FMA before its exp2), with the running
    max and sum updated; alpha rescales what was accumulated before. Only a block that
    reaches past the keys or across the causal diagonal is masked (a uniform branch)."""
    needs_mask = start_n + BLOCK_N > SEQLEN_K
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > start_m + diag)
    if needs_mask:
        offs_n = start_n + offs_n0
        keep = offs_n[None, :] < SEQLEN_K
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def _attn_fwd_gluon_kernel(q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b,
                           stride_lse_h, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, qk_scale,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                           STAGES: gl.constexpr, CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    """One BLOCK_M block of query rows of one (batch, head). q_desc is over q viewed as
    [batch * seqlen_q, nheads * headdim] in blocks [BLOCK_M, HEAD_D]; k_desc, v_desc over
    k, v as [batch * seqlen_k, nheads_k * headdim] in blocks [BLOCK_N, HEAD_D]. A block past
    a sequence's end reads the next sequence's rows (or TMA's zeros past the tensor): those
    keys are masked, those query rows never stored. O [batch, seqlen_q, nheads, headdim],
    LSE float32 (natural log)."""
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    cols_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // NHEADS
    h = pid_bh % NHEADS
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    diag = SEQLEN_K - SEQLEN_Q
    k_row0 = b * SEQLEN_K
    kv_col = hk * HEAD_D
    hi = SEQLEN_K
    if CAUSAL:
        hi = gl.minimum(SEQLEN_K, gl.maximum(start_m + BLOCK_M + diag, 0))
    # At least one block, so a program whose rows see no key (causal, seqlen_q > seqlen_k)
    # still runs the loop's code path: every score is masked and its rows come out empty.
    n_blocks = gl.maximum((hi + BLOCK_N - 1) // BLOCK_N, 1)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [b * SEQLEN_Q + start_m, h * HEAD_D], q_bar, q_smem)
    for i in gl.static_range(STAGES - 1):
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, i, k_row0, kv_col, BLOCK_N, STAGES, i < n_blocks)

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=rows_s)
    offs_n0 = gl.arange(0, BLOCK_N, layout=cols_s)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    # Block 0 alone: there is no P V product to overlap yet.
    mbarrier.wait(kv_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    p_f32, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, offs_m, start_m, 0, offs_n0, qk_scale, SEQLEN_K, diag,
                                             BLOCK_M, BLOCK_N, CAUSAL)
    p = gl.convert_layout(p_f32.to(dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    # Slot STAGES - 1 has not been used yet.
    _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, STAGES - 1, k_row0, kv_col, BLOCK_N, STAGES,
             STAGES - 1 < n_blocks)

    for j in range(1, n_blocks):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(kv_bars.index(slot), (j // STAGES) & 1)
        s_token = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o_token = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        # wgmma groups complete in order: one left in flight means S_j is done while
        # P_{j-1} V_{j-1} may still run under the softmax below.
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_token])
        p_f32, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, offs_m, start_m, j * BLOCK_N, offs_n0, qk_scale,
                                                 SEQLEN_K, diag, BLOCK_M, BLOCK_N, CAUSAL)
        # P_{j-1} is the product's register operand: kept alive (a dependency) until the
        # product is done, so the softmax above cannot have taken its registers.
        acc, _ = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p])
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        p = gl.convert_layout(p_f32.to(dtype), p_layout)
        # Slot `prev` held block j - 1, whose V the wait above has consumed.
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, j + STAGES - 1, k_row0, kv_col, BLOCK_N, STAGES,
                 j + STAGES - 1 < n_blocks)

    acc = warpgroup_mma(p, v_smem.index((n_blocks - 1) % STAGES), acc)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))

    # Rows that see no key (causal, seqlen_q > seqlen_k) give 0 and lse +inf.
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    out = acc / gl.convert_layout(l_safe, rows_o)[:, None]
    offs_mo = start_m + gl.arange(0, BLOCK_M, layout=rows_o)
    offs_d = gl.arange(0, HEAD_D, layout=cols_o)
    out_ptrs = (O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                + offs_mo[:, None].to(gl.int64) * stride_os + offs_d[None, :])
    gl.store(out_ptrs, out.to(dtype), mask=offs_mo[:, None] < SEQLEN_Q)
    gl.store(LSE + b.to(gl.int64) * stride_lse_b + h * stride_lse_h + offs_m, lse, mask=offs_m < SEQLEN_Q)


# (BLOCK_M, BLOCK_N, STAGES, num_warps) to sweep on the GPU (benchmarks/gluon_fwd.py).
# Registers and shared memory per program at head dim 128, bf16, causal, compiled for sm_90
# with triton 3.6 (scripts/compile_check.py --gluon): (128, 128, 2, 8) 210 / 160 KB;
# (64, 128, 2, 4) 212 / 144 KB; (128, 64, 3, 8) 166 / 128 KB; (64, 64, 3, 4) 151 / 112 KB;
# (64, 64, 2, 4) 155 / 80 KB fits two programs per SM, the nearest this kernel gets to
# FA3's two warpgroups taking turns. None spills.
GLUON_CONFIGS = [(128, 128, 2, 8), (128, 64, 3, 8), (64, 128, 2, 4), (64, 64, 3, 4), (64, 64, 2, 4)]


def _shared_layout(block_shape, dtype):
    return gl.NVMMASharedLayout.get_default_for(block_shape, {torch.float16: gl.float16,
                                                             torch.bfloat16: gl.bfloat16}[dtype])


def flash_attn_forward_gluon(q, k, v, softmax_scale, causal=False, block_m=128, block_n=128, stages=2,
                             num_warps=8, out=None, lse=None):
    """The prototype forward: out [batch, seqlen_q, nheads, headdim] and lse float32
    [batch, nheads, seqlen_q], as flash_fwd.flash_attn_forward's.

    q [batch, seqlen_q, nheads, headdim], k/v [batch, seqlen_k, nheads_k, headdim],
    contiguous fp16/bf16 CUDA tensors on Hopper; headdim 64 or 128. block_m: 64 per
    warpgroup (num_warps 4 per 64 rows)."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if headdim not in (64, 128):
        raise ValueError(f"the Gluon prototype takes head dim 64 or 128, got {headdim}")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("the Gluon prototype takes contiguous q, k, v")
    if block_m != 16 * num_warps * (block_m // (16 * num_warps)) or block_m % (16 * num_warps):
        raise ValueError(f"block_m {block_m} must be a multiple of 16 x num_warps ({16 * num_warps})")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device) if lse is None else lse
    q2, k2, v2 = (t.view(t.shape[0] * t.shape[1], t.shape[2] * t.shape[3]) for t in (q, k, v))
    q_desc = TensorDescriptor.from_tensor(q2, [block_m, headdim], _shared_layout([block_m, headdim], q.dtype))
    kv_layout = _shared_layout([block_n, headdim], q.dtype)
    k_desc = TensorDescriptor.from_tensor(k2, [block_n, headdim], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [block_n, headdim], kv_layout)
    grid = (cdiv(seqlen_q, block_m), batch * nheads)
    _attn_fwd_gluon_kernel[grid](
        q_desc, k_desc, v_desc, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        nheads, nheads // nheads_k, seqlen_q, seqlen_k, softmax_scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=headdim, STAGES=stages, CAUSAL=causal, num_warps=num_warps)
    return out, lse


_tuner = LaunchTuner("attention_fwd_gluon")


def gluon_forward_applies(q, k, v, out, window_size, softcap, alibi_slopes, dropout_p, varlen):
    """Whether the prototype covers this call (MODELACCEL_GLUON_FWD=1 routes such calls of
    flash_fwd.flash_attn_forward here): dense contiguous fp16/bf16 on Hopper, head dim 64
    or 128, no window (causal allowed), softcap, ALiBi or dropout."""
    left, right = window_size
    return (q.is_cuda and not varlen and left < 0 and right in (-1, 0) and softcap <= 0 and alibi_slopes is None
            and dropout_p == 0 and q.shape[-1] in (64, 128) and q.dtype in (torch.float16, torch.bfloat16)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v, out))
            and capability(q.device.index)[0] == 9)


def flash_attn_forward_gluon_tuned(q, k, v, softmax_scale, causal, out, lse):
    """flash_attn_forward_gluon with its configuration tuned per problem class."""
    batch, seqlen_q, nheads, headdim = q.shape
    key = (q.dtype, headdim, causal, size_bucket(seqlen_q), size_bucket(k.shape[1]), size_bucket(batch * nheads))

    def launch(config):
        block_m, block_n, stages, warps = config
        flash_attn_forward_gluon(q, k, v, softmax_scale, causal, block_m, block_n, stages, warps, out, lse)

    launch(_tuner.choose(key, GLUON_CONFIGS, launch))
    return out, lse
