"""The backward formulas of docs/kernel-math.md, written out in float64 with the maps
materialised, against torch.autograd through diff_attention_ref."""
import torch

from diffattn import diff_attention_ref
from diffattn.reference import differential_maps


def test_documented_backward_equals_autograd():
    torch.manual_seed(0)
    B, N, M, H, d, eps, c = 2, 5, 7, 2, 4, 1e-5, 0.7
    q = torch.randn(B, N, 2 * H, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, M, 2 * H, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, M, H, 2 * d, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(2 * d, dtype=torch.float64)).requires_grad_(True)
    dY = torch.randn(B, N, H, 2 * d, dtype=torch.float64)
    out = diff_attention_ref(q, k, v, lam, norm_weight=w, eps=eps, out_scale=c)
    out.backward(dY)

    with torch.no_grad():
        s = d ** -0.5
        P1, P2, _ = differential_maps(q, k, lambda_=lam)                  # (B, H, N, M)
        Vh = v.transpose(1, 2)                                            # (B, H, M, 2d)
        O1, O2 = P1 @ Vh, P2 @ Vh
        L = lam[None, :, None, None]
        X = O1 - L * O2
        r = (X.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        dYh = dY.transpose(1, 2)
        # 1. through the epilogue
        G = c * dYh * w
        dX = r * G - X * r ** 3 * (G * X).mean(-1, keepdim=True)
        dw = (c * dYh * X * r).sum((0, 1, 2))
        # 2. through the difference
        dlam = -(dX * O2).sum((0, 2, 3))
        # 3. through the softmaxes, with the shared products
        dP1 = dX @ Vh.transpose(-1, -2)
        dP2 = -L * dP1
        D1 = (dX * X).sum(-1, keepdim=True) + L * (dX * O2).sum(-1, keepdim=True)
        D2 = -L * (dX * O2).sum(-1, keepdim=True)
        dS1, dS2 = P1 * (dP1 - D1), P2 * (dP2 - D2)
        q1, q2 = q[:, :, 0::2].transpose(1, 2), q[:, :, 1::2].transpose(1, 2)
        k1, k2 = k[:, :, 0::2].transpose(1, 2), k[:, :, 1::2].transpose(1, 2)
        dq = torch.stack([s * dS1 @ k1, s * dS2 @ k2], dim=3)              # (B, H, N, 2, d)
        dk = torch.stack([s * dS1.transpose(-1, -2) @ q1, s * dS2.transpose(-1, -2) @ q2], 3)
        dv = (P1 - L * P2).transpose(-1, -2) @ dX

    torch.testing.assert_close(dq.transpose(1, 2).flatten(2, 3), q.grad)
    torch.testing.assert_close(dk.transpose(1, 2).flatten(2, 3), k.grad)
    torch.testing.assert_close(dv.transpose(1, 2), v.grad)
    torch.testing.assert_close(dlam, lam.grad)
    torch.testing.assert_close(dw, w.grad)
