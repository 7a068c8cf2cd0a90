import subprocess
import sys

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
