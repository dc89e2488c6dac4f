"""Gated linear attention against independent computations: the step-by-step recurrence and the O(N^2)
closed form o_i = sum_{j<=i} ((q_i * exp(B_i - B_j)) . k_j) v_j evaluated in float64."""
import pytest
import torch

from genvis.models.gla import (
    FACTOR_SPAN,
    GatedLinearAttention,
    _block_plan,
    bidirectional_gla,
    decay_gate_bias,
    gla_chunkwise,
    gla_recurrent,
)
from genvis.models.layers import Attention


def random_inputs(seed=0, B=2, H=3, N=50, dk=8, dv=12):
    """q, k [B, H, N, dk], v [B, H, N, dv], log decay mixing strong, mild, constant -5 and zero decay."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, dk, generator=gen)
    k = torch.randn(B, H, N, dk, generator=gen)
    v = torch.randn(B, H, N, dv, generator=gen)
    u = torch.rand(B, H, N, dk, generator=gen)
    g = torch.where(torch.arange(dk) % 2 == 0, -5.0 * u, -0.05 * u)  # strong (down to -5/step) and mild
    g[..., 1] = -5.0  # cumulative decay -250 by the end: exp(+250) overflows fp32
    g[..., 3] = 0.0  # no decay at all
    return q, k, v, g


def closed_form(q, k, v, g):
    """o_i = sum_{j<=i} ((q_i * exp(B_i - B_j)) . k_j) v_j, B the global cumulative sum, in float64."""
    q, k, v, g = (t.double() for t in (q, k, v, g))
    N = q.shape[2]
    Bc = g.cumsum(dim=2)  # B, H, N, dk
    expo = Bc[:, :, :, None, :] - Bc[:, :, None, :, :]  # B, H, N(i), N(j), dk
    later = torch.ones(N, N, dtype=torch.bool).triu(1)  # j > i
    w = expo.masked_fill(later[:, :, None], float("-inf")).exp()
    A = torch.einsum("bhid,bhjd,bhijd->bhij", q, k, w)
    return A @ v


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_chunkwise_equals_recurrent_with_tail_padding():
    q, k, v, g = random_inputs()
    o_rec = gla_recurrent(q, k, v, g)
    o_chunk = gla_chunkwise(q, k, v, g, chunk_size=16)  # N = 50: three full chunks and a padded one
    assert o_chunk.shape == (2, 3, 50, 12)
    assert torch.isfinite(o_chunk).all()
    assert rel_err(o_chunk, o_rec) < 1e-5


def test_both_scans_equal_closed_form():
    q, k, v, g = random_inputs(seed=1)
    ref = closed_form(q, k, v, g)
    assert rel_err(gla_recurrent(q, k, v, g), ref) < 1e-5
    for C in (16, 64):  # 64: one padded chunk of four 16-token sub-chunks (exercises the off-diagonal blocks)
        assert rel_err(gla_chunkwise(q, k, v, g, chunk_size=C), ref) < 1e-5


def test_naive_factorisation_overflows_where_chunkwise_does_not():
    # The reason for the pairwise exponent: q * exp(B) and k * exp(-B) with B = -250 give 0 * inf.
    q, k, v, g = random_inputs(seed=2)
    Bc = g.cumsum(dim=2)
    naive = ((q * Bc.exp()) @ (k * (-Bc).exp()).transpose(-1, -2)).tril() @ v
    assert not torch.isfinite(naive).all()
    assert rel_err(gla_chunkwise(q, k, v, g, chunk_size=64), closed_form(q, k, v, g)) < 1e-5


@pytest.mark.parametrize("C", [8, 32, 64])
def test_chunk_size_does_not_change_the_result(C):
    q, k, v, g = random_inputs(seed=3, N=70)
    o_rec = gla_recurrent(q, k, v, g)
    assert rel_err(gla_chunkwise(q, k, v, g, chunk_size=C), o_rec) < 1e-5
    assert rel_err(gla_chunkwise(q, k, v, g, chunk_size=C), gla_chunkwise(q, k, v, g, chunk_size=64)) < 1e-5


def test_bidirectional_equals_forward_plus_flipped_backward_closed_form():
    q, k, v, g = random_inputs(seed=4, N=40)
    fwd = closed_form(q, k, v, g)
    flip = lambda t: t.flip(2)  # noqa: E731
    bwd = closed_form(flip(q), flip(k), flip(v), flip(g)).flip(2)
    assert rel_err(bidirectional_gla(q, k, v, g, chunk_size=16), fwd + bwd) < 1e-5

    # The backward term written out for one token: o_i = sum_{j>=i} ((q_i * exp(g_i + ... + g_{j-1})) . k_j) v_j,
    # so the diagonal (q_i . k_i) v_i is counted once in each direction.
    i = 7
    qd, kd, vd, gd = (t[0, 0].double() for t in (q, k, v, g))
    bwd_i = sum((qd[i] * gd[i:j].sum(0).exp() * kd[j]).sum() * vd[j] for j in range(i, 40))
    assert torch.allclose(bwd[0, 0, i], bwd_i, rtol=1e-9, atol=1e-9)


def decay_inputs(per_token, seed=6, N=100):
    """random_inputs with log decay per_token * U(0, 1), and exactly per_token in channel 0 (the channel that
    decides the block plan)."""
    q, k, v, g = random_inputs(seed=seed, N=N)
    g = per_token * torch.rand(g.shape, generator=torch.Generator().manual_seed(seed))
    g[..., 0] = per_token
    return q, k, v, g


# Chunks of 64: a chunk spans 63 steps of decay, a 16-token block 15, against FACTOR_SPAN = 40.
PLANS = [(-0.5, (64, True)),  # 63 * 0.5 = 31.5: one factored block per chunk
         (-39 / 15, (16, True)),  # 164 over the chunk, 39 over a block: factored 16-token blocks
         (-5.0, (16, False))]  # 75 over a block: the pairwise exponent


@pytest.mark.parametrize("per_token, plan", PLANS)
def test_every_block_plan_equals_closed_form_with_gradients(per_token, plan):
    assert FACTOR_SPAN == 40.0
    q, k, v, g = decay_inputs(per_token)
    b = torch.nn.functional.pad(g, (0, 0, 0, 28)).reshape(2, 3, 2, 64, 8).cumsum(3)  # as the scan pads and chunks
    assert _block_plan(b) == plan
    w = torch.randn(2, 3, 100, 12, generator=torch.Generator().manual_seed(7))
    grads = []
    for scan, dtype in ((lambda *t: gla_chunkwise(*t, chunk_size=64), torch.float32), (closed_form, torch.float64)):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v, g)]
        o = scan(*leaves)
        (o * w.to(o.dtype)).sum().backward()
        grads.append([o.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*grads):
        assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("per_token", [-0.5, -5.0])
def test_compiled_scan_equals_eager_on_the_factored_and_the_pairwise_plan(per_token):
    q, k, v, g = (t[:, :, :70] for t in decay_inputs(per_token))
    compiled = torch.compile(bidirectional_gla)
    outs = []
    for scan in (bidirectional_gla, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        o = scan(*leaves, chunk_size=64)
        o.square().sum().backward()
        outs.append([o.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-5


def test_input_dtype_is_returned_and_bad_input_is_named():
    q, k, v, g = random_inputs(seed=5, N=20)
    o = gla_chunkwise(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), chunk_size=8)
    assert o.dtype == torch.bfloat16
    o32 = gla_chunkwise(*(t.bfloat16().float() for t in (q, k, v, g)), chunk_size=8)
    assert rel_err(o, o32) < 1e-2  # only the final rounding to bf16
    with pytest.raises(ValueError, match="chunk_size"):
        gla_chunkwise(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="log_decay"):
        gla_chunkwise(q, k, v, g[..., :4])
    with pytest.raises(ValueError, match="num_heads 5"):
        GatedLinearAttention(64, 5)


#################################################################################
#                               The module                                      #
#################################################################################


def module_reference(m, x):
    """The layer written out with plain ops and the float64 closed forms."""
    B, N, D = x.shape
    H, Dh = m.num_heads, m.head_dim
    x = x.double()
    lin = lambda layer, t: t @ layer.weight.double().T + layer.bias.double()  # noqa: E731
    qkv = lin(m.qkv, x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # 3, B, H, N, Dh
    q, k, v = qkv[0] * Dh**-0.5, qkv[1], qkv[2]
    g = torch.nn.functional.logsigmoid(lin(m.gate[1], lin(m.gate[0], x))) / m.gate_temperature
    g = g.reshape(B, N, H, Dh).transpose(1, 2)
    flip = lambda t: t.flip(2)  # noqa: E731
    o = closed_form(q, k, v, g) + closed_form(flip(q), flip(k), flip(v), flip(g)).flip(2)  # B, H, N, Dh
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.out_norm.weight.double()
    o = o.transpose(1, 2).reshape(B, N, D) * torch.nn.functional.silu(lin(m.out_gate, x))
    return lin(m.proj, o)


def tiny_module(seed=0, dim=32, heads=4, chunk_size=16):
    torch.manual_seed(seed)
    m = GatedLinearAttention(dim, heads, chunk_size=chunk_size)
    with torch.no_grad():  # non-trivial norm weight, so the test sees it
        m.out_norm.weight.uniform_(0.5, 1.5)
    return m


def test_module_equals_written_out_reference():
    m = tiny_module()
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(0))
    assert rel_err(m(x), module_reference(m, x)) < 1e-5


def test_module_under_bf16_autocast_and_large_activations():
    m = tiny_module(seed=1)
    x = torch.randn(2, 48, 32, generator=torch.Generator().manual_seed(1))
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        big = m(x * 1e3)
    assert torch.isfinite(out).all() and torch.isfinite(big).all()
    assert rel_err(out.float(), ref) < 2e-2
    big32 = m(x * 1e3)
    assert torch.isfinite(big32).all()
    assert rel_err(big.float(), big32) < 2e-2


def test_dit_attention_weights_load_and_every_parameter_gets_gradient():
    dim, heads = 32, 4
    m = tiny_module(dim=dim, heads=heads)
    attn = Attention(dim, heads, qkv_bias=True)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    dit_shapes = {n: tuple(p.shape) for n, p in attn.state_dict().items()}
    assert dit_shapes == {"qkv.weight": (3 * dim, dim), "qkv.bias": (3 * dim,), "proj.weight": (dim, dim), "proj.bias": (dim,)}
    assert {n: shapes[n] for n in dit_shapes} == dit_shapes
    result = m.load_state_dict(attn.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(set(shapes) - set(dit_shapes))
    assert torch.equal(m.qkv.weight, attn.qkv.weight) and torch.equal(m.proj.bias, attn.proj.bias)

    x = torch.randn(2, 20, dim, generator=torch.Generator().manual_seed(2))
    m(x).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gate_bias_gives_initial_decays_from_099_to_0999():
    m = GatedLinearAttention(64, 2, gate_temperature=16.0)
    decay = (torch.nn.functional.logsigmoid(m.gate[1].bias.double()) / 16.0).exp().reshape(2, 32)
    tau = torch.logspace(2, 3, 32, dtype=torch.float64)
    assert torch.allclose(decay, (1 - 1 / tau).expand(2, 32), rtol=0, atol=1e-6)
    assert torch.equal(m.gate[1].bias, decay_gate_bias(32, 2, 16.0))

    # After a DiT-style pass (xavier weights, zero biases on every nn.Linear), reset_extra restores the bias.
    for layer in m.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    m.reset_extra()
    assert torch.equal(m.gate[1].bias, decay_gate_bias(32, 2, 16.0))
