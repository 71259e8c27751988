import numpy as np


def test_forward_roundtrip(client, name):
    bn = client.batch_norm_2d(name, 3)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    y = bn(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-6)
