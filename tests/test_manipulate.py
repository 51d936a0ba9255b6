import math

import torch

from unclip_lite.manipulate import slerp, slerp_flat


def test_slerp_endpoints_norm_and_constant_speed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    omega = math.acos(float(a @ b))
    for theta in (0.1, 0.25, 0.5, 0.9):
        m = slerp(a, b, theta)
        assert abs(float(m.norm()) - 1) < 1e-5  # stays on the sphere
        assert abs(math.acos(float(m @ a).__round__(7)) - theta * omega) < 1e-4  # constant angular speed
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel inputs: no division by zero


def test_slerp_keeps_the_scale_of_gaussian_noise():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 1, 3, 32, 32, generator=g)
    mid = slerp_flat(x, y, 0.5)
    lin = (x + y) / 2
    assert abs(float(mid.std()) - 1) < 0.05 and float(lin.std()) < 0.8  # a linear mix shrinks noise, slerp does not
    assert mid.shape == x.shape
