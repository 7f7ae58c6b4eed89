import pytest
import torch


def random_splats(batch, n, dtype=torch.float64, seed=0, padding=3):
    """Random splats that include the awkward cases: off the image, very thin, very large,
    strongly sheared, and zero padding rows at the end."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(batch, n, 8, dtype=dtype)
    s[..., 0:2] = torch.rand(batch, n, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    s[..., 2] = torch.rand(batch, n, generator=g, dtype=dtype) * 0.12 + 0.004
    s[..., 3] = torch.randn(batch, n, generator=g, dtype=dtype) * 0.05
    s[..., 4] = torch.rand(batch, n, generator=g, dtype=dtype) * 0.12 + 0.004
    s[..., 5:] = torch.randn(batch, n, 3, generator=g, dtype=dtype)
    s[:, 0, 2:5] = torch.tensor([0.002, 0.0, 0.3], dtype=dtype)  # very thin and long
    s[:, 1, 2:5] = torch.tensor([2.0, 0.5, 1.5], dtype=dtype)  # far larger than the image
    s[:, 2, 0:2] = torch.tensor([1.5, -0.8], dtype=dtype)  # entirely off the image
    s[:, 3, 2:5] = torch.tensor([0.05, 0.2, 0.01], dtype=dtype)  # strongly sheared
    if padding:
        s[:, -padding:] = 0
    return s


@pytest.fixture(scope="session")
def astronaut_64():
    from timm_splat.samples import sample_photos

    return sample_photos(64, names=("astronaut",))["astronaut"]
