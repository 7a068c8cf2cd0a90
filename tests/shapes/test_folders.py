"""The folder format and the ground-truth writers: folders, reproducible tar shards, prompts-only folders."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from t2i.data.dataset import ShapesDataset
from t2i.shapes.captions import split_prompts
from t2i.shapes.folders import write_folder, write_prompts, write_shards


def test_write_folder_and_shards(tmp_path):
    folder = write_folder(tmp_path / "f", "train", 32, n=5, seed=2)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == [f"{i:06d}.png" for i in range(5)]
    ds = ShapesDataset("train", 32, seed=2)
    for i, rec in enumerate(lines):
        assert np.array_equal(np.asarray(Image.open(folder / rec["file"])), ds.sample(i).image)
        assert (folder / f"{i:06d}.txt").read_text().strip() == rec["caption"] == ds.prompt(i).caption
        assert json.loads((folder / f"{i:06d}.json").read_text()) == rec

    shards = write_shards(tmp_path / "s", "train", 32, n=5, seed=2, shard_size=2)
    assert [p.name for p in shards] == [f"shapes-train-{i:06d}.tar" for i in range(3)]
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names == ["000002.png", "000002.txt", "000002.json", "000003.png", "000003.txt", "000003.json"]
        png = tar.extractfile("000003.png").read()
        meta = json.loads(tar.extractfile("000003.json").read())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), ds.sample(3).image)
    assert meta["caption"] == ds.prompt(3).caption
    # reproducible bytes
    again = write_shards(tmp_path / "s2", "train", 32, n=5, seed=2, shard_size=2)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shards, again, strict=True))
    with pytest.raises(ValueError, match="pass n"):
        write_folder(tmp_path / "x", "train")


def test_write_prompts_lists_every_prompt(tmp_path):
    path = write_prompts(tmp_path, "heldout", per_prompt=2)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 * len(split_prompts("heldout"))
    assert lines[3]["file"] == "000003.png" and lines[3]["caption"] == split_prompts("heldout")[1].caption
