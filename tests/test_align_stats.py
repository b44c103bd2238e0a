"""Streaming statistics equal the statistics of all activations at once."""
import numpy as np
import torch

from dimat.align import CrossStats


def test_streaming_correlation_matches_numpy_over_all_samples():
    g = torch.Generator().manual_seed(0)
    # conv-shaped activations with a large common offset (cancellation-prone) and unequal batches
    batches_a = [torch.randn(n, 6, 5, generator=g) * 0.1 + 50 for n in (7, 3, 11)]
    mix = torch.randn(6, 6, generator=g)
    batches_b = [torch.einsum("ncl,cd->ndl", a, mix) + torch.randn(a.shape, generator=g) * 0.01 for a in batches_a]
    s = CrossStats(6)
    for a, b in zip(batches_a, batches_b):
        s.update(a, b)
    a_all = torch.cat(batches_a).transpose(0, 1).reshape(6, -1).double().numpy()
    b_all = torch.cat(batches_b).transpose(0, 1).reshape(6, -1).double().numpy()
    expected = np.corrcoef(a_all, b_all)[:6, 6:]
    assert s.n == a_all.shape[1]
    np.testing.assert_allclose(s.mean_a.numpy(), a_all.mean(1), rtol=1e-6)
    np.testing.assert_allclose(s.correlation().numpy(), expected, atol=1e-4)


def test_dead_units_correlate_zero_not_nan():
    s = CrossStats(3)
    a = torch.randn(20, 3)
    a[:, 1] = 0.0
    s.update(a, a.clone())
    corr = s.correlation()
    assert torch.isfinite(corr).all()
    assert corr[1].abs().max() == 0 and corr[:, 1].abs().max() == 0
    assert torch.allclose(corr[0, 0], torch.tensor(1.0, dtype=torch.float64))
