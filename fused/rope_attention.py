"""Fused 3D-RoPE + FlashAttention-2 (forward and backward) in Triton.

`rope_attention(q, k, v, pos, freqs, kv_len)` equals `rope_attention_reference` below (and
model.py's `torch` backend): rotate q and k by rope.apply_rope, then non-causal softmax
attention with scale 1/sqrt(D) in which every query of sample b sees only keys n < kv_len[b].

The kernels never write rotated q or k to memory. Each program loads a tile of positions,
forms the RoPE angles p_t * F[:, 0] + p_h * F[:, 1] + p_w * F[:, 2] for the D/2 pairs and
rotates its q/k tile in registers. A head is loaded as its two halves (x1, x2) = x[:, :D/2],
x[:, D/2:] (the rotate-half layout of rope.py), so q_rot . k_rot = q1 . k1 + q2 . k2 with
each half rotated: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.

Softmax runs in base 2: scores are scaled by log2(e)/sqrt(D) and the forward saves the
per-row logsumexp (base 2) so the backward recomputes P = exp2(S - lse) instead of storing it.
The backward is FA2-style without atomics: a preprocess kernel for delta = rowsum(dO * O),
one kernel per key block for dK and dV (looping over query blocks) and one per query block
for dQ (looping over key blocks). dQ and dK are accumulated for the rotated q/k and rotated
back by the transpose rotation (angle -> -angle) before they are stored.
"""
import math

import torch
import triton
import triton.language as tl

from rope import apply_rope

HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x log2(e))


def _configs(pairs):
    """Autotune configs; under TRITON_INTERPRET=1 (CPU tests) one small config instead."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in pairs
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on Hopper. The forward keeps a query tile in
# registers and streams key tiles; dK/dV keep a key tile and stream query tiles; dQ the reverse.
_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2),
    (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
])
_DKDV_CONFIGS = _configs([
    (64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3),
    (64, 64, 4, 4), (128, 128, 8, 2), (128, 64, 8, 3),
])
_DQ_CONFIGS = _configs([
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
    (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 8, 3),
])


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _load_freqs(FREQ, HALF: tl.constexpr):
    """The three columns of the [D/2, 3] frequency matrix F, each a [D/2] vector."""
    k = tl.arange(0, HALF)
    return tl.load(FREQ + k * 3), tl.load(FREQ + k * 3 + 1), tl.load(FREQ + k * 3 + 2)


@triton.jit
def _cos_sin(POS, offs, N_CTX, stride_pn, stride_pc, f_t, f_h, f_w):
    """cos and sin, [BLOCK, D/2], of the RoPE angles of tokens `offs` (0 past N_CTX).

    angle[n, k] = t_n F[k, 0] + h_n F[k, 1] + w_n F[k, 2]   (= (pos @ F.T)[n, k], in fp32)
    """
    mask = offs < N_CTX
    p_t = tl.load(POS + offs * stride_pn, mask=mask, other=0.0)
    p_h = tl.load(POS + offs * stride_pn + stride_pc, mask=mask, other=0.0)
    p_w = tl.load(POS + offs * stride_pn + 2 * stride_pc, mask=mask, other=0.0)
    angle = p_t[:, None] * f_t[None, :] + p_h[:, None] * f_h[None, :] + p_w[:, None] * f_w[None, :]
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _load_halves(X, offs, N_CTX, stride_n, stride_d, HALF: tl.constexpr):
    """Rows `offs` of X as two [BLOCK, D/2] tiles x[:, :D/2], x[:, D/2:] (0 past N_CTX)."""
    d = tl.arange(0, HALF)
    ptrs = X + offs[:, None] * stride_n + d[None, :] * stride_d
    mask = offs[:, None] < N_CTX
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + HALF * stride_d, mask=mask, other=0.0)


@triton.jit
def _rotate(x1, x2, cos, sin):
    """Rotate-half RoPE in fp32: (x1 cos - x2 sin, x2 cos + x1 sin). With -sin it is the inverse
    (transpose) rotation, which maps a gradient w.r.t. rotated q/k back to q/k."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _load_rotated(X, POS, offs, N_CTX, stride_n, stride_d, stride_pn, stride_pc, f_t, f_h, f_w,
                  HALF: tl.constexpr):
    """Rows `offs` of q or k, rotated by their RoPE angles, as two fp32 halves, plus cos/sin."""
    cos, sin = _cos_sin(POS, offs, N_CTX, stride_pn, stride_pc, f_t, f_h, f_w)
    x1, x2 = _load_halves(X, offs, N_CTX, stride_n, stride_d, HALF)
    x1, x2 = _rotate(x1, x2, cos, sin)
    return x1, x2, cos, sin


@triton.jit
def _store_halves(X, x1, x2, offs, N_CTX, stride_n, stride_d, HALF: tl.constexpr):
    d = tl.arange(0, HALF)
    ptrs = X + offs[:, None] * stride_n + d[None, :] * stride_d
    mask = offs[:, None] < N_CTX
    tl.store(ptrs, x1.to(X.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF * stride_d, x2.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _tile_ptrs(X, offs, stride_n, stride_d, HEAD_DIM: tl.constexpr):
    """Pointers to the full-width rows `offs` of X: [BLOCK, D]."""
    d = tl.arange(0, HEAD_DIM)
    return X + offs[:, None] * stride_n + d[None, :] * stride_d


# ----------------------------------------------------------------------------- forward

@triton.autotune(configs=_FWD_CONFIGS, key=["N_CTX", "HEAD_DIM"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, POS, FREQ, KV_LEN, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_pb, stride_pn, stride_pc,
    H, N_CTX,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program = one block of BLOCK_M queries of one (sample, head).
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + h * stride_kh
    V += b.to(tl.int64) * stride_vb + h * stride_vh
    O += b.to(tl.int64) * stride_ob + h * stride_oh
    LSE += tl.program_id(1).to(tl.int64) * N_CTX
    POS += b.to(tl.int64) * stride_pb
    kv_len = tl.load(KV_LEN + b)
    dtype = Q.dtype.element_ty
    f_t, f_h, f_w = _load_freqs(FREQ, HEAD_DIM // 2)

    # RoPE on the query tile, once; rounded to the input dtype for the tensor-core dots.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2, _, _ = _load_rotated(Q, POS, offs_m, N_CTX, stride_qn, stride_qd, stride_pn, stride_pc,
                                 f_t, f_h, f_w, HEAD_DIM // 2)
    q1 = q1.to(dtype)
    q2 = q2.to(dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalised output
    # Only key blocks below kv_len are visited; kv_len >= 1 makes every row max finite.
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # RoPE on the key tile.
        k1, k2, _, _ = _load_rotated(K, POS, offs_n, N_CTX, stride_kn, stride_kd, stride_pn,
                                     stride_pc, f_t, f_h, f_w, HEAD_DIM // 2)
        # Scores in base-2 units, s = (q_rot . k_rot) log2(e) / sqrt(D); keys >= kv_len -> -inf.
        s = tl.dot(q1, tl.trans(k1.to(dtype)), input_precision=PRECISION)
        s += tl.dot(q2, tl.trans(k2.to(dtype)), input_precision=PRECISION)
        s = tl.where(offs_n[None, :] < kv_len, s * qk_scale, float("-inf"))
        # Online softmax: raise the running max, rescale the sum and accumulator by alpha.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile_ptrs(V, offs_n, stride_vn, stride_vd, HEAD_DIM),
                    mask=offs_n[:, None] < N_CTX, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Normalise and store O; save lse = log2(sum_n exp2(s_n)) for the backward.
    row_ok = offs_m < N_CTX
    tl.store(_tile_ptrs(O, offs_m, stride_on, stride_od, HEAD_DIM),
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N_CTX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O) = rowsum(P * dP): the softmax-backward correction per query.
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs_m[:, None] < N_CTX
    o = tl.load(_tile_ptrs(O + b.to(tl.int64) * stride_ob + h * stride_oh, offs_m, stride_on,
                           stride_od, HEAD_DIM), mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(DO + b.to(tl.int64) * stride_dob + h * stride_doh, offs_m, stride_don,
                            stride_dod, HEAD_DIM), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * N_CTX + offs_m, delta, mask=offs_m < N_CTX)


@triton.autotune(configs=_DKDV_CONFIGS, key=["N_CTX", "HEAD_DIM"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, POS, FREQ, KV_LEN, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,  # DK and DV (same layout)
    stride_pb, stride_pn, stride_pc,
    H, N_CTX,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program = one block of BLOCK_N keys of one (sample, head); it loops over all queries.
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + h * stride_kh
    V += b.to(tl.int64) * stride_vb + h * stride_vh
    DO += b.to(tl.int64) * stride_dob + h * stride_doh
    DK += b.to(tl.int64) * stride_gb + h * stride_gh
    DV += b.to(tl.int64) * stride_gb + h * stride_gh
    LSE += tl.program_id(1).to(tl.int64) * N_CTX
    DELTA += tl.program_id(1).to(tl.int64) * N_CTX
    POS += b.to(tl.int64) * stride_pb
    kv_len = tl.load(KV_LEN + b)
    dtype = Q.dtype.element_ty
    f_t, f_h, f_w = _load_freqs(FREQ, HEAD_DIM // 2)

    # RoPE on this key tile, once; v as is. Keys >= kv_len get zero gradients.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k1, k2, cos_k, sin_k = _load_rotated(K, POS, offs_n, N_CTX, stride_kn, stride_kd, stride_pn,
                                         stride_pc, f_t, f_h, f_w, HEAD_DIM // 2)
    k1 = k1.to(dtype)
    k2 = k2.to(dtype)
    v = tl.load(_tile_ptrs(V, offs_n, stride_vn, stride_vd, HEAD_DIM),
                mask=offs_n[:, None] < N_CTX, other=0.0)
    key_ok = offs_n < kv_len

    dk1 = tl.zeros([BLOCK_N, HEAD_DIM // 2], tl.float32)  # dK for the rotated k, first half
    dk2 = tl.zeros([BLOCK_N, HEAD_DIM // 2], tl.float32)  # ... second half
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # A block lying entirely at or past kv_len skips the loop.
    hi = tl.where(tl.program_id(0) * BLOCK_N < kv_len, N_CTX, 0)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # RoPE on the query tile; dO, lse and delta of those queries. Rows past N_CTX load
        # dO = delta = 0, so they add nothing below.
        q1, q2, _, _ = _load_rotated(Q, POS, offs_m, N_CTX, stride_qn, stride_qd, stride_pn,
                                     stride_pc, f_t, f_h, f_w, HEAD_DIM // 2)
        q1 = q1.to(dtype)
        q2 = q2.to(dtype)
        do = tl.load(_tile_ptrs(DO, offs_m, stride_don, stride_dod, HEAD_DIM),
                     mask=offs_m[:, None] < N_CTX, other=0.0)
        lse = tl.load(LSE + offs_m, mask=offs_m < N_CTX, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=offs_m < N_CTX, other=0.0)
        # P^T recomputed from the saved logsumexp: P^T[n, m] = exp2(s[m, n] - lse[m]).
        s_t = tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
        s_t += tl.dot(k2, tl.trans(q2), input_precision=PRECISION)
        p_t = tl.where(key_ok[:, None], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        # dV += P^T dO
        dv += tl.dot(p_t.to(dtype), do, input_precision=PRECISION)
        # dS^T = P^T * (dP^T - delta), with dP^T = V dO^T; dK_rot += dS^T Q_rot.
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)
        dk2 += tl.dot(ds_t, q2, input_precision=PRECISION)

    # dK = R^T (sm_scale dK_rot): rotate back by -angle.
    dk1, dk2 = _rotate(dk1 * sm_scale, dk2 * sm_scale, cos_k, -sin_k)
    _store_halves(DK, dk1, dk2, offs_n, N_CTX, stride_gn, stride_gd, HEAD_DIM // 2)
    tl.store(_tile_ptrs(DV, offs_n, stride_gn, stride_gd, HEAD_DIM), dv.to(DV.dtype.element_ty),
             mask=offs_n[:, None] < N_CTX)


@triton.autotune(configs=_DQ_CONFIGS, key=["N_CTX", "HEAD_DIM"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, POS, FREQ, KV_LEN, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,  # DQ
    stride_pb, stride_pn, stride_pc,
    H, N_CTX,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program = one block of BLOCK_M queries of one (sample, head); it loops over the keys.
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + h * stride_kh
    V += b.to(tl.int64) * stride_vb + h * stride_vh
    DO += b.to(tl.int64) * stride_dob + h * stride_doh
    DQ += b.to(tl.int64) * stride_gb + h * stride_gh
    LSE += tl.program_id(1).to(tl.int64) * N_CTX
    DELTA += tl.program_id(1).to(tl.int64) * N_CTX
    POS += b.to(tl.int64) * stride_pb
    kv_len = tl.load(KV_LEN + b)
    dtype = Q.dtype.element_ty
    f_t, f_h, f_w = _load_freqs(FREQ, HEAD_DIM // 2)

    # RoPE on this query tile, once; its dO, lse and delta.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2, cos_q, sin_q = _load_rotated(Q, POS, offs_m, N_CTX, stride_qn, stride_qd, stride_pn,
                                         stride_pc, f_t, f_h, f_w, HEAD_DIM // 2)
    q1 = q1.to(dtype)
    q2 = q2.to(dtype)
    do = tl.load(_tile_ptrs(DO, offs_m, stride_don, stride_dod, HEAD_DIM),
                 mask=offs_m[:, None] < N_CTX, other=0.0)
    lse = tl.load(LSE + offs_m, mask=offs_m < N_CTX, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=offs_m < N_CTX, other=0.0)

    dq1 = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)  # dQ for the rotated q, first half
    dq2 = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)  # ... second half
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # RoPE on the key tile; v as is.
        k1, k2, _, _ = _load_rotated(K, POS, offs_n, N_CTX, stride_kn, stride_kd, stride_pn,
                                     stride_pc, f_t, f_h, f_w, HEAD_DIM // 2)
        k1 = k1.to(dtype)
        k2 = k2.to(dtype)
        v = tl.load(_tile_ptrs(V, offs_n, stride_vn, stride_vd, HEAD_DIM),
                    mask=offs_n[:, None] < N_CTX, other=0.0)
        # P recomputed from the saved logsumexp, keys >= kv_len masked to 0.
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        p = tl.where(offs_n[None, :] < kv_len, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        # dS = P * (dP - delta), with dP = dO V^T; dQ_rot += dS K_rot.
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq1 += tl.dot(ds, k1, input_precision=PRECISION)
        dq2 += tl.dot(ds, k2, input_precision=PRECISION)

    # dQ = R^T (sm_scale dQ_rot): rotate back by -angle.
    dq1, dq2 = _rotate(dq1 * sm_scale, dq2 * sm_scale, cos_q, -sin_q)
    _store_halves(DQ, dq1, dq2, offs_m, N_CTX, stride_gn, stride_gd, HEAD_DIM // 2)


# ----------------------------------------------------------------------------- host side

def _check_and_prepare(q, k, v, pos, freqs, kv_len):
    """Validate shapes/dtypes; return pos, freqs (fp32 on q's device), kv_len (int32 [B], clamped
    to [1, N]) and the pos batch stride (0 for positions shared by the batch)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape [B, heads, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, _, N, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if pos.shape not in ((N, 3), (B, N, 3)):
        raise ValueError(f"pos must be [N, 3] or [B, N, 3] with N={N}, B={B}; got {tuple(pos.shape)}")
    if freqs.shape != (D // 2, 3):
        raise ValueError(f"freqs must be [D/2, 3] = [{D // 2}, 3]; got {tuple(freqs.shape)}")
    pos = pos.to(device=q.device, dtype=torch.float32)
    freqs = freqs.to(device=q.device, dtype=torch.float32).contiguous()
    if kv_len is None:
        kv_len = torch.full((B,), N, device=q.device, dtype=torch.int32)
    elif kv_len.shape != (B,):
        raise ValueError(f"kv_len must be [B] = [{B}]; got {tuple(kv_len.shape)}")
    else:
        kv_len = kv_len.to(device=q.device, dtype=torch.int32).clamp(1, N).contiguous()
    stride_pb = pos.stride(0) if pos.dim() == 3 else 0
    return pos, freqs, kv_len, stride_pb


class _RopeAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, pos, freqs, kv_len, stride_pb):
        B, H, N, D = q.shape
        # O is laid out as [B, N, H, D] in memory, so o.transpose(1, 2).flatten(2) is free.
        o = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        sm_scale = 1.0 / math.sqrt(D)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"

        def grid(meta):
            return triton.cdiv(N, meta["BLOCK_M"]), B * H

        _fwd_kernel[grid](
            q, k, v, o, lse, pos, freqs, kv_len, sm_scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            stride_pb, pos.stride(-2), pos.stride(-1),
            H, N, HEAD_DIM=D, PRECISION=precision,
        )
        ctx.save_for_backward(q, k, v, o, lse, pos, freqs, kv_len)
        ctx.stride_pb = stride_pb
        ctx.precision = precision
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, pos, freqs, kv_len = ctx.saved_tensors
        B, H, N, D = q.shape
        sm_scale = 1.0 / math.sqrt(D)
        pos_strides = (ctx.stride_pb, pos.stride(-2), pos.stride(-1))

        delta = torch.empty_like(lse)
        delta_block = 16 if triton.knobs.runtime.interpret else 64
        _bwd_delta_kernel[(triton.cdiv(N, delta_block), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, N, HEAD_DIM=D, BLOCK_M=delta_block,
        )

        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        common = dict(HEAD_DIM=D, PRECISION=ctx.precision)
        _bwd_dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
            q, k, v, do, dk, dv, lse, delta, pos, freqs, kv_len, sm_scale, sm_scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *pos_strides,
            H, N, **common,
        )
        _bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, pos, freqs, kv_len, sm_scale, sm_scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *pos_strides,
            H, N, **common,
        )
        return dq, dk, dv, None, None, None, None


def rope_attention(q, k, v, pos, freqs, kv_len=None):
    """Fused RoPE + softmax attention (differentiable in q, k, v).

    q, k, v: [B, heads, N, D], fp16/bf16 (fp32 accepted), any strides; D in (32, 64, 128).
    pos:     float [N, 3] or [B, N, 3] positions (t, h, w); freqs: rope.rope_frequencies(D).
    kv_len:  int [B] or None: queries of sample b see keys n < kv_len[b] (clamped to [1, N]);
             None = all N keys. Every query, including those >= kv_len, gets an output.
    Returns [B, heads, N, D] in q's dtype, stored [B, N, heads, D]-major (a transposed view).
    """
    pos, freqs, kv_len, stride_pb = _check_and_prepare(q, k, v, pos, freqs, kv_len)
    return _RopeAttention.apply(q, k, v, pos, freqs, kv_len, stride_pb)


def rope_attention_reference(q, k, v, pos, freqs, kv_len=None):
    """Plain PyTorch equivalent of `rope_attention` (and of model.py's `torch` backend):
    rope.apply_rope on q and k, then softmax(q k^T / sqrt(D)) v with keys >= kv_len[b] masked."""
    N, D = q.shape[-2:]
    ctype = torch.promote_types(q.dtype, torch.float32)
    q, k = apply_rope(q, pos, freqs).to(ctype), apply_rope(k, pos, freqs).to(ctype)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if kv_len is not None:
        visible = torch.arange(N, device=q.device) < kv_len.to(q.device).clamp(1, N)[:, None]  # [B, N]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v
