"""Every loader of outside data, fed random and mutated bytes: it returns something valid or
raises a clear ValueError (FileNotFoundError for a missing dataset), never another exception."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from timm_splat.data import collate_prefit, load_prefit
from timm_splat.images import to_rgb_tensors
from timm_splat.splats import check_splats, from_fp16_bytes, load_splats, save_splats

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with some bytes overwritten and maybe cut short."""
    buffer = bytearray(data)
    for position, value in flips:
        if buffer:
            buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut is not None else buffer)


FLIPS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)
CUTS = st.one_of(st.none(), st.integers(0, 4096))


def png_bytes() -> bytes:
    array = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


PNG = png_bytes()


@FUZZ
@given(flips=FLIPS, cut=CUTS)
def test_images_from_mutated_files(flips, cut):
    data = mutate(PNG, flips, cut)
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return  # PIL refuses to open it: nothing of ours ran
    try:
        (pixels,) = to_rgb_tensors(image)
    except ValueError:
        return
    assert pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1


@FUZZ
@given(data=st.binary(max_size=400))
def test_fp16_bytes(data):
    try:
        splats = from_fp16_bytes(data)
    except ValueError:
        return
    assert splats.shape == (len(data) // 16, 8)


@FUZZ
@given(flips=FLIPS, cut=CUTS)
def test_splat_files(tmp_path, flips, cut):
    good = torch.tensor([[0.5, 0.5, 0.1, 0.0, 0.1, 0.2, 0.3, 0.4]] * 3)
    save_splats(tmp_path / "good.safetensors", good, psnr=30)
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(mutate((tmp_path / "good.safetensors").read_bytes(), flips, cut))
    try:
        splats, _ = load_splats(path)
    except ValueError:
        return
    check_splats(splats)  # what loads is valid


@FUZZ
@given(
    values=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=8, max_size=64
    ),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.int32]),
)
def test_prefit_rows(values, dtype):
    rows = torch.tensor(values[: len(values) // 8 * 8]).view(-1, 8)
    if dtype is torch.int32:
        rows = rows.nan_to_num(0, 0, 0).clamp(-1e6, 1e6)
    row = {"splats": rows.to(dtype), "label": 0, "source_id": "fuzz"}
    try:
        splats, labels = collate_prefit([row, row])
    except ValueError:
        return
    check_splats(splats)
    assert splats.dtype == torch.float32 and labels.tolist() == [0, 0]


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    from datasets import Dataset

    from timm_splat.data import prefit_features

    splats = torch.zeros(3, 4, 8)
    splats[..., :2], splats[..., 2], splats[..., 4], splats[..., 5:] = 0.5, 0.1, 0.1, 0.3
    folder = tmp_path_factory.mktemp("shard")
    Dataset.from_dict(
        {
            "splats": splats.half().numpy(),
            "label": [0, 1, 2],
            "caption": ["a", "b", None],
            "source_id": ["0", "1", "2"],
            "psnr": [30.0] * 3,
        },
        features=prefit_features(4),
    ).to_parquet(str(folder / "shard.parquet"))
    return (folder / "shard.parquet").read_bytes()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=FLIPS, cut=CUTS)
def test_mutated_shards(tmp_path_factory, shard_bytes, flips, cut):
    folder = tmp_path_factory.mktemp("mutated")
    (folder / "data").mkdir()
    (folder / "data" / "validation-00000-00000.parquet").write_bytes(
        mutate(shard_bytes, flips, cut)
    )
    try:
        rows = load_prefit(folder, "validation", cache_dir=str(folder / "cache"))
        batch = collate_prefit([rows[i] for i in range(len(rows))], target="label")
    except ValueError:
        return
    check_splats(batch[0])


def test_a_shard_with_damaged_features_metadata(tmp_path, shard_bytes):
    # Hypothesis found it: a flipped byte left the datasets features JSON well-formed but one
    # feature a bare string, and datasets raised AttributeError while parsing it.
    import json

    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    good = tmp_path / "good.parquet"
    good.write_bytes(shard_bytes)
    table = pq.read_table(good)
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"]["label"] = "int64"
    table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    pq.write_table(table, tmp_path / "data" / "validation-00000-00000.parquet")
    with pytest.raises(ValueError, match="unreadable features"):
        load_prefit(tmp_path, "validation", cache_dir=str(tmp_path / "cache"))
