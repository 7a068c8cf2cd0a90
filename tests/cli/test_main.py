import subprocess
import sys

import pytest

from t2i.cli.main import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "info" in out


def test_console_script_help_runs_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.main", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: t2i" in proc.stdout


def test_info_lists_every_sampler(capsys):
    from t2i.diffusion import SAMPLERS

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SAMPLERS)


def test_train_takes_overrides_after_a_flag(capsys):
    # argparse alone rejects `CONFIG --dry-run key=value` ("unrecognized arguments"); both orders must resolve alike
    cfg = "configs/tiny/flow_rf.yaml"
    assert main(["train", cfg, "run.steps=7", "--dry-run"]) == 0
    before = capsys.readouterr().out
    assert main(["train", cfg, "--dry-run", "run.steps=7"]) == 0
    after = capsys.readouterr().out
    assert "steps: 7" in after and after == before


def test_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "configs/tiny/flow_rf.yaml", "--no-such-flag"])
    assert err.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
