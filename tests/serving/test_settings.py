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


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls_key": Path("k.pem")}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": Path("ca.pem")}, "--tls-client-ca needs --tls-cert"),
        ({"snapshot_interval_s": 5.0}, "--snapshot-interval-s needs --state-snapshot"),
        ({"health_port": 50051}, "--health-port must differ from --port"),
        ({"metrics_port": 50051}, "--metrics-port 50051 is already the gRPC or health port"),
        ({"reload_interval_s": -1.0}, "--reload-interval-s must be a finite number >= 0"),
        ({"max_sessions_per_token": -1}, "--max-sessions-per-token must be >= 0"),
    ],
)
def test_operations_settings_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ServerSettings(**changes)  # type: ignore[arg-type]


def test_secret_settings_come_from_the_environment_only(capsys: pytest.CaptureFixture[str]) -> None:
    """A flag's value shows in the process list, so bearer tokens have a variable and no flag."""
    settings = parse_settings([], environ={"RNNSERVE_AUTH_TOKENS": "ci:0123456789abcdef0123"})
    assert settings.auth and settings.auth_tokens == "ci:0123456789abcdef0123"
    assert "0123456789abcdef" not in repr(settings)
    with pytest.raises(SystemExit):
        parse_settings(["--auth-tokens", "x"], environ={})
    assert "unrecognized arguments: --auth-tokens" in capsys.readouterr().err


def test_optional_files_from_the_environment() -> None:
    assert parse_settings([], environ={"RNNSERVE_STATE_SNAPSHOT": "/state/s"}).state_snapshot == Path(
        "/state/s"
    )
    assert parse_settings([], environ={"RNNSERVE_STATE_SNAPSHOT": ""}).state_snapshot is None
    flagged = parse_settings(["--tls-cert", "c.pem", "--tls-key", "k.pem"], environ={})
    assert flagged.tls and flagged.tls_cert == Path("c.pem")


def test_the_config_table_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--print-config-table"], environ={})
    assert exited.value.code == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`RNNSERVE_" in line]
    assert len(rows) == len(ServerSettings.__dataclass_fields__)
    assert "| `--metrics-port` | `RNNSERVE_METRICS_PORT` | 9400 |" in table
    assert "| (none: secret) | `RNNSERVE_AUTH_TOKENS` | empty |" in table
