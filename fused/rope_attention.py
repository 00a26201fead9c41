"""Fused 3D-RoPE + FlashAttention-2 (forward and backward) in Triton, registered as torch ops.

(This module is long because it is one kernel, read as Triton's fused-attention tutorial is: the
forward, the two backward kernels, their shared RoPE helpers, config pruning and the op registration.)

`rope_attention(q, k, v, pos, freqs, kv_len)` equals `rope_attention_reference` below (and
model.py's `torch` backend): rotate q and k by rope.apply_rope, then non-causal softmax
attention with scale 1/sqrt(D) in which every query of sample b sees only keys n < kv_len[b].

RoPE angles are p_t * F[:, 0] + p_h * F[:, 1] + p_w * F[:, 2] for the D/2 pairs, in fp32, with F
the [D/2, 3] table of head h (per-head [heads, D/2, 3] tables, LTX-2; a shared [D/2, 3] table is
the head-stride-0 case). A head is loaded as its two halves (x1, x2) = x[:, :D/2], x[:, D/2:]
(the rotate-half layout of rope.py), so q_rot . k_rot = q1 . k1 + q2 . k2 with each half
rotated: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. Two ways to apply it (`fused_rope`):
  in-loop (True):   the attention kernels rotate every q/k tile they load, in registers, and
                    rotate dQ/dK back before storing them; nothing extra in memory.
  pre-pass (False): `rope_rotate` rotates q and k once (O(N D)); the attention kernels see plain
                    q_rot/k_rot (saved for the backward), and dQ/dK get the inverse rotation.
Both compute the same thing; which is faster is measured by fused/bench.py on a GPU.

Softmax runs in base 2: scores are scaled by log2(e)/sqrt(D) and the forward saves the
per-row logsumexp (base 2) so the backward recomputes P = exp2(S - lse) instead of storing it.
The backward is FA2-style without atomics: a preprocess kernel for delta = rowsum(dO * O),
one kernel per key block for dK and dV (looping over query blocks) and one per query block
for dQ (looping over key blocks).

The ops (st_drc::rope_rotate, st_drc::rope_attention_fwd / _bwd) are torch.library triton_ops
with registered autograd, so torch.compile traces into the kernels and FSDP2 / CUDA graphs see
ordinary ops. Under TRITON_INTERPRET=1 they are opaque custom_ops with fake (shape-only)
implementations instead, since interpreted kernels cannot run on fake tensors.
"""
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from rope import apply_rope

HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x log2(e))
INTERPRET = triton.knobs.runtime.interpret
# One fixed config instead of autotuning: always in the interpreter; on a GPU when
# ROPE_ATTENTION_AUTOTUNE=0 (tests/conftest.py sets it, so hardware tests compile one variant).
AUTOTUNE = not INTERPRET and os.environ.get("ROPE_ATTENTION_AUTOTUNE", "1") != "0"
SMEM_FALLBACK = 232448  # bytes of shared memory per block on Hopper (227 KB), if no GPU to ask
ROPE_BLOCK = 64  # rows per program of the pre-pass rotation

# (BLOCK_M, BLOCK_N, num_warps, num_stages) to autotune over, before pruning. The forward keeps a
# query tile and streams key/value tiles; dK/dV keep a key/value tile and stream query/dO tiles;
# dQ keeps a query/dO tile and streams key/value tiles.
_FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2),
              (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3)]
_DKDV_TILES = [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3),
               (64, 64, 4, 4), (128, 128, 8, 2), (128, 64, 8, 3)]
_DQ_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
             (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 8, 3)]
_FIXED_TILE = (16, 16, 4, 1) if INTERPRET else (64, 64, 4, 2)
# Autotune results are reused for every N of one power-of-2 bucket (N_BUCKET), per head dim,
# rotation variant and (added by Triton) input dtype.
_KEY = ["N_BUCKET", "HEAD_DIM", "FUSED_ROPE"]


def _configs(tiles):
    """triton.Configs for (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles, or the fixed one."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (tiles if AUTOTUNE else [_FIXED_TILE])]


def smem_bytes(kernel: str, block_m: int, block_n: int, stages: int, head_dim: int, elem: int) -> int:
    """Estimated shared memory of one program: the tiles it keeps for the whole loop, the tiles it
    streams (one set per pipeline stage) and the [BLOCK_M, BLOCK_N] P or dS operand of a dot."""
    resident, streamed = {"fwd": (block_m, 2 * block_n),  # q | k, v
                          "dkdv": (2 * block_n, 2 * block_m),  # k, v | q, dO
                          "dq": (2 * block_m, 2 * block_n)}[kernel]  # q, dO | k, v
    return elem * ((resident + stages * streamed) * head_dim + block_m * block_n)


def _smem_limit() -> int:
    """Opt-in shared memory per block of the current GPU (Hopper's if there is none)."""
    if not torch.cuda.is_available():
        return SMEM_FALLBACK
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def prune_configs(kernel: str, configs, n_bucket: int, head_dim: int, elem: int, smem_limit: int):
    """Configs that fit in shared memory and whose blocks do not exceed N (rounded up to a power
    of two); the smallest config if none is left."""
    def fits(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (max(bm, bn) <= n_bucket
                and smem_bytes(kernel, bm, bn, c.num_stages, head_dim, elem) <= smem_limit)
    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


def _pruner(kernel: str):
    """early_config_prune hook for triton.autotune: prune_configs with this call's N, D and dtype."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return prune_configs(kernel, configs, args["N_BUCKET"], args["HEAD_DIM"],
                             args["Q"].dtype.itemsize, _smem_limit())
    return prune


def _autotune(kernel: str, tiles):
    return triton.autotune(configs=_configs(tiles), key=_KEY,
                           prune_configs_by={"early_config_prune": _pruner(kernel)})


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _load_freqs(FREQ, HALF: tl.constexpr):
    """The three columns of one head's [D/2, 3] frequency matrix F, each a [D/2] vector."""
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
def _store_halves(X, x1, x2, offs, N_CTX, stride_n, stride_d, HALF: tl.constexpr):
    d = tl.arange(0, HALF)
    ptrs = X + offs[:, None] * stride_n + d[None, :] * stride_d
    mask = offs[:, None] < N_CTX
    tl.store(ptrs, x1.to(X.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF * stride_d, x2.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _load_qk(X, POS, offs, N_CTX, stride_n, stride_d, stride_pn, stride_pc, f_t, f_h, f_w,
             HALF: tl.constexpr, FUSED_ROPE: tl.constexpr):
    """Rows `offs` of q or k as two [BLOCK, D/2] halves in X's dtype, ready for tl.dot: rotated
    here (in fp32, then rounded) if FUSED_ROPE, else as stored (rotated by the pre-pass)."""
    x1, x2 = _load_halves(X, offs, N_CTX, stride_n, stride_d, HALF)
    if FUSED_ROPE:
        cos, sin = _cos_sin(POS, offs, N_CTX, stride_pn, stride_pc, f_t, f_h, f_w)
        x1, x2 = _rotate(x1, x2, cos, sin)
    return x1.to(X.dtype.element_ty), x2.to(X.dtype.element_ty)


@triton.jit
def _store_qk_grad(DX, g1, g2, POS, offs, N_CTX, stride_n, stride_d, stride_pn, stride_pc,
                   f_t, f_h, f_w, HALF: tl.constexpr, FUSED_ROPE: tl.constexpr):
    """Store dq or dk from (g1, g2), the gradient w.r.t. the rotated halves: rotated back by
    -angle (R^T) here if FUSED_ROPE (cos/sin recomputed, not kept live across the loop), else
    as is (rope_rotate's backward applies R^T)."""
    if FUSED_ROPE:
        cos, sin = _cos_sin(POS, offs, N_CTX, stride_pn, stride_pc, f_t, f_h, f_w)
        g1, g2 = _rotate(g1, g2, cos, -sin)
    _store_halves(DX, g1, g2, offs, N_CTX, stride_n, stride_d, HALF)


@triton.jit
def _tile_ptrs(X, offs, stride_n, stride_d, HEAD_DIM: tl.constexpr):
    """Pointers to the full-width rows `offs` of X: [BLOCK, D]."""
    d = tl.arange(0, HEAD_DIM)
    return X + offs[:, None] * stride_n + d[None, :] * stride_d


# ----------------------------------------------------------------------------- pre-pass rotation

@triton.jit
def _rope_kernel(
    X, Y, POS, FREQ, sign,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_yb, stride_yh, stride_yn, stride_yd,
    stride_pb, stride_pn, stride_pc, stride_fh,
    H, N_CTX,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    # Y = R(sign * angle) X on one block of rows of one (sample, head); sign -1 gives R^T.
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    X += b.to(tl.int64) * stride_xb + h * stride_xh
    Y += b.to(tl.int64) * stride_yb + h * stride_yh
    POS += b.to(tl.int64) * stride_pb
    f_t, f_h, f_w = _load_freqs(FREQ + h * stride_fh, HEAD_DIM // 2)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cos, sin = _cos_sin(POS, offs, N_CTX, stride_pn, stride_pc, f_t, f_h, f_w)
    x1, x2 = _load_halves(X, offs, N_CTX, stride_xn, stride_xd, HEAD_DIM // 2)
    y1, y2 = _rotate(x1, x2, cos, sin * sign)
    _store_halves(Y, y1, y2, offs, N_CTX, stride_yn, stride_yd, HEAD_DIM // 2)


# ----------------------------------------------------------------------------- forward

@_autotune("fwd", _FWD_TILES)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, POS, FREQ, KV_LEN, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_pb, stride_pn, stride_pc, stride_fh,
    H, N_CTX, N_BUCKET,  # N_BUCKET: N rounded up to a power of 2, only an autotune key
    HEAD_DIM: tl.constexpr, FUSED_ROPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    f_t, f_h, f_w = _load_freqs(FREQ + h * stride_fh, HEAD_DIM // 2)

    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_qk(Q, POS, offs_m, N_CTX, stride_qn, stride_qd, stride_pn, stride_pc,
                      f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalised output
    # Only key blocks below kv_len are visited; kv_len >= 1 makes every row max finite.
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(K, POS, offs_n, N_CTX, stride_kn, stride_kd, stride_pn, stride_pc,
                          f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)
        # Scores in base-2 units, s = (q_rot . k_rot) log2(e) / sqrt(D); keys >= kv_len -> -inf.
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        s = tl.where(offs_n[None, :] < kv_len, s * qk_scale, float("-inf"))
        # Online softmax: raise the running max, rescale the sum and accumulator by alpha.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile_ptrs(V, offs_n, stride_vn, stride_vd, HEAD_DIM),
                    mask=offs_n[:, None] < N_CTX, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
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


@_autotune("dkdv", _DKDV_TILES)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, POS, FREQ, KV_LEN, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,  # DK and DV (same layout)
    stride_pb, stride_pn, stride_pc, stride_fh,
    H, N_CTX, N_BUCKET,
    HEAD_DIM: tl.constexpr, FUSED_ROPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    f_t, f_h, f_w = _load_freqs(FREQ + h * stride_fh, HEAD_DIM // 2)

    # This key tile (rotated) and its values; keys >= kv_len get zero gradients.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k1, k2 = _load_qk(K, POS, offs_n, N_CTX, stride_kn, stride_kd, stride_pn, stride_pc,
                      f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)
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
        # The query tile (rotated); dO, lse and delta of those queries. Rows past N_CTX load
        # dO = delta = 0, so they add nothing below.
        q1, q2 = _load_qk(Q, POS, offs_m, N_CTX, stride_qn, stride_qd, stride_pn, stride_pc,
                          f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)
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

    # dK = R^T (sm_scale dK_rot).
    _store_qk_grad(DK, dk1 * sm_scale, dk2 * sm_scale, POS, offs_n, N_CTX, stride_gn, stride_gd,
                   stride_pn, stride_pc, f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)
    tl.store(_tile_ptrs(DV, offs_n, stride_gn, stride_gd, HEAD_DIM), dv.to(DV.dtype.element_ty),
             mask=offs_n[:, None] < N_CTX)


@_autotune("dq", _DQ_TILES)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, POS, FREQ, KV_LEN, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,  # DQ
    stride_pb, stride_pn, stride_pc, stride_fh,
    H, N_CTX, N_BUCKET,
    HEAD_DIM: tl.constexpr, FUSED_ROPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    f_t, f_h, f_w = _load_freqs(FREQ + h * stride_fh, HEAD_DIM // 2)

    # This query tile (rotated); its dO, lse and delta.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_qk(Q, POS, offs_m, N_CTX, stride_qn, stride_qd, stride_pn, stride_pc,
                      f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)
    do = tl.load(_tile_ptrs(DO, offs_m, stride_don, stride_dod, HEAD_DIM),
                 mask=offs_m[:, None] < N_CTX, other=0.0)
    lse = tl.load(LSE + offs_m, mask=offs_m < N_CTX, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=offs_m < N_CTX, other=0.0)

    dq1 = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)  # dQ for the rotated q, first half
    dq2 = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)  # ... second half
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(K, POS, offs_n, N_CTX, stride_kn, stride_kd, stride_pn, stride_pc,
                          f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)
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

    # dQ = R^T (sm_scale dQ_rot).
    _store_qk_grad(DQ, dq1 * sm_scale, dq2 * sm_scale, POS, offs_m, N_CTX, stride_gn, stride_gd,
                   stride_pn, stride_pc, f_t, f_h, f_w, HEAD_DIM // 2, FUSED_ROPE)


# ----------------------------------------------------------------------------- torch ops

def _register(name: str, fake):
    """Register fn as the torch op st_drc::name: a triton_op (torch.compile traces into its
    kernels); under the interpreter an opaque custom_op with the shape-only `fake`."""
    def register(fn):
        if INTERPRET:
            op = torch.library.custom_op(f"st_drc::{name}", fn, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(f"st_drc::{name}", fn, mutates_args=())
    return register


def _pos_strides(pos: Tensor) -> tuple[int, int, int]:
    """(sample, token, axis) strides of [N, 3] or [B, N, 3] positions; sample stride 0 if shared."""
    return pos.stride(0) if pos.dim() == 3 else 0, pos.stride(-2), pos.stride(-1)


def _freq_stride(freqs: Tensor) -> int:
    """Head stride of a [heads, D/2, 3] table; 0 for a [D/2, 3] table shared by the heads."""
    return freqs.stride(0) if freqs.dim() == 3 else 0


def _empty_out(q: Tensor) -> tuple[Tensor, Tensor]:
    """O [B, heads, N, D] stored [B, N, heads, D]-major (so the model's transpose + flatten is
    free) and the fp32 base-2 logsumexp [B, heads, N]."""
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty(B, H, N, dtype=torch.float32)


def _empty_grads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv, contiguous (so dK and dV share the strides the dK/dV kernel takes once)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _rotate_fake(x, pos, freqs, inverse):
    return torch.empty_like(x)


@_register("rope_rotate", _rotate_fake)
def rope_rotate(x: Tensor, pos: Tensor, freqs: Tensor, inverse: bool) -> Tensor:
    """x [B, heads, N, D] rotated by RoPE (apply_rope), or by its inverse R^T if `inverse`."""
    B, H, N, D = x.shape
    y = torch.empty_like(x)
    wrap_triton(_rope_kernel)[(triton.cdiv(N, ROPE_BLOCK), B * H)](
        x, y, pos, freqs, -1.0 if inverse else 1.0, *x.stride(), *y.stride(),
        *_pos_strides(pos), _freq_stride(freqs), H, N, HEAD_DIM=D, BLOCK=ROPE_BLOCK,
    )
    return y


def _rotate_setup(ctx, inputs, output):
    _, pos, freqs, ctx.inverse = inputs
    ctx.save_for_backward(pos, freqs)


def _rotate_backward(ctx, dy):
    pos, freqs = ctx.saved_tensors
    return rope_rotate(dy, pos, freqs, not ctx.inverse), None, None, None  # R^-1 = R^T


rope_rotate.register_autograd(_rotate_backward, setup_context=_rotate_setup)


def _fwd_fake(q, k, v, pos, freqs, kv_len, fused_rope, precision):
    return _empty_out(q)


@_register("rope_attention_fwd", _fwd_fake)
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, freqs: Tensor, kv_len: Tensor,
                   fused_rope: bool, precision: str) -> tuple[Tensor, Tensor]:
    """O and the logsumexp of softmax attention; q, k rotated in-kernel if fused_rope."""
    B, H, N, D = q.shape
    o, lse = _empty_out(q)
    wrap_triton(_fwd_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, o, lse, pos, freqs, kv_len, LOG2E / math.sqrt(D),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *_pos_strides(pos), _freq_stride(freqs),
        H, N, triton.next_power_of_2(N), HEAD_DIM=D, FUSED_ROPE=fused_rope, PRECISION=precision,
    )
    return o, lse


def _bwd_fake(do, q, k, v, o, lse, pos, freqs, kv_len, fused_rope, precision):
    return _empty_grads(q, k, v)


@_register("rope_attention_bwd", _bwd_fake)
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pos: Tensor,
                   freqs: Tensor, kv_len: Tensor, fused_rope: bool,
                   precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of _attention_fwd given dO."""
    B, H, N, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    delta = torch.empty_like(lse)
    delta_block = 16 if INTERPRET else 64
    wrap_triton(_bwd_delta_kernel)[(triton.cdiv(N, delta_block), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, N, HEAD_DIM=D, BLOCK_M=delta_block,
    )
    dq, dk, dv = _empty_grads(q, k, v)
    rope_args = (*_pos_strides(pos), _freq_stride(freqs), H, N, triton.next_power_of_2(N))
    common = dict(HEAD_DIM=D, FUSED_ROPE=fused_rope, PRECISION=precision)
    wrap_triton(_bwd_dkdv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, pos, freqs, kv_len, sm_scale, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *rope_args, **common,
    )
    wrap_triton(_bwd_dq_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, pos, freqs, kv_len, sm_scale, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *rope_args, **common,
    )
    return dq, dk, dv


def _fwd_setup(ctx, inputs, output):
    q, k, v, pos, freqs, kv_len, ctx.fused_rope, ctx.precision = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, *output, pos, freqs, kv_len)


def _fwd_backward(ctx, do, _):
    dq, dk, dv = _attention_bwd(do, *ctx.saved_tensors, ctx.fused_rope, ctx.precision)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ----------------------------------------------------------------------------- public API

def _attention_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast, q, k, v cast to the autocast dtype: whether q_norm/k_norm (fp32 weights)
    return fp32 or half depends on the torch build and device, so the kernel must not."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs take exact "ieee" dots only when torch's fp32 matmul
    precision is "highest" (its default), else TF32 like torch; 16-bit inputs ignore it."""
    exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return "ieee" if exact else "tf32"


def _check_and_prepare(q, k, v, pos, freqs, kv_len):
    """Validate shapes/dtypes; return pos, freqs (fp32, contiguous, on q's device) and kv_len
    (int32 [B], clamped to [1, N])."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape [B, heads, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"outside autocast, q, k, v must share one dtype among fp16/bf16/fp32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if pos.shape not in ((N, 3), (B, N, 3)):
        raise ValueError(f"pos must be [N, 3] or [B, N, 3] with N={N}, B={B}; got {tuple(pos.shape)}")
    if freqs.shape not in ((D // 2, 3), (H, D // 2, 3)):
        raise ValueError(f"freqs must be [D/2, 3] = [{D // 2}, 3] or per head [{H}, {D // 2}, 3]; "
                         f"got {tuple(freqs.shape)}")
    pos = pos.to(device=q.device, dtype=torch.float32)
    freqs = freqs.to(device=q.device, dtype=torch.float32).contiguous()
    if kv_len is None:
        kv_len = torch.full((B,), N, device=q.device, dtype=torch.int32)
    elif kv_len.shape != (B,):
        raise ValueError(f"kv_len must be [B] = [{B}]; got {tuple(kv_len.shape)}")
    else:
        kv_len = kv_len.to(device=q.device, dtype=torch.int32).clamp(1, N).contiguous()
    return pos, freqs, kv_len


def rope_attention(q, k, v, pos, freqs, kv_len=None, fused_rope: bool = True):
    """Fused RoPE + softmax attention (differentiable in q, k, v).

    q, k, v: [B, heads, N, D], fp16/bf16 (fp32 accepted), any strides; D in (32, 64, 128). Under
             autocast all three are cast to the autocast dtype; outside it they must share one.
    pos:     float [N, 3] or [B, N, 3] positions (t, h, w), used in fp32.
    freqs:   [D/2, 3] (rope.rope_frequencies) or per head [heads, D/2, 3] (rope.ltx2_rope_frequencies).
    kv_len:  int [B] or None: queries of sample b see keys n < kv_len[b] (clamped to [1, N]);
             None = all N keys. Every query, including those >= kv_len, gets an output.
    fused_rope: rotate q/k inside the attention loops (True) or in a pre-pass (False).
    Returns [B, heads, N, D] in the attention dtype, stored [B, N, heads, D]-major (a transposed view).
    """
    q, k, v = _attention_dtype(q, k, v)
    pos, freqs, kv_len = _check_and_prepare(q, k, v, pos, freqs, kv_len)
    if not fused_rope:
        q, k = rope_rotate(q, pos, freqs, False), rope_rotate(k, pos, freqs, False)
    return _attention_fwd(q, k, v, pos, freqs, kv_len, fused_rope, _dot_precision(q.dtype))[0]


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
