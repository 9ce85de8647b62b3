"""Proportional attention against an explicit float64 softmax, forward and gradients."""

import pytest
import torch

import vtome_kernels as vt

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (3e-3, 3e-3)}


def explicit(q, k, v, size, scale):
    """softmax(q kᵀ scale + log size) v in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) * scale
    if size is not None:
        logits = logits + size.double().log()[:, None, None, :, 0]
    return torch.softmax(logits, dim=-1) @ v


def _qkv(b, h, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk))
    size = torch.randint(1, 40, (b, nk, 1), generator=g).float()
    return q, k, v, size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17, 8), (1, 2, 5, 33, 16), (2, 1, 1, 1, 4)])
@pytest.mark.parametrize("with_size", [True, False])
def test_prop_attention_forward_and_backward(dtype, shape, with_size):
    q, k, v, size = _qkv(*shape, dtype)
    size = size if with_size else None
    scale = shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = vt.prop_attention(*leaves, size, backend="reference")
    want_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = explicit(*want_leaves, size, scale)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    g = torch.randn_like(want)
    out.backward(g.to(dtype))
    want.backward(g)
    for got, ref in zip(leaves, want_leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=4 * atol, rtol=4 * rtol)


def test_size_counts_as_repeated_keys():
    """A key of size s weighs exactly like s copies of that key."""
    q, k, v, _ = _qkv(1, 2, 4, 3, 8, torch.float64)
    size = torch.tensor([[[1.0], [3.0], [2.0]]], dtype=torch.float64)
    out = vt.prop_attention(q, k, v, size)
    reps = torch.tensor([0, 1, 1, 1, 2, 2])
    torch.testing.assert_close(out, vt.prop_attention(q, k[:, :, reps], v[:, :, reps], None))


def test_scale_and_plain_attention():
    q, k, v, _ = _qkv(2, 2, 6, 6, 8, torch.float64)
    torch.testing.assert_close(vt.prop_attention(q, k, v, None, scale=0.3),
                               explicit(q, k, v, None, 0.3))
    ones = torch.ones(2, 6, 1, dtype=torch.float64)
    torch.testing.assert_close(vt.prop_attention(q, k, v, ones), vt.prop_attention(q, k, v, None))


def test_prop_attention_errors():
    q, k, v, size = _qkv(2, 3, 5, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="q must be 4-D"):
        vt.prop_attention(q[0], k, v, size)
    with pytest.raises(ValueError, match=r"k must have shape \[2, 3, 5, 8\]"):
        vt.prop_attention(q, k[..., :4], v, size)
    with pytest.raises(ValueError, match=r"v must have shape \[2, 3, 5, 8\]"):
        vt.prop_attention(q, k, v[:, :, :4], size)
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        vt.prop_attention(q, k.double(), v, size)
    with pytest.raises(ValueError, match=r"size must have shape \[2, 5, 1\]"):
        vt.prop_attention(q, k, v, size[:, :4])
    with pytest.raises(ValueError, match="size must be positive"):
        vt.prop_attention(q, k, v, size * 0)
    with pytest.raises(TypeError, match="scale must be a float"):
        vt.prop_attention(q, k, v, size, scale="0.1")
    with pytest.raises(ValueError, match="one device, got q on cpu, k on meta"):
        vt.prop_attention(q, k.to("meta"), v, size)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        vt.prop_attention(q, None, v, size)
