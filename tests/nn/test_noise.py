import pytest
import torch

from t2i.diffusion import Seeds, randn_like


def test_seeds_are_per_sample_and_deterministic():
    a = Seeds([3, 4, 5]).randn((3, 2, 4))
    b = Seeds([5]).randn((1, 2, 4))
    torch.testing.assert_close(a[2:], b)
    torch.testing.assert_close(Seeds([3, 4, 5]).randn((3, 2, 4)), a)
    assert not torch.allclose(a[0], a[1])
    assert Seeds.from_base(7, 3).seeds == [7, 8, 9]


def test_streams_continue_per_sample():
    s4, s1 = Seeds([1, 2, 3, 4]), Seeds([3])
    for _ in range(3):
        torch.testing.assert_close(s4.randn((4, 5))[2:3], s1.randn((1, 5)))


def test_randn_like_sources_and_errors():
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert randn_like(x, Seeds([1, 2])).dtype == torch.float64
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(randn_like(x, g1), randn_like(x, g2))
    assert randn_like(x).shape == (2, 3)
    with pytest.raises(ValueError, match="batch of 3"):
        Seeds([1, 2]).randn((3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        Seeds([-1])
