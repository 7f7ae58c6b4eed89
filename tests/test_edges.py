"""Library edges that took bad input silently or crashed (issue 21): each is a ValueError that
says what was wrong."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from timm_splat import fit_splats, from_fp16_bytes, load_splats
from timm_splat.data import caption_of, load_prefit
from timm_splat.fitting import FitConfig


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_load_splats_refuses_non_float_files(tmp_path, dtype):
    splats = torch.zeros(3, 8)
    splats[:, 2] = splats[:, 4] = 1
    path = tmp_path / "s.safetensors"
    save_file({"splats": splats.to(dtype)}, str(path))
    with pytest.raises(ValueError, match=rf"splats in {path}.*floating point"):
        load_splats(path)


def test_fp16_bytes_are_checked():
    bad = torch.zeros(2, 8, dtype=torch.float16)
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        from_fp16_bytes(bad.numpy().tobytes())
    with pytest.raises(ValueError, match="num_splats must be a positive int"):
        from_fp16_bytes(bytes(32), num_splats=0)


def test_a_label_beyond_the_class_names_is_an_error():
    assert caption_of(None, 1, ["cat", "dog"]) == "a photo of a dog"
    assert caption_of(None, -1, ["cat", "dog"]) == ""  # prefit's "no label"
    with pytest.raises(ValueError, match="label 7 has no class name"):
        caption_of(None, 7, ["cat", "dog"])


@pytest.mark.parametrize("name", ["init_sigma", "relocate_sigma"])
def test_absurd_sigmas_are_refused(name):
    with pytest.raises(ValueError, match=name):
        FitConfig(**{name: 1e30})


def test_fit_splats_refuses_meta_sparse_and_bogus_devices():
    with pytest.raises(ValueError, match="meta device"):
        fit_splats(torch.empty(3, 8, 8, device="meta"), iterations=1, num_splats=4)
    with pytest.raises(ValueError, match="dense"):
        fit_splats(torch.rand(3, 8, 8).to_sparse(), iterations=1, num_splats=4)
    with pytest.raises(ValueError, match="device 'bogus' is not a torch device"):
        fit_splats(torch.rand(3, 8, 8), iterations=1, num_splats=4, device="bogus")


def _write(folder, name, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / "data" / name)


def _splats(rows, n):
    import pyarrow as pa

    values = np.full((rows, n, 8), 0.1, np.float16)
    return pa.array([list(map(list, r)) for r in values], type=pa.list_(pa.list_(pa.float16(), 8)))


@pytest.mark.parametrize(
    "columns, message",
    [
        (dict(label=["a", "b"]), "column 'label' holds string, not integers"),
        (dict(caption=[1, 2]), "column 'caption' holds int64, not strings"),
    ],
)
def test_prefitted_columns_of_the_wrong_type_are_named(tmp_path, columns, message):
    _write(tmp_path, "validation-00000-00000.parquet", splats=_splats(2, 4), **columns)
    with pytest.raises(ValueError, match=message):
        load_prefit(tmp_path, "validation", cache_dir=str(tmp_path / "cache"))


def test_shards_of_one_split_share_a_layout(tmp_path):
    from datasets import Array2D, Dataset, Features, Value

    _write(tmp_path, "validation-00000-00001.parquet", splats=_splats(2, 64), label=[0, 1])
    features = Features({"splats": Array2D((32, 8), "float16"), "label": Value("int64")})
    Dataset.from_dict(
        {"splats": np.zeros((2, 32, 8), np.float16), "label": [0, 1]}, features=features
    ).to_parquet(str(tmp_path / "data" / "validation-00000-00000.parquet"))
    with pytest.raises(ValueError, match="one split's shards must share a layout"):
        load_prefit(tmp_path, "validation", cache_dir=str(tmp_path / "cache"))
