"""``t2i serve``: its flags become the server's config, and bad flags fail in one line before anything loads."""

from __future__ import annotations

import pytest

from t2i.cli.main import build_parser, main
from t2i.cli.serve import _is_loopback, config_from_args


def parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_flags_become_the_config(monkeypatch):
    monkeypatch.setenv("T2I_API_KEY", "env1, env2")
    cfg = config_from_args(parse("--model", "a", "--model", "b", "--allow-model", "c", "--api-key", "k",
                                 "--max-batch", "4", "--max-n", "2", "--no-batching", "--timeout", "9",
                                 "--public-url", "https://x.org/t2i", "--url-ttl", "60"))  # fmt: skip
    assert cfg.models == ["a", "b"] and cfg.allow_models == ["c"] and cfg.api_keys == ["k", "env1", "env2"]
    assert cfg.max_batch == 4 and cfg.limits.max_n == 2 and not cfg.batching and cfg.request_timeout_s == 9
    assert cfg.public_url == "https://x.org/t2i" and cfg.url_ttl_s == 60
    monkeypatch.delenv("T2I_API_KEY")
    default = config_from_args(parse())
    assert default.models == ["sd3-shapes"] and default.api_keys == [] and default.batching


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--port", "70000"], "--port must be 1-65535"),
        (["--model", "no/such/model"], "unknown model 'no/such/model'"),
        (["--allow-model", "no/such/other"], "unknown model 'no/such/other'"),
        (["--api-key", ""], "--api-key is empty"),
        (["--url-ttl", "0"], "--url-ttl must be > 0"),
        (["--public-url", "ftp://x"], "--public-url must be an http(s) URL"),
        (["--api-key", "  "], "--api-key is empty"),
    ],
)
def test_bad_flags_fail_in_one_line(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_loopback_detection():
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("example.org")


def test_missing_serve_extra_is_one_line(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an install without the serve extra looks like
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "needs the serve extra (fastapi is missing): pip install -e '.[serve]'" in err and "Traceback" not in err
