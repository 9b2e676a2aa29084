"""Command-line failures: one line naming what is wrong, the right exit code, no secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator import demo
from coordinator.cli import build_parser, config_from_args, main
from coordinator.errors import ConfigError

SECRET = "s3cretpw"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KIKI_REDIS_URL", "KIKI_CONFIG", "KIKI_REDIS_PASSWORD", "KIKI_PREFIX"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [f":{SECRET}@127.0.0.1:6379", f"redis://:{SECRET}@h:99999",
                                 f"redis://u:{SECRET}@[::1:6379", f"u:{SECRET}@h:1:2"])
def test_bad_redis_url_flag_is_masked_and_exits_2(capsys: pytest.CaptureFixture[str],
                                                  url: str) -> None:
    code, output = run(capsys, "status", "--redis-url", url)
    assert code == 2, output
    assert SECRET not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "coordinator status: error: overrides.redis_url:"), output


def test_bad_redis_url_environment_is_masked(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIKI_REDIS_URL", f"redis://:{SECRET}@h:99999")
    code, output = run(capsys, "agents")
    assert code == 2 and SECRET not in output
    assert output.startswith("coordinator agents: error: KIKI_REDIS_URL:"), output


def test_node_reads_the_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIKI_REDIS_URL", f"redis://:{SECRET}@10.1.2.3:6390/0")
    args = build_parser().parse_args(["node", "--agent", "agents.echo:echo"])
    assert config_from_args(args).redis.url == f"redis://:{SECRET}@10.1.2.3:6390/0"


def test_demo_passes_the_url_in_the_environment_not_argv(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[dict[str, Any]] = []

    class FakePopen:
        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            started.append({"cmd": cmd, **kwargs})

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    url = f"redis://:{SECRET}@127.0.0.1:6379"
    demo.NodeProcesses(url, "demo-x", tmp_path).start("demo-node-1")
    (call,) = started
    assert not any(SECRET in part for part in call["cmd"])
    assert "--redis-url" not in call["cmd"]
    assert call["env"]["KIKI_REDIS_URL"] == url


@pytest.mark.anyio
async def test_demo_prints_the_url_masked(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: demo.NodeProcesses, node_id: str) -> None:
        raise RuntimeError("not starting nodes in this test")

    monkeypatch.setattr(demo.NodeProcesses, "start", refuse)
    with pytest.raises(RuntimeError, match="not starting"):
        await demo.run_demo(f"redis://:{SECRET}@127.0.0.1:1/0", 10)
    output = capsys.readouterr().out
    assert "redis: redis://:***@127.0.0.1:1/0" in output and SECRET not in output


# -- log level and errors from task groups --------------------------------------------------


def test_unknown_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "FOO", "status"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "argument --log-level: invalid choice: 'FOO'" in err


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "Warning", "DEBUG"])
def test_log_levels_are_case_insensitive(level: str) -> None:
    assert build_parser().parse_args(["--log-level", level, "status"]).log_level \
        == level.upper()


def _failing_status(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from coordinator import commands

    async def status(args: Any) -> int:
        raise exc

    monkeypatch.setattr(commands, "status", status)


@pytest.mark.parametrize("exc", [
    ExceptionGroup("unhandled errors in a TaskGroup", [ConfigError("delivery.x: bad")]),
    BaseExceptionGroup("outer", [ExceptionGroup("inner", [ConfigError("delivery.x: bad")])]),
    ConfigError("delivery.x: bad"),
])
def test_coordinator_error_in_a_group_is_one_line_exit_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        exc: BaseException) -> None:
    _failing_status(monkeypatch, exc)
    code, output = run(capsys, "status")
    assert code == 2
    assert output == "coordinator status: error: delivery.x: bad\n"


@pytest.mark.parametrize("level", ["INFO", "ERROR"])
def test_other_error_in_a_group_is_one_line_fatal(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    _failing_status(monkeypatch, ExceptionGroup("unhandled errors in a TaskGroup",
                                                [OSError("disk on fire")]))
    code, output = run(capsys, "--log-level", level, "status")
    assert code == 1
    assert output == "coordinator status: fatal: OSError: disk on fire\n"


def test_fatal_traceback_only_when_debugging(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    _failing_status(monkeypatch, ExceptionGroup("g", [OSError("disk on fire")]))
    with caplog.at_level("DEBUG", logger="coordinator"):
        code, output = run(capsys, "--log-level", "debug", "status")
    assert code == 1 and "fatal: OSError: disk on fire" in output
    assert any(record.exc_info for record in caplog.records)


def test_several_errors_in_a_group_give_one_line(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_status(monkeypatch, ExceptionGroup("g", [ConfigError("a: bad"),
                                                      RuntimeError("boom\nsecond line")]))
    code, output = run(capsys, "status")
    assert code == 1
    assert output == "coordinator status: fatal: RuntimeError: boom second line (and 1 more)\n"


def test_interrupt_in_a_group_exits_130(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_status(monkeypatch, BaseExceptionGroup("g", [KeyboardInterrupt()]))
    assert run(capsys, "status") == (130, "")


def test_log_level_subprocess_has_no_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "coordinator", "--log-level", "FOO", "status"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("coordinator: error: argument")


# -- send --timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "nan", "inf", "soon"])
def test_send_timeout_must_be_positive(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["send", "echo", "{}", "--wait", f"--timeout={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --timeout: expected a number of seconds > 0, got {value!r}" in err
    assert "Traceback" not in err


def test_send_timeout_accepts_positive_seconds() -> None:
    args = build_parser().parse_args(["send", "echo", "{}", "--wait", "--timeout", "0.25"])
    assert args.timeout == 0.25
    assert build_parser().parse_args(["send", "echo", "{}"]).timeout == 30.0
