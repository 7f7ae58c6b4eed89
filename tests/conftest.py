import pytest

# Shared with benchmarks/gpu.py; test modules import them from here.
from timm_splat.testing import away_from_cutoff, poison_allocator, random_splats  # noqa: F401


@pytest.fixture(scope="session")
def astronaut_64():
    from timm_splat.samples import sample_photos

    return sample_photos(64, names=("astronaut",))["astronaut"]
