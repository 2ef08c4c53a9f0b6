"""Block-level emulation, in float64 PyTorch, of gluon_bwd._attn_bwd_ws_kernel's algorithm:
the same programs (128 key rows, two 64-row halves), steps (GQA head, BLOCK_Q query rows
from `lo`), masks, transposed products and scaling, checked against autograd. It checks
the index arithmetic on the CPU box before a GPU run; it does not run the kernel.
Usage: python scripts/emulate_gluon_bwd.py   (prints the max abs error of dq, dk, dv)
"""
import torch

torch.manual_seed(0)


def sim(q, k, v, dout, scale, causal, BLOCK_Q):
    B, SQ, H, D = q.shape; SK, HK = k.shape[1], k.shape[2]; G = H // HK
    qf, kf, vf, dof = (t.double() for t in (q, k, v, dout))
    # forward reference for out, lse
    kr = kf.repeat_interleave(G, 2); vr = vf.repeat_interleave(G, 2)
    s = torch.einsum('bqhd,bkhd->bhqk', qf, kr) * scale
    diag = SK - SQ
    if causal:
        mask = torch.arange(SK)[None, :] <= torch.arange(SQ)[:, None] + diag
        s = s.masked_fill(~mask, float('-inf'))
    lse = torch.logsumexp(s, -1)  # [b,h,q]
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float('inf')))
    p = torch.exp(s - lse[..., None]); p = torch.nan_to_num(p)
    out = torch.einsum('bhqk,bkhd->bqhd', p, vr)
    delta = (dof * out).sum(-1).transpose(1, 2)  # [b,h,q]
    dq = torch.zeros_like(qf); dk = torch.zeros_like(kf); dv = torch.zeros_like(vf)
    LOG2E = 1.4426950408889634; qk_scale = scale * LOG2E
    for b in range(B):
        for hk in range(HK):
            for start_n in range(0, SK, 128):
                lo = 0
                if causal:
                    lo = (max(start_n - diag, 0) // BLOCK_Q) * BLOCK_Q
                n_m = max(SQ - lo + BLOCK_Q - 1, 0) // BLOCK_Q
                for wg in range(2):
                    n0 = start_n + 64 * wg
                    rows = torch.arange(n0, n0 + 64)
                    kk = torch.zeros(64, D, dtype=torch.double); vv = torch.zeros(64, D, dtype=torch.double)
                    valid = rows < SK
                    kk[valid] = kf[b, rows[valid], hk]; vv[valid] = vf[b, rows[valid], hk]
                    dkacc = torch.zeros(64, D, dtype=torch.double); dvacc = torch.zeros(64, D, dtype=torch.double)
                    for t in range(G * n_m):
                        h = hk * G + t // n_m; m = lo + (t % n_m) * BLOCK_Q
                        cols = torch.arange(m, m + BLOCK_Q); inq = cols < SQ
                        qs = torch.zeros(BLOCK_Q, D, dtype=torch.double); dos = torch.zeros(BLOCK_Q, D, dtype=torch.double)
                        qs[inq] = qf[b, cols[inq], h]; dos[inq] = dof[b, cols[inq], h]
                        lse2 = torch.full((BLOCK_Q,), float('inf'), dtype=torch.double); dl = torch.zeros(BLOCK_Q, dtype=torch.double)
                        lse2[inq] = lse[b, h, cols[inq]] * LOG2E; dl[inq] = delta[b, h, cols[inq]]
                        st = kk @ qs.T * qk_scale
                        needs = n0 + 64 > SK or (causal and n0 + 63 > m + diag)
                        if needs:
                            keep = rows[:, None] < SK
                            if causal:
                                keep = keep & (rows[:, None] <= cols[None, :] + diag)
                            st = st.masked_fill(~keep, float('-inf'))
                        pt = torch.exp2(st - lse2[None, :])
                        dpt = vv @ dos.T
                        dst = pt * (dpt - dl[None, :])
                        dvacc += pt @ dos; dkacc += dst @ qs
                        dqt = kk.T @ dst  # [D, BLOCK_Q]
                        for j in range(BLOCK_Q):
                            if cols[j] < SQ:
                                dq[b, cols[j], h] += dqt[:, j] * scale
                    dk[b, rows[valid], hk] = (dkacc * scale)[valid]; dv[b, rows[valid], hk] = dvacc[valid]
    return dq, dk, dv

for (B, SQ, SK, H, HK, D, causal, BQ) in [(1, 70, 200, 4, 2, 16, True, 32), (2, 150, 90, 4, 1, 16, True, 32),
                                            (1, 100, 130, 2, 2, 16, False, 64), (1, 33, 33, 2, 1, 8, True, 32)]:
    q = torch.randn(B, SQ, H, D); k = torch.randn(B, SK, HK, D); v = torch.randn(B, SK, HK, D); do = torch.randn(B, SQ, H, D)
    scale = D ** -0.5
    got = sim(q, k, v, do, scale, causal, BQ)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    G = H // HK
    s = torch.einsum('bqhd,bkhd->bhqk', qd, kd.repeat_interleave(G, 2)) * scale
    if causal:
        mask = torch.arange(SK)[None, :] <= torch.arange(SQ)[:, None] + (SK - SQ)
        s = s.masked_fill(~mask, float('-inf'))
    p = torch.nan_to_num(torch.softmax(s, -1))
    out = torch.einsum('bhqk,bkhd->bqhd', p, vd.repeat_interleave(G, 2))
    ref = torch.autograd.grad(out, (qd, kd, vd), do.double())
    print((B, SQ, SK, H, HK, D, causal, BQ), [f"{(g - r).abs().max().item():.2e}" for g, r in zip(got, ref)])
