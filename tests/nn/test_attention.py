"""The explicit-math attention kernel against SDPA and an fp64 reference: same function, masks included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t2i.models.prior import PriorNetwork
from t2i.models.unet import Unet
from t2i.nn.attention import attention, attention_kernel, pick_kernel


def reference(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_kernels_agree_with_the_reference_forward_and_backward(dtype, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (20, 9, 9))
    mask = (torch.arange(9)[None] < torch.tensor([[9], [4]]))[:, None, None, :] if masked else None  # key padding
    ref = reference(q, k, v, mask)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    grads = {}
    for kernel in ("sdpa", "math"):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        with attention_kernel(kernel):
            out = attention(qq, kk, vv, mask)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        out.float().square().sum().backward()
        grads[kernel] = [t.grad.float() for t in (qq, kk, vv)]
    for a, b in zip(*grads.values(), strict=True):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def test_auto_picks_math_for_masked_or_trained_low_precision_cpu_attention():
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float32)
    assert pick_kernel(bf16) == "sdpa"  # unmasked inference: SDPA
    assert pick_kernel(bf16, masked=True) == "math"
    assert pick_kernel(bf16.requires_grad_()) == "math"  # a backward follows
    with torch.no_grad():
        assert pick_kernel(bf16) == "sdpa"
    assert pick_kernel(fp32) == "sdpa"
    assert pick_kernel(fp32.requires_grad_(), masked=True) == "sdpa"
    with attention_kernel("sdpa"):
        assert pick_kernel(torch.zeros(1, dtype=torch.bfloat16)) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"), attention_kernel("flash"):
        pass


def test_fully_masked_row_is_finite_in_the_math_kernel():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    with attention_kernel("math"):
        out = attention(q, k, v, mask)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out))  # uniform weights, not NaN


def test_causal_mask_matches_sdpa_is_causal():
    q, k, v = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    with attention_kernel("math"):
        out = attention(q, k, v, causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["unet", "prior"])
def test_models_under_bf16_autocast_match_across_kernels(model):
    torch.manual_seed(0)
    if model == "unet":
        net = Unet(dim=16, dim_mults=(1, 2), num_res_blocks=1, attn_levels=(False, True), self_attn=(False, True),
                   heads=2, head_dim=8, groups=4, image_embed_dim=8, text_embed_dim=8).eval()  # fmt: skip
        for p in net.parameters():  # zero-initialised output layers would hide the attention
            torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
        args = (torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]))
        kw = {"image_embed": torch.randn(2, 8), "text_tokens": torch.randn(2, 5, 8),
              "text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)}  # fmt: skip
    else:
        net = PriorNetwork(embed_dim=16, depth=2, heads=2, head_dim=8, text_token_dim=16, max_text_len=5).eval()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
        args = (torch.randn(2, 16), torch.tensor([10.0, 500.0]))
        kw = {"text_embed": torch.randn(2, 16), "text_tokens": torch.randn(2, 5, 16),
              "text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)}  # fmt: skip
    outs = {}
    for kernel in ("sdpa", "math"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), attention_kernel(kernel):
            outs[kernel] = net(*args, **kw).float()
    scale = outs["sdpa"].abs().max()
    assert scale > 0
    torch.testing.assert_close(outs["math"], outs["sdpa"], atol=2e-2 * scale, rtol=0)


def test_math_kernel_softmax_precision_for_inference_and_training():
    # the 1/sqrt(d) scale is applied in the matmul's fp32 accumulator (d = 24: not a power of two, so scaling q in
    # bf16 first rounds differently), inference takes the fp32 softmax rounded once to bf16, training the bf16
    # softmax (fp32 inside the kernel), which agrees with it to a bf16 rounding step; both kernels are checked
    # against fp64 in test_kernels_agree_with_the_reference_forward_and_backward
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(2, 4, 64, 24, generator=g).bfloat16() for _ in range(3))
    with attention_kernel("math"):
        with torch.no_grad():
            infer = attention(q, k, v)
        train = attention(q.clone().requires_grad_(), k, v)
    scores = torch.baddbmm(torch.zeros(8, 64, 64, dtype=torch.bfloat16), q.flatten(0, 1),
                           k.flatten(0, 1).transpose(1, 2), beta=0, alpha=24**-0.5)  # fmt: skip
    expected = (scores.float().softmax(-1).bfloat16() @ v.flatten(0, 1)).view_as(infer)
    assert torch.equal(infer, expected)
    assert train.requires_grad
    torch.testing.assert_close(train.float(), infer.float(), atol=5e-2, rtol=2e-2)


def test_math_kernel_broadcasts_leading_dims():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 3, 5, 8, generator=g),
        torch.randn(1, 3, 7, 8, generator=g),
        torch.randn(1, 3, 7, 8, generator=g),
    )
    with attention_kernel("math"):
        torch.testing.assert_close(attention(q, k, v), reference(q, k, v, None), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            attention(k[:, :, :5], q, q), reference(k[:, :, :5], q, q, None), atol=1e-5, rtol=1e-5
        )
