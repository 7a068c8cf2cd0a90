"""Training data readers: transforms, image+caption folders, webdataset-style tar shards, embedding caches."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.embeddings import EmbeddingDataset, cache_embeddings, pixel_encoder
from t2i.data.folders import ImageCaptionFolder
from t2i.data.tars import TarShards, expand_shards, write_shard
from t2i.data.toy import ToyBlobs
from t2i.data.transforms import ImageTransform, crop, decode_image, resize_short_side
from t2i.io.png import to_pil


def _png(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_and_back_is_lossless():
    data = _png(5, 7)
    x = decode_image(data)
    assert x.shape == (3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x, value_range=(-1.0, 1.0))), np.asarray(Image.open(io.BytesIO(data))))


def test_resize_crop_flip():
    x = torch.arange(2 * 6 * 10, dtype=torch.float32).reshape(2, 6, 10)
    assert resize_short_side(x, 3).shape == (2, 3, 5)
    assert torch.equal(crop(x, 4, random=False), x[:, 1:5, 3:7])
    crops = {
        tuple(crop(x, 4, random=True, generator=torch.Generator().manual_seed(s))[0, 0, :1].tolist())
        for s in range(30)
    }
    assert len(crops) > 3  # random crops move
    flip = ImageTransform(6, random_flip=True)
    outs = [flip(x[:, :, :6], torch.Generator().manual_seed(s)) for s in range(20)]
    assert any(torch.equal(o, x[:, :, :6].flip(-1)) for o in outs) and any(torch.equal(o, x[:, :, :6]) for o in outs)
    # the same generator seed gives the same augmentation (what exact resume relies on)
    a = ImageTransform(4, random_crop=True, random_flip=True)
    assert torch.equal(a(x, torch.Generator().manual_seed(3)), a(x, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="resize it first"):
        crop(x, 7, random=False)


def test_image_caption_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png(8, 12, 1))
    (tmp_path / "a.txt").write_text("a caption from txt\n")
    (tmp_path / "sub" / "b.png").write_bytes(_png(10, 10, 2))
    (tmp_path / "c.png").write_bytes(_png(9, 9, 3))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "sub/b.png", "caption": "from metadata", "label": 2}))
    ds = ImageCaptionFolder(tmp_path, size=8)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it["caption"] for it in items] == ["a caption from txt", "", "from metadata"]  # sorted: a, c, sub/b
    assert items[2]["label"] == 2 and "label" not in items[0]
    assert all(it["image"].shape == (3, 8, 8) for it in items)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageCaptionFolder(tmp_path / "empty", size=8)


def _write_shards(tmp_path, n_shards=3, per_shard=4):
    paths = []
    for s in range(n_shards):
        samples = [
            {"__key__": f"{s:02d}{i:04d}", "png": _png(8, 8, s * 100 + i), "txt": f"shard {s} item {i}", "cls": str(i)}
            for i in range(per_shard)
        ]
        paths.append(write_shard(tmp_path / f"train-{s:06d}.tar", samples))
    return paths


def test_tar_shards_stream_group_and_decode(tmp_path):
    _write_shards(tmp_path)
    assert len(expand_shards(str(tmp_path))) == 3
    assert expand_shards(str(tmp_path / "train-{000000..000001}.tar")) == [
        str(tmp_path / "train-000000.tar"),
        str(tmp_path / "train-000001.tar"),
    ]
    ds = TarShards(str(tmp_path / "*.tar"), size=8, shuffle_shards=False)
    it = ds.iter_from()
    first = [next(it) for _ in range(12)]
    assert [f["caption"] for f in first[:2]] == ["shard 0 item 0", "shard 0 item 1"]
    assert first[5]["label"] == 1 and first[0]["image"].shape == (3, 8, 8)
    assert next(it)["caption"] == "shard 0 item 0"  # endless: the next epoch starts over


def test_tar_shards_split_by_rank_and_resume_by_skipping(tmp_path):
    _write_shards(tmp_path, n_shards=4, per_shard=3)
    ds = TarShards(str(tmp_path), size=8, seed=5, random_flip=True)
    r0 = ds.iter_from(rank=0, world=2)
    r1 = ds.iter_from(rank=1, world=2)
    caps0 = [next(r0)["caption"] for _ in range(6)]
    caps1 = [next(r1)["caption"] for _ in range(6)]
    assert not set(caps0) & set(caps1)  # ranks read disjoint shards
    assert len(set(caps0) | set(caps1)) == 12
    full = ds.iter_from(rank=0, world=2)
    seq = [next(full) for _ in range(10)]
    resumed = ds.iter_from(rank=0, world=2, skip=7)
    for a in seq[7:]:
        b = next(resumed)
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])  # same augmentation too
    with pytest.raises(ValueError, match="cannot be split over 8"):
        next(ds.iter_from(rank=0, world=8))


def test_tar_shards_through_fsspec_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    local = _write_shards(tmp_path, n_shards=1, per_shard=2)[0]
    with fsspec.open("memory://t2i-test/train-0.tar", "wb") as f:  # a non-local filesystem, read through fsspec
        f.write(local.read_bytes())
    ds = TarShards("memory://t2i-test/train-0.tar", size=8)
    assert [next(iter(ds))["caption"]] == ["shard 0 item 0"]
    assert next(iter(TarShards(f"file://{local}", size=8)))["caption"] == "shard 0 item 0"


def test_cache_embeddings_roundtrip(tmp_path):
    ds = ToyBlobs(num_samples=10, size=8, num_classes=3)
    n = cache_embeddings(ds, tmp_path / "e.safetensors", batch_size=4)
    assert n == 10
    emb = EmbeddingDataset(tmp_path / "e.safetensors")
    assert len(emb) == 10 and emb.encoder == "pixels"
    item = emb[4]
    torch.testing.assert_close(item["embedding"], pixel_encoder(ds[4]["image"][None])[0])
    assert item["label"] == 4 % 3 and item["caption"] == ds[4]["caption"]
    with pytest.raises(ValueError, match="unknown encoder"):
        cache_embeddings(ds, tmp_path / "x.safetensors", encoder="clip-huge")
    with pytest.raises(ValueError, match="endless"):
        cache_embeddings(TarShards(str(_write_shards(tmp_path / "s", 1, 2)[0]), size=8), tmp_path / "y.safetensors")
