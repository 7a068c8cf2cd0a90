"""Configs: YAML + dotted overrides, typed validation, unknown keys named with the nearest valid one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from t2i.cli.main import main
from t2i.train.config import TrainConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = sorted((ROOT / "configs" / "tiny").glob("*.yaml"))
RECIPES = sorted([*(ROOT / "configs" / "default").glob("*.yaml"), *(ROOT / "configs" / "experiments").glob("*.yaml")])


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "run.steps=7", "ema.half_life=null"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 3e-4 as a string
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.run.steps == 7 and cfg.ema.half_life is None


def test_nested_params_override(tmp_path):
    cfg = load_config(TINY[0], ["model.params.width=8", "task.params.guidance=3"])
    assert cfg.model.params["width"] == 8 and cfg.task.params["guidance"] == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        ("emma.decay=0.9", "unknown config key 'emma'; did you mean 'ema'"),
        ("run.step=3", "did you mean 'run.steps'"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("run.steps=1.5", "run.steps must be an integer"),
        ("run.precision=fp8", "run.precision must be one of fp32, bf16, fp16"),
        ("optim.betas=[0.9]", "optim.betas must be a list of 2 values"),
        ("optim.lr", "must look like section.key=value"),
        ("lr=3", "must be dotted"),
        ("optim.grad_accum=3", "divisible by optim.grad_accum"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.lr=inf", "optim.lr must be a finite number"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
        (f"optim.lr={10**400}", "optim.lr is too large to be a number (1329 bits)"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.eps=0", "optim.eps must be positive"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must each lie in [0, 1)"),
        ("run.ckpt_every=-1", "run.ckpt_every must be >= 0 (0: a checkpoint at the end only)"),
        ("run.sample_every=-5", "run.sample_every must be >= 0"),
        ("run.log_every=-1", "run.log_every must be >= 0"),
        ("data.batch_size=1000000000000", "data.batch_size=1000000000000 is beyond any machine"),
        ("data.image_size=0", "data.image_size must be at least 1 px"),
        (f"run.seed={2**70}", "run.seed must lie in [0, 2**63)"),
        ("run.seed=-1", "run.seed must lie in [0, 2**63)"),
        ("optim.lr=[1", "the value is not valid YAML"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_unknown_model_and_task_params_are_rejected(tmp_path):
    from t2i.models import model_config
    from t2i.train.tasks import build_task

    with pytest.raises(ValueError, match=r"'model.params.widht'.*did you mean 'model.params.width'"):
        model_config("toy_unet", {"widht": 8})
    with pytest.raises(ValueError, match="unknown model 'toy_unt'; did you mean 'toy_unet'"):
        model_config("toy_unt", {})
    cfg = load_config(None, ["task.params.sampler_name=euler"])
    with pytest.raises(ValueError, match=r"task.params.sampler_name'; did you mean 'task.params.sampler'"):
        build_task(cfg)


def test_missing_file_says_where_configs_live():
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config("nope.yaml")


def test_unreadable_config_files_get_one_line_errors(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  steps: [1, 2\n")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    for path, message in ((bad_yaml, "is not valid YAML at line"), (binary, "is not a text file"),
                          (tmp_path, "is a folder, not a config file"), (listing, "must hold a mapping")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_config(path)
        assert main(["train", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message.split(" at ")[0] in err and "Traceback" not in err


@pytest.mark.parametrize("path", TINY + RECIPES, ids=[p.stem for p in TINY + RECIPES])
def test_shipped_configs_resolve_and_roundtrip(path):
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["train", str(TINY[0]), "optim.lr=5e-4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0005" in out and "optim:" in out
    assert "groups: 8" in out and "vp_schedule: cosine" in out  # model and task defaults are spelled out


def test_cli_dry_run_validates_model_params(capsys):
    assert main(["train", str(TINY[0]), "model.params.widht=8", "--dry-run"]) == 2
    assert "did you mean 'model.params.width'" in capsys.readouterr().err


def test_cli_reports_unknown_key(capsys):
    assert main(["train", str(TINY[0]), "optim.wieght_decay=0.1", "--dry-run"]) == 2
    assert "did you mean 'optim.weight_decay'" in capsys.readouterr().err


def test_cli_rejects_two_resume_sources(capsys, tmp_path):
    args = ["train", str(TINY[0]), f"run.out_dir={tmp_path}", "--resume", "--resume-from", str(tmp_path)]
    assert main(args) == 2
    assert "either --resume" in capsys.readouterr().err


def test_the_default_recipe_chain_names_runs_it_makes():
    """Every `runs/...` a recipe of `make train-defaults` reads (a later stage's `init_from`, a teacher, a frozen
    component) is the run of a recipe it ran earlier, and a checkpoint it names is that recipe's last step: a renamed
    run, a reordered Makefile or a changed step count would otherwise surface hours into the chain."""
    makefile = (ROOT / "Makefile").read_text()
    chain = re.findall(r"t2i train (configs/\S+\.yaml)", makefile.split("train-defaults:")[1].split("\n\n")[0])
    assert "configs/default/sd3.yaml" in chain and len(chain) >= 8, chain
    steps = {}  # run name -> last step, in the order `make train-defaults` runs them
    for config in chain:
        path = ROOT / config
        for ref in re.findall(r"runs/[\w./-]+", path.read_text()):
            parts = Path(ref).parts
            assert parts[1] in steps, f"{config} reads {ref}, which no earlier recipe of `make train-defaults` writes"
            if len(parts) > 3 and parts[2] == "checkpoints":
                assert parts[3] == f"step_{steps[parts[1]]:08d}", f"{config}: {ref} is not {parts[1]}'s last step"
        run = load_config(path, []).run
        steps[run.name] = run.steps
    # a stage that continues another with --resume-from (the turbo's last) starts from that run's last checkpoint
    for run_name, step in re.findall(r"--resume-from runs/(\w+)/checkpoints/step_(\d+)", makefile):
        assert steps.get(run_name) == int(step), f"the Makefile resumes from {run_name} step {step}, not its last"
