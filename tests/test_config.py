"""config.yaml: strict keys with did-you-mean, rejected (never clamped) values, ${ENV} secrets, paths, --db, --config.

Each mistake must come back as FILE:LINE:COL with the fix, from ``load_config`` and from the CLI alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.main import Ctx, main
from engine.config import Config, load_config
from engine.exceptions import ConfigError

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def locate(path: Path, anchor: str) -> tuple[int, int]:
    """Line and column of ANCHOR (a ^ inside it marks the exact column), skipping comment lines."""
    before, _, after = anchor.partition("^")
    needle = before + after
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if needle in text and not text.lstrip().startswith("#"):
            return number, text.index(needle) + len(before) + 1
    raise AssertionError(f"{anchor!r} not in {path}")


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, required=True)
    return str(caught.value).splitlines()


def assert_reported(path: Path, anchor: str, *words: str) -> str:
    """load_config fails with a line FILE:LINE:COL: ... at ANCHOR that holds every one of WORDS."""
    line, col = locate(path, anchor)
    prefix = f"{path}:{line}:{col}: "
    lines = problems_of(path)
    found = [text.removeprefix(prefix) for text in lines if text.startswith(prefix)]
    assert found, f"nothing at {prefix!r}; got {lines}"
    assert any(all(word in text for word in words) for text in found), f"{found} lacks one of {words}"
    return found[0]


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


# --------------------------------------------------------------------------- unknown keys


def test_an_unknown_key_is_reported_with_did_you_mean_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# runtime settings\ndatabse:\n  url: sqlite:///var/engine.db\n")
    assert_reported(path, "^databse:", "unknown key 'databse'", "did you mean 'database'?")


def test_an_unknown_nested_key_names_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, "scheduler:\n  interval: 30\n  batchsize: 100\n")
    assert_reported(path, "^batchsize", "unknown key 'scheduler.batchsize'", "did you mean 'batch_size'?")


def test_an_unknown_key_in_a_list_item_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "frequency_caps:\n  - {channel: any, max: 3, per: 7d, chanel: sms}\n")
    assert_reported(path, "^chanel", "unknown key 'frequency_caps[0].chanel'", "did you mean 'channel'?")


# --------------------------------------------------------------------------- bad values are rejected


@pytest.mark.parametrize("value", ['"25:00"', '"8:00"', '"9pm"', "2100"])
def test_a_bad_quiet_hours_time_is_rejected(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f'quiet_hours:\n  start: {value}\n  end: "08:00"\n')
    assert_reported(path, f"start: ^{value}", "quiet_hours.start", "HH:MM", '"08:00"', "got:")


def test_unquoted_quiet_hours_are_still_times(tmp_path: Path) -> None:
    """`21:00` unquoted is the text 21:00 (YAML 1.2), not the sexagesimal number 1260 of YAML 1.1."""
    path = write(tmp_path, "quiet_hours: {start: 21:00, end: 08:00}\n")
    config = load_config(path, required=True)
    assert config.quiet_hours is not None
    assert (config.quiet_hours.start, config.quiet_hours.end) == ("21:00", "08:00")


@pytest.mark.parametrize("value", ["-5", "0"])
def test_a_scheduler_interval_below_one_second_is_rejected_not_clamped(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"scheduler:\n  interval: {value}\n")
    assert_reported(path, f"interval: ^{value}", "scheduler.interval", "greater than 0", f"got: {value}")


def test_an_unknown_channel_provider_is_rejected_with_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, "channels:\n  sms:\n    provider: twillio\n")
    assert_reported(path, "provider: ^twillio", "channels.sms.provider", "'twilio'", "'outbox'",
                    "got: 'twillio'", "did you mean 'twilio'?")


def test_a_provider_on_the_wrong_channel_is_reported_on_both_channels(tmp_path: Path) -> None:
    """Each channel is checked even when the other is wrong, and each error points at its provider line."""
    path = write(tmp_path, "channels:\n  sms:\n    provider: sendgrid\n  email:\n    provider: twilio\n")
    assert_reported(path, "provider: ^sendgrid", "channels.sms.provider must be twilio, console or outbox")
    assert_reported(path, "provider: ^twilio", "channels.email.provider must be sendgrid, console or outbox")


def test_a_bad_frequency_cap_window_names_the_list_item(tmp_path: Path) -> None:
    path = write(tmp_path, "frequency_caps:\n  - {channel: any, max: 3, per: 7d}\n"
                           "  - {channel: sms, max: 1, per: 1 day}\n")
    assert_reported(path, "per: ^1 day", "frequency_caps[1].per", "e.g. 30m, 12h, 7d", "got: '1 day'")


def test_a_misspelt_time_zone_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "default_timezone: Asia/Shanghia\n")
    assert_reported(path, "default_timezone: ^Asia/Shanghia", "IANA time zone", "Asia/Shanghai")


def test_a_time_zone_folder_is_rejected_not_a_crash(tmp_path: Path) -> None:
    """"America" is a folder of the zone database: ZoneInfo raised OSError for it, not a config error."""
    path = write(tmp_path, "default_timezone: America\n")
    assert_reported(path, "default_timezone: ^America", "IANA time zone", "got: 'America'")


def test_every_mistake_is_reported_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([
        "scheduler:",
        "  interval: -1",
        "channels:",
        "  sms:",
        "    provider: twillio",
        "quiet_hours: {start: '25:00', end: '08:00'}",
        "colour: blue",
    ]) + "\n")
    lines = problems_of(path)
    assert [text.split(": ")[0] for text in lines] == [
        f"{path}:{line}:{col}" for line, col in (
            locate(path, "interval: ^-1"), locate(path, "provider: ^twillio"), locate(path, "start: ^'25:00'"),
            locate(path, "^colour"),
        )
    ]


def test_a_yaml_syntax_error_in_the_config_shows_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "database:\n  url: sqlite:///var/engine.db\n   rules_dir: rules\n")
    lines = problems_of(path)
    line, _ = locate(path, "   rules_dir")
    assert lines[0].startswith(f"{path}:{line}:")
    assert "YAML syntax error" in lines[0]
    assert any(text.lstrip().startswith(f"> {line:4d} |") for text in lines[1:])


def test_a_config_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "- database\n- rules\n")
    assert problems_of(path) == [f"{path}:1:1: config must be a mapping of keys to values"]


def test_a_config_not_saved_as_utf8_is_reported_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("web:\n  public_url: https://会员.example.com\n".encode("gbk"))
    assert problems_of(path) == [f"{path}:1:1: file is not UTF-8 text; save it as UTF-8"]


# --------------------------------------------------------------------------- ${ENV} interpolation


def test_env_variables_are_interpolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TWILIO_SID", "AC0123456789")
    monkeypatch.setenv("TEST_DB_PASSWORD", "s3cret")
    path = write(tmp_path, "\n".join([
        "database:",
        "  url: postgresql+psycopg://crm:${TEST_DB_PASSWORD}@db.internal/crm",
        "channels:",
        "  sms:",
        "    provider: twilio",
        "    account_sid: ${TEST_TWILIO_SID}",
    ]) + "\n")
    config = load_config(path, required=True)
    assert config.channels.sms.account_sid == "AC0123456789"
    assert config.database.url == "postgresql+psycopg://crm:s3cret@db.internal/crm"


def test_a_missing_env_variable_is_reported_with_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_SENDGRID_KEY", raising=False)
    path = write(tmp_path, "channels:\n  email:\n    provider: sendgrid\n    api_key: ${TEST_SENDGRID_KEY}\n")
    message = assert_reported(path, "api_key: ^${", "environment variable TEST_SENDGRID_KEY is not set")
    assert "${TEST_SENDGRID_KEY:-default}" in message  # the fix: export it, or give a default


def test_a_default_is_used_when_the_env_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_API_TOKEN", raising=False)
    monkeypatch.delenv("TEST_PUBLIC_URL", raising=False)
    path = write(tmp_path, "web:\n  api_token: ${TEST_API_TOKEN:-}\n"
                           "  public_url: ${TEST_PUBLIC_URL:-https://crm.example.com}\n")
    config = load_config(path, required=True)
    assert config.web.api_token == ""
    assert config.web.public_url == "https://crm.example.com"


def test_a_set_env_variable_wins_over_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PUBLIC_URL", "https://members.example.cn")
    path = write(tmp_path, "web:\n  public_url: ${TEST_PUBLIC_URL:-https://crm.example.com}\n")
    assert load_config(path, required=True).web.public_url == "https://members.example.cn"


def test_an_interpolated_value_is_still_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TICK", "-10")
    path = write(tmp_path, "scheduler:\n  interval: ${TEST_TICK}\n")
    assert_reported(path, "interval: ^${TEST_TICK}", "scheduler.interval", "greater than 0", "got: '-10'")


# --------------------------------------------------------------------------- --db, paths, --config


def test_db_overrides_database_url(tmp_path: Path) -> None:
    path = write(tmp_path, "database:\n  url: postgresql+psycopg://crm@db.internal/crm\n")
    assert load_config(path, required=True).database.url == "postgresql+psycopg://crm@db.internal/crm"
    override = f"sqlite:///{tmp_path / 'other.db'}"
    assert load_config(path, override, required=True).database_url == override
    assert Ctx(str(path), override, debug=False).config().database_url == override  # what every CLI verb uses


def test_db_makes_the_env_variable_of_database_url_unnecessary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    path = write(tmp_path, "database:\n  url: ${TEST_DATABASE_URL}\n")
    assert_reported(path, "url: ^${", "environment variable TEST_DATABASE_URL is not set")
    override = f"sqlite:///{tmp_path / 'local.db'}"
    assert load_config(path, override, required=True).database_url == override


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "deploy"
    path = write(folder, "database:\n  url: sqlite:///var/engine.db\nrules_dir: rules\ntemplates_dir: ../shared/tpl\n"
                         "channels:\n  sms:\n    provider: outbox\n    path: out/sms.jsonl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "deploy" / "config.yaml", required=True)
    assert config.rules_path.resolve() == folder / "rules"
    assert config.templates_path.resolve() == tmp_path / "shared" / "tpl"
    assert Path(config.database_url.removeprefix("sqlite:///")).resolve() == folder / "var" / "engine.db"
    assert config.outbox_path("sms").resolve() == folder / "out" / "sms.jsonl"
    assert path.exists()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    rules = tmp_path / "somewhere" / "rules"
    path = write(tmp_path, f"rules_dir: {rules}\ndatabase:\n  url: sqlite:////srv/crm/engine.db\n")
    config = load_config(path, required=True)
    assert config.rules_path == rules
    assert config.database_url == "sqlite:////srv/crm/engine.db"


def test_validate_finds_rules_next_to_the_config_not_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    shutil.copytree(REPO / "rules", folder / "rules")
    (folder / "rules" / "journeys" / "winback.yaml").unlink()
    path = write(folder, f"rules_dir: rules\ntemplates_dir: {REPO / 'templates'}\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli("--config", str(path), "validate")
    assert code == 0, out
    shipped = len(list((REPO / "rules" / "journeys").glob("*.yaml")))
    assert out.startswith(f"ok: {shipped - 1} journeys")  # the copy without winback, not the repository's rules


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "conf" / "prod.yaml"
    with pytest.raises(ConfigError, match="no such file; pass --config PATH"):
        load_config(missing, required=True)
    code, out, err = cli("--config", str(missing), "validate")
    assert code == 1
    assert f"{missing}: no such file" in err
    assert "Traceback" not in out + err


def test_a_missing_default_config_means_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config("config.yaml")
    assert config.model_dump(exclude={"base_dir"}) == Config().model_dump(exclude={"base_dir"})
    assert config.rules_path == tmp_path / "rules"


def test_the_shipped_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_API_TOKEN", raising=False)
    config = load_config(REPO / "config.yaml", required=True)
    assert config.rules_path == REPO / "rules"
    assert config.scheduler.interval == 60


# --------------------------------------------------------------------------- through `validate`


def test_validate_reports_config_mistakes_as_file_line_col_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_TWILIO_TOKEN", raising=False)
    path = write(tmp_path, "\n".join([
        "rules_dir: rules",
        "schedular:",
        "  interval: 30",
        "channels:",
        "  sms:",
        "    provider: twilio",
        "    auth_token: ${TEST_TWILIO_TOKEN}",
    ]) + "\n")
    code, out, err = cli("--config", str(path), "validate")
    assert code == 1
    assert err.splitlines() == ["2 problem(s) found"]
    assert out.splitlines() == [
        f"{path}:{line}:{col}: {message}" for (line, col), message in (
            (locate(path, "^schedular"), "unknown key 'schedular'; did you mean 'scheduler'?"),
            (locate(path, "auth_token: ^$"), "environment variable TEST_TWILIO_TOKEN is not set; "
                                             "export it or write ${TEST_TWILIO_TOKEN:-default}"),
        )
    ]
    assert "Traceback" not in out + err
