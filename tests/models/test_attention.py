"""genvis.models.layers.attention, both of its kernels (SDPA; two matmuls for bf16 on the CPU), against
softmax(q k^T * scale + mask) v written here in float64."""
import pytest
import torch

from genvis.models.layers import attention


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
