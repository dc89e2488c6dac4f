"""genvis.models.layers.attention, both of its kernels (SDPA; two matmuls for bf16 on the CPU), against
softmax(q k^T * scale + mask) v written here in float64; and the forms torch.compile runs (ATen's softmax as one
op; tanh-GELU in its sigmoid form) against the formulas, values and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from genvis.models.layers import attention, gelu, gelu_tanh


def reference(q, k, v, mask=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("masked, scale", [(False, None), (True, None), (True, 1.0)])
def test_attention_equals_the_formula(dtype, atol, masked, scale):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (5, 9, 9))
    # block-causal over scales, as VAR's: query i (the last 5 of 9 tokens) sees keys up to its own block
    mask = torch.tensor([[j <= 4 + (i >= 1) * 4 for j in range(9)] for i in range(5)]) if masked else None
    out = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale=scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, scale), rtol=0, atol=atol)
    if masked:  # what a query may not see does not reach it
        v2 = v.clone()
        v2[..., ~mask[0], :] += 100.0
        out2 = attention(q.to(dtype), k.to(dtype), v2.to(dtype), mask, scale=scale)
        torch.testing.assert_close(out2[..., 0, :], out[..., 0, :], rtol=0, atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compiled_attention_and_its_gradients_equal_the_formula(dtype, atol):
    """Under torch.compile the two-matmul kernel's softmax is genvis::softmax (ATen's kernel as one op, with its
    own backward): values and the gradients of q, k, v against float64 autograd through the formula."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (7, 7, 7))
    w = torch.randn(2, 3, 7, 16, generator=g)
    compiled = torch.compile(attention, fullgraph=True)
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    (out.float() * w).sum().backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]  # q, k, v are not leaves of a graph here
    expected = reference(*exact)
    (expected * w.double()).sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    for mine, theirs in zip(leaves, exact):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0, atol=4 * atol)


def test_gelu_tanh_eager_and_compiled_equal_the_formula():
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in float64, and its derivative by float64 autograd: the eager
    form (F.gelu) and the compiled sigmoid form, in float32 and bf16."""
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    xd = x.clone().requires_grad_()
    exact = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    exact.sum().backward()
    compiled = torch.compile(gelu_tanh, fullgraph=True)
    for dtype, atol in ((torch.float32, 5e-6), (torch.bfloat16, 4e-2)):
        for fn in (gelu_tanh, compiled):
            leaf = x.to(dtype).requires_grad_()
            out = fn(leaf)
            out.float().sum().backward()
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), exact.detach(), rtol=0, atol=atol)
            torch.testing.assert_close(leaf.grad.double(), xd.grad, rtol=0, atol=atol)
    torch.testing.assert_close(gelu_tanh(x.float()), F.gelu(x.float(), approximate="tanh"), rtol=0, atol=0)


def test_gelu_eager_and_compiled_equal_the_formula():
    """x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) in float64 and its derivative Phi(x) + x phi(x) written out: eager
    (F.gelu) and compiled (ATen's kernel as one op; its backward is traced, so inductor's), in float32 and bf16; the
    compiled forward equals the eager one bit for bit."""
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    exact, slope = x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    compiled = torch.compile(gelu, fullgraph=True)
    for dtype, atol in ((torch.float32, 2e-6), (torch.bfloat16, 4e-2)):
        outs = []
        for fn in (gelu, compiled):
            leaf = x.to(dtype).requires_grad_()
            out = fn(leaf)
            out.float().sum().backward()
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), exact, rtol=0, atol=atol)
            torch.testing.assert_close(leaf.grad.double(), slope, rtol=0, atol=atol)
            outs.append(out)
        assert torch.equal(*outs)
    # the compiled forward calls ATen's kernel (inductor's own erf-GELU would be a generated cpp kernel instead)
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        compiled(x.float())
    assert "aten::gelu" in {event.key for event in prof.key_averages()}
