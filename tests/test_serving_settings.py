"""Server settings: flags beat RNNSERVE_* variables, which beat the defaults; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.settings import ServerSettings, SettingsError, env_name, parse_settings


def test_defaults() -> None:
    settings = parse_settings([], environ={})
    assert settings == ServerSettings()
    assert (settings.host, settings.port, settings.address) == ("127.0.0.1", 50051, "127.0.0.1:50051")
    assert (settings.session_idle_timeout_s, settings.max_sessions, settings.session_overflow) == (
        600.0,
        100_000,
        "evict",
    )


def test_flags_beat_environment_beat_defaults() -> None:
    environ = {
        "RNNSERVE_MAX_BATCH_SIZE": "8",
        "RNNSERVE_PORT": "6000",
        "RNNSERVE_CLOSE_ON_DISCONNECT": "true",
        "RNNSERVE_PIN": "a=2,b=3",
        "RNNSERVE_REPOSITORY": "/models",
    }
    settings = parse_settings(["--port", "7000", "--max-queue-delay-ms", "0.5"], environ=environ)
    assert settings.port == 7000 and settings.max_batch_size == 8 and settings.max_queue_delay_s == 0.0005
    assert settings.close_on_disconnect is True
    assert settings.pinned_versions == {"a": 2, "b": 3} and settings.repository == Path("/models")
    flagged = parse_settings(["--pin", "c=1", "--no-close-on-disconnect"], environ=environ)
    assert flagged.pinned_versions == {"c": 1} and flagged.close_on_disconnect is False


def test_every_field_has_a_flag_and_a_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--help"], environ={})
    help_text = capsys.readouterr().out
    for name in ServerSettings.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text
        assert env_name(name) in help_text.replace("\n", " ").replace("  ", "")


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-batch-size", "0"], {}, "--max-batch-size must be at least 1"),
        (["--session-overflow", "drop"], {}, "invalid choice"),
        ([], {"RNNSERVE_MAX_SESSIONS": "many"}, "RNNSERVE_MAX_SESSIONS='many' is not valid"),
        ([], {"RNNSERVE_CLOSE_ON_DISCONNECT": "perhaps"}, "expected true/false"),
        (["--pin", "model"], {}, "expected NAME=VERSION"),
        (["--session-idle-timeout-s", "0"], {}, "--session-idle-timeout-s must be > 0"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, environ=environ)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_settings_validate_when_built_directly() -> None:
    with pytest.raises(SettingsError, match=r"--port must be in 0\.\.65535"):
        ServerSettings(port=70000)
