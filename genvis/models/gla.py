"""Gated linear attention (GLA) for diffusion transformers, in plain PyTorch.

GLA: Yang, Wang, Shen, Panda & Kim, "Gated Linear Attention Transformers with Hardware-Efficient
Training" (ICML 2024). Its bidirectional use as the token mixer of a DiT: Zhu, Liao, Zhang, Wang,
Liu & Wang, "DiG: Scalable and Efficient Diffusion Models with Gated Linear Attention" (hustvl/DiG).

Per batch element and head, with row vectors q_t, k_t in R^{d_k}, v_t in R^{d_v} and a
data-dependent log decay g_t in R^{d_k}, g_t <= 0 (alpha_t = exp(g_t) in (0, 1]):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    S_0 = 0,    S_t in R^{d_k x d_v}
    o_t = q_t S_t

equivalently o_i = sum_{j<=i} ((q_i * exp(B_i - B_j)) . k_j) v_j with B_i = g_1 + ... + g_i.
Cost O(N d_k d_v) per head and a state of d_k x d_v per head, against O(N^2 d) for softmax attention.

`gla_recurrent` is the step-by-step reference; `gla_chunkwise` is the chunkwise-parallel form
(Section 4 of the GLA paper). The q * exp(B) / k * exp(-B) factorisation overflows fp32 once the
cumulative decay passes about -88, so the scan factors only within blocks whose decay spans at most
FACTOR_SPAN (one matmul per block) and otherwise uses the exact pairwise exponent b_i - b_j, which
exp sees only where it is <= 0. All math is fp32, whatever the input dtype or autocast; outputs
come back in q's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# Within a chunk the exact pairwise exponent b_i - b_j costs a [s, s, d_k] tensor per block of s
# tokens; 16 (flash-linear-attention's sub-chunk size) keeps that at 16 * d_k floats per token.
SUBCHUNK = 16
# The largest decay a block of tokens may span for its pairs to take one matmul through the split
# exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j): both factors then lie in [exp(-40), exp(40)], far
# inside fp32's normal range (1e-38 .. 3e38), so the split loses nothing. GatedLinearAttention's initial
# decays (0.99 .. 0.999 per token) span at most 0.63 over a 64-token chunk.
FACTOR_SPAN = 40.0

#################################################################################
#                           GLA scans (functional)                              #
#################################################################################


def _check_inputs(q, k, v, log_decay, chunk_size=None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, H, N, d_k], got shape {tuple(q.shape)}")
    if k.shape != q.shape or log_decay.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} and log_decay {tuple(log_decay.shape)} must have q's shape {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected [B, H, N, d_v] with B, H, N of q {tuple(q.shape)}, got {tuple(v.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """The GLA recurrence one token at a time (the reference; N sequential steps).

    q, k, log_decay [B, H, N, d_k] (log_decay <= 0), v [B, H, N, d_v] -> o [B, H, N, d_v] in q's dtype.
    """
    _check_inputs(q, k, v, log_decay)
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, g = q.float(), k.float(), v.float(), log_decay.float()
        S = q.new_zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3])  # B, H, Dk, Dv
        out = []
        for t in range(q.shape[2]):
            S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
            out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
        o = torch.stack(out, dim=2) if out else v.new_zeros(v.shape)  # B, H, N, Dv
    return o.to(dtype)


def _intra_chunk(q, k, v, b, s: int, factored: bool) -> torch.Tensor:
    """sum_{j<=i in chunk} ((q_i * exp(b_i - b_j)) . k_j) v_j for every chunk at once.

    q, k, b [B, H, n, C, Dk] (b: cumulative log decay from the chunk start), v [B, H, n, C, Dv], fp32.
    Pairs in the same block of s tokens: `factored` splits the exponent at r, the block's first token,
    exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j), so the block is one matmul; the caller allows it only
    where b_r - b_j stays within FACTOR_SPAN. Otherwise the exact pairwise exponent, a [s, s, Dk] tensor
    per block. A pair (i, j) with j in an earlier block than i splits at r, the first token of i's block:
    both exponents are <= 0 since b never increases.
    """
    C = q.shape[-2]
    m = C // s
    q_s, k_s, v_s, b_s = (rearrange(t, "b h n (m s) d -> b h n m s d", s=s) for t in (q, k, v, b))
    ref = b_s[..., :1, :]  # B, H, n, m, 1, Dk: b at the first token of each block
    if factored or m > 1:
        q_off = q_s * (b_s - ref).exp()  # B, H, n, m, s, Dk: exponents <= 0

    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()  # s(i), s(j)
    if factored:
        k_diag = k_s * (ref - b_s).exp()  # B, H, n, m, s, Dk: exponents in [0, FACTOR_SPAN]
        A_diag = (q_off @ k_diag.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # B, H, n, m, s(i), s(j)
    else:
        # Mask j > i to -inf before exp, so exp never sees a positive exponent. In place on the one
        # fresh [s, s, Dk] tensor per block: it is the largest temporary of the scan.
        pair = b_s[..., :, None, :] - b_s[..., None, :, :]  # B, H, n, m, s(i), s(j), Dk
        pair = pair.masked_fill_(~causal[:, :, None], float("-inf")).exp_()
        A_diag = (pair * q_s[..., :, None, :] * k_s[..., None, :, :]).sum(-1)  # B, H, n, m, s, s
    o = A_diag @ v_s  # B, H, n, m, s, Dv
    if m == 1:
        return rearrange(o, "b h n m s d -> b h n (m s) d")

    # Off-diagonal blocks: key j of the chunk against the queries of block p, for j < p * s only.
    earlier = torch.arange(C, device=q.device)[None, :] < (torch.arange(m, device=q.device) * s)[:, None]  # m, C
    k_exp = (ref - b[..., None, :, :]).masked_fill(~earlier[:, :, None], float("-inf"))  # B, H, n, m, C, Dk
    k_off = k[..., None, :, :] * k_exp.exp()  # B, H, n, m, C, Dk
    A_off = q_off @ k_off.transpose(-1, -2)  # B, H, n, m, s, C
    o = o + A_off @ v[..., None, :, :]  # B, H, n, m, s, Dv
    return rearrange(o, "b h n m s d -> b h n (m s) d")


def _block_plan(b: torch.Tensor) -> tuple[int, bool]:
    """(s, factored) for `_intra_chunk` given b [B, H, n, C, Dk]: the largest blocks, of C tokens or of
    SUBCHUNK, across which no channel decays by more than FACTOR_SPAN, factored; else the pairwise
    exponent in SUBCHUNK-token blocks, exact for any decay.

    The check reads a value back: under torch.compile that is a graph break, after which dynamo compiles
    only the plan the data take. (A torch.cond over the plans compiled all of them, the slow-compiling
    pairwise one included: LinearDiT-S/2 gated took 142-190 s to compile against 16-65 s, for no
    measurable gain per step.)
    """
    C = b.shape[-2]
    s = SUBCHUNK if C % SUBCHUNK == 0 else C
    for size in dict.fromkeys((C, s)):  # C first: one block per chunk, no off-diagonal part
        blocks = rearrange(b, "b h n (m s) d -> b h n m s d", s=size)
        if (blocks[..., 0, :] - blocks[..., -1, :]).max() <= FACTOR_SPAN:
            return size, True
    return s, False


def _inter_chunk(q, k, v, b) -> torch.Tensor:
    """(q_i * exp(b_i)) S_prev, with S_prev the state entering i's chunk; same layout as `_intra_chunk`.

    The state leaving a chunk is S_new = diag(exp(b_C)) S_prev + sum_j (k_j * exp(b_C - b_j))^T v_j.
    Only this carry is sequential: a loop over the n chunks of one small update each.
    """
    b_last = b[..., -1:, :]  # B, H, n, 1, Dk: log decay across the whole chunk
    dS = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # B, H, n, Dk, Dv
    decay = b_last.exp().transpose(-1, -2)  # B, H, n, Dk, 1
    S = torch.zeros_like(dS[:, :, 0])  # B, H, Dk, Dv
    entering = []
    for c in range(dS.shape[2]):
        entering.append(S)
        S = decay[:, :, c] * S + dS[:, :, c]
    S_in = torch.stack(entering, dim=2)  # B, H, n, Dk, Dv
    return (q * b.exp()) @ S_in  # B, H, n, C, Dv


def _chunkwise_fp32(q, k, v, g, chunk_size: int) -> torch.Tensor:
    """`gla_chunkwise` on fp32 tensors, fp32 out."""
    N = q.shape[2]
    C = chunk_size
    # Zero padding after the last token: k = 0 adds nothing to the state, g = 0 decays nothing, and no
    # real token reads a later one, so the real outputs are those of the unpadded sequence.
    pad = -N % C
    q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    q, k, v, g = (rearrange(t, "b h (n c) d -> b h n c d", c=C) for t in (q, k, v, g))  # B, H, n, C, d
    b = g.cumsum(dim=3)  # B, H, n, C, Dk: log decay from the chunk start through token i (inclusive)
    o = _intra_chunk(q, k, v, b, *_block_plan(b)) + _inter_chunk(q, k, v, b)  # B, H, n, C, Dv
    return rearrange(o, "b h n c d -> b h (n c) d")[:, :, :N]


def gla_chunkwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """The GLA recurrence in chunkwise-parallel form: same output as `gla_recurrent`, N / C sequential steps.

    q, k, log_decay [B, H, N, d_k] (log_decay <= 0), v [B, H, N, d_v] -> o [B, H, N, d_v] in q's dtype.
    Any N: the tail chunk is zero-padded and the padding changes no output. chunk_size C changes only
    speed and memory; multiples of 16 bound the exact pairwise part to 16 x 16 blocks. Work per head
    O(N d_k d_v) for the state plus O(N C (d_k + d_v)) within chunks.
    """
    _check_inputs(q, k, v, log_decay, chunk_size)
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        o = _chunkwise_fp32(q.float(), k.float(), v.float(), log_decay.float(), chunk_size)
    return o.to(dtype)


def bidirectional_gla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """Forward scan plus backward scan, as DiG (and ViG) mix image tokens: o = fwd + bwd.

    The backward scan is `gla_chunkwise` on the sequences flipped along N, flipped back, so
    o_i = sum_{j<=i} ((q_i * exp(g_{j+1} + ... + g_i)) . k_j) v_j
        + sum_{j>=i} ((q_i * exp(g_i + ... + g_{j-1})) . k_j) v_j.
    The diagonal term (q_i . k_i) v_i appears in both sums, as in DiG/ViG.
    Shapes and dtype as `gla_chunkwise`; both directions run as one batch of 2B.
    """
    _check_inputs(q, k, v, log_decay, chunk_size)
    dtype = q.dtype
    B = q.shape[0]
    with torch.autocast(device_type=q.device.type, enabled=False):
        both = [torch.cat([t.float(), t.float().flip(2)]) for t in (q, k, v, log_decay)]  # 2B, H, N, d
        o = _chunkwise_fp32(*both, chunk_size)  # 2B, H, N, Dv
        o = o[:B] + o[B:].flip(2)
    return o.to(dtype)


#################################################################################
#                        GatedLinearAttention layer                             #
#################################################################################


def decay_gate_bias(head_dim: int, num_heads: int, temperature: float,
                    min_timescale: float = 100.0, max_timescale: float = 1000.0) -> torch.Tensor:
    """[num_heads * head_dim] bias b with exp(logsigmoid(b) / temperature) = 1 - 1 / tau per key channel.

    The timescales tau are spaced geometrically from min_timescale to max_timescale tokens across the
    d_k channels of each head (the same spread in every head), i.e. initial decays 0.99 .. 0.999.
    """
    tau = torch.logspace(math.log10(min_timescale), math.log10(max_timescale), head_dim, dtype=torch.float64)
    log_sig = temperature * torch.log1p(-1.0 / tau)  # the logsigmoid(b) that gives decay 1 - 1/tau
    bias = log_sig - torch.log(-torch.expm1(log_sig))  # logit(exp(log_sig))
    return bias.repeat(num_heads).float()


class GatedLinearAttention(nn.Module):
    """Bidirectional gated linear attention on tokens x [B, N, D], a drop-in for a DiT block's attention.

    Per head (d_k = d_v = D / num_heads), with q scaled by d_k^-1/2 and a decay gate
    log alpha_t = logsigmoid(gate(x_t)) / gate_temperature in (-inf, 0]^{d_k}:
        S_t = diag(alpha_t) S_{t-1} + k_t^T v_t  (state d_k x d_v),   o_t = q_t S_t,
    run forwards and backwards over the sequence and summed (`bidirectional_gla`), then
        out = proj(RMSNorm_head(o) * silu(out_gate(x))).
    Cost O(N d_k d_v) per head; the scans run in fp32 whatever the autocast dtype.

    `qkv` and `proj` have the names and shapes of a DiT `Attention`'s (timm layout), so a trained DiT's
    attention weights load into them (`load_state_dict(..., strict=False)`); `gate`, `out_gate` and
    `out_norm` are GLA's own.

    Args:
        dim: token width D; must be divisible by num_heads.
        num_heads: number of heads.
        qkv_bias: bias on the fused qkv projection, default True (as DiT).
        gate_low_rank: rank of the decay gate's bottleneck dim -> r -> dim, default 16 (as GLA).
        gate_temperature: divisor of logsigmoid in the log decay (GLA's gate_logit_normalizer), default 16.
        chunk_size: chunk length of the chunkwise scan, default 64; changes speed and memory, not the output.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        gate_low_rank: int = 16,
        gate_temperature: float = 16.0,
        chunk_size: int = 64,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if gate_temperature <= 0:
            raise ValueError(f"gate_temperature: expected > 0, got {gate_temperature}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.gate_temperature = gate_temperature
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.gate = nn.Sequential(nn.Linear(dim, gate_low_rank), nn.Linear(gate_low_rank, dim))
        self.out_gate = nn.Linear(dim, dim)
        self.out_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.proj = nn.Linear(dim, dim)
        self.reset_extra()

    def reset_extra(self) -> None:
        """Initialise what DiT's attention does not have. nn.Linear defaults everywhere, except the decay
        gate's last bias: `decay_gate_bias`, initial decays 0.99 .. 0.999 per step (memory of 100 .. 1000
        tokens) instead of the exp(log(1/2) / 16) = 0.958 (memory of ~24 tokens) that a zero bias gives.
        A model whose initialize_weights re-initialises every nn.Linear (DiT's xavier + zero bias) calls
        this afterwards, as LinearDiT does."""
        with torch.no_grad():
            bias = decay_gate_bias(self.head_dim, self.num_heads, self.gate_temperature)
            self.gate[-1].bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        # logsigmoid in fp32: a bf16 log decay is summed over up to N tokens in the scan.
        log_decay = F.logsigmoid(self.gate(x).float()) / self.gate_temperature  # B, N, D
        log_decay = rearrange(log_decay, "b n (h d) -> b h n d", h=self.num_heads)
        o = bidirectional_gla(q * self.head_dim**-0.5, k, v, log_decay, self.chunk_size)  # B, H, N, Dh
        # The norm in fp32 with fp32 weight: no bf16 sum of squares, no input/weight dtype mismatch.
        norm = self.out_norm
        o = F.rms_norm(o.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(o.dtype)
        o = rearrange(o, "b h n d -> b n (h d)")
        return self.proj(o * F.silu(self.out_gate(x)))
