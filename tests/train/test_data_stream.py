"""The resumable, rank-sharded data stream, the data sources by name, and CLI smoke runs of the tiny configs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.cli.main import main
from t2i.train.config import load_config
from t2i.train.data import MicroBatches, StepSampler, build_dataset
from t2i.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _draws(step: int, k: int, world: int, B: int = 8) -> list[int]:
    out = []
    for m in range(k):
        for r in range(world):
            s = StepSampler(20, global_batch=B, grad_accum=k, rank=r, world=world, seed=3)
            out.extend(s.micro_draws(step, m))
    return out


@pytest.mark.parametrize(("k", "world"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
def test_every_split_covers_the_same_global_batch(k, world):
    assert sorted(_draws(5, k, world)) == list(range(40, 48))


def test_epochs_are_permutations_and_resume_needs_only_the_step():
    s = StepSampler(20, global_batch=4, grad_accum=1, rank=0, world=1, seed=1)
    first_epoch = [s.index_of(d) for d in range(20)]
    second_epoch = [s.index_of(d) for d in range(20, 40)]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(20)) and first_epoch != second_epoch
    ds = [{"x": torch.tensor([float(i)])} for i in range(20)]

    class _DS(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return ds[i]

    full = MicroBatches(_DS(), global_batch=4, grad_accum=2, seed=1)
    seq = [next(full) for _ in range(10)]
    resumed = MicroBatches(_DS(), global_batch=4, grad_accum=2, seed=1, start_step=3)
    for a in seq[6:]:
        b = next(resumed)
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["id"], b["id"])


def test_worker_processes_give_the_same_batches():
    ds = build_dataset(load_config(None, ["data.random_flip=true", "data.image_size=8"]).data)
    a = MicroBatches(ds, global_batch=8, grad_accum=2, seed=0, start_step=3, num_workers=0)
    b = MicroBatches(ds, global_batch=8, grad_accum=2, seed=0, start_step=3, num_workers=2)
    for _ in range(4):
        x, y = next(a), next(b)
        assert torch.equal(x["id"], y["id"]) and torch.equal(x["image"], y["image"])  # flips included


def test_uneven_split_is_rejected():
    with pytest.raises(ValueError, match=r"divisible by optim.grad_accum x world size"):
        StepSampler(10, global_batch=6, grad_accum=2, rank=0, world=2, seed=0)


def test_sources_reject_settings_they_would_ignore():
    with pytest.raises(ValueError, match="nothing to crop"):
        build_dataset(load_config(None, ["data.random_crop=true"]).data)
    with pytest.raises(ValueError, match=r"needs data.path"):
        build_dataset(load_config(None, ["data.source=folder"]).data)
    with pytest.raises(ValueError, match=r"unknown data.source 'folders'"):
        build_dataset(load_config(None, ["data.source=folders"]).data)


def test_shapes_source_trains_when_available(tiny_cfg, quiet):
    pytest.importorskip("t2i.data.dataset")
    cfg = tiny_cfg(**{"data.source": "shapes", "data.image_size": 32, "data.num_samples": 32, "run.steps": 1})
    tr = Trainer(cfg, out=quiet)
    batch = next(tr.batches)
    assert batch["image"].shape == (8, 3, 32, 32) and isinstance(batch["caption"][0], str)
    tr.train_step()
    with pytest.raises(ValueError, match="random_flip"):
        build_dataset(load_config(None, ["data.source=shapes", "data.random_flip=true"]).data)


def test_shapes_category_weights_shape_the_train_stream():
    pytest.importorskip("t2i.data.dataset")
    from t2i.shapes.specs import ALL_CATEGORIES

    data = load_config(None, ["data.source=shapes", "data.image_size=32", "data.num_samples=400",
                              "data.shapes_weights={position: 3, colors: 0, text: 0}"]).data  # fmt: skip
    ds = build_dataset(data)
    counts: dict[str, int] = {}
    for i in range(400):
        cat = ds.prompt(i).spec.category
        counts[cat] = counts.get(cat, 0) + 1
    assert "colors" not in counts and "text" not in counts  # weight 0: never drawn
    # position weighs 3 of 7 (single_object, two_objects, counting, color_attribution weigh 1 each): about 171 of 400
    assert 130 < counts["position"] < 215, counts
    all_zero = "{" + ", ".join(f"{c}: 0" for c in ALL_CATEGORIES) + "}"
    for bad, match in (("{positon: 2}", "unknown categories"), ("{position: -1}", ">= 0"), (all_zero, "weight 0")):
        cfg = load_config(None, ["data.source=shapes", f"data.shapes_weights={bad}"]).data
        with pytest.raises(ValueError, match=match):
            build_dataset(cfg)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_folder_and_tar_sources_train(tmp_path, tiny_cfg, quiet):
    from t2i.data.tars import write_shard

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(_png(i))
    for s in range(2):
        write_shard(
            tmp_path / "shards" / f"{s}.tar", [{"__key__": f"{s}{i}", "png": _png(i), "txt": "x"} for i in range(4)]
        )
    for source, path in (("folder", folder), ("tar", tmp_path / "shards")):
        cfg = tiny_cfg(
            **{
                "data.source": source,
                "data.path": str(path),
                "data.random_crop": True,
                "run.steps": 2,
                "run.name": source,
                "model.params.num_classes": 0,
            }
        )
        summary = Trainer(cfg, out=quiet).fit()
        assert summary["steps"] == 2 and np.isfinite(summary["loss"])


def test_embedding_cache_cli_then_vector_training(tmp_path, capsys):
    out = tmp_path / "emb.safetensors"
    cfg = str(ROOT / "configs" / "tiny" / "flow_rf.yaml")
    assert main(["cache-embeddings", cfg, str(out), "data.num_samples=32", "data.random_flip=false"]) == 0
    assert "wrote 32 embeddings" in capsys.readouterr().out
    vec = str(ROOT / "configs" / "tiny" / "mlp_vectors.yaml")
    args = [
        f"data.path={out}",
        f"run.out_dir={tmp_path}",
        "run.steps=3",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    assert main(["train", vec, *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["grid"] is None  # vectors: no image grid


@pytest.mark.parametrize("name", ["flow_rf", "eps_vp", "shapes_flow"])
def test_cli_smoke_tiny_configs(tmp_path, capsys, name):
    if name == "shapes_flow":
        pytest.importorskip("t2i.data.dataset")
    args = [
        f"run.out_dir={tmp_path}",
        "run.steps=3",
        "run.progress=false",
        "run.tensorboard=false",
        "run.sample_steps=2",
    ]
    assert main(["train", str(ROOT / "configs" / "tiny" / f"{name}.yaml"), *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and Path(summary["grid"]).exists()


def test_shapes_relations_limit_the_position_prompts_and_leave_the_rest():
    """``data.shapes_relations`` (a curriculum's first stage) draws only the named relations; other categories and
    the default stream are untouched."""
    from t2i.shapes.detect import detect
    from t2i.shapes.scoring import check
    from t2i.shapes.specs import RELATIONS

    def relations(ds, n=200):
        return [c.relation for i in range(n) for c in ds.prompt(i).spec.include if c.relation]

    base = ["data.source=shapes", "data.image_size=32", "data.num_samples=400", "data.shapes_weights={position: 1}"]
    canonical = build_dataset(load_config(None, [*base, 'data.shapes_relations=["left of", "above"]']).data)
    assert set(relations(canonical)) == {"left of", "above"}
    assert set(relations(build_dataset(load_config(None, base).data))) == set(RELATIONS)
    sample = canonical.sample(0)  # the scene still stands as its caption says
    assert check(sample.prompt.spec, detect(sample.image))
    # every other category draws exactly what it draws without the option (each item has its own generator)
    plain = build_dataset(load_config(None, base[:2]).data)
    mixed = build_dataset(load_config(None, [*base[:2], 'data.shapes_relations=["below"]']).data)
    others = [i for i in range(60) if plain.prompt(i).spec.category != "position"]
    assert others and all(mixed.prompt(i) == plain.prompt(i) for i in others)
    assert {c.relation for i in range(60) for c in mixed.prompt(i).spec.include if c.relation} == {"below"}
    for bad in ('["left"]', "[]"):
        cfg = load_config(None, [*base[:2], f"data.shapes_relations={bad}"]).data
        with pytest.raises(ValueError, match="relations must be a non-empty list"):
            build_dataset(cfg)


def test_shapes_text_layout_from_the_config_and_its_error():
    base = ["data.source=shapes", "data.image_size=64", "data.num_samples=100"]
    ds = build_dataset(load_config(None, [*base, "data.shapes_text_layout=centred"]).data)
    words = [s.scene.text for s in map(ds.sample, range(30)) if s.prompt.spec.category == "text"]
    assert ds.text_layout == "centred" and words and all((t.cx, t.cy) == (0.5, 0.5) for t in words)
    assert build_dataset(load_config(None, base).data).text_layout == "random"
    with pytest.raises(ValueError, match=r"unknown data\.shapes_text_layout 'centered'; did you mean 'centred'"):
        build_dataset(load_config(None, [*base, "data.shapes_text_layout=centered"]).data)
