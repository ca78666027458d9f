"""config.yaml: loading, ``${ENV}`` interpolation and strict validation.

Unknown keys are errors (with a did-you-mean); bad values are rejected, never
clamped. Relative paths resolve against the folder that holds the file.
"""

from __future__ import annotations

import difflib
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from engine.domain.timeutil import valid_zone
from engine.exceptions import ConfigError
from engine.rules.durations import parse_duration
from engine.rules.yamlsrc import UNKNOWN, Mark, YamlSyntaxError, YMap, YSeq, load_yaml, snippet

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DatabaseConfig(_Strict):
    url: str = "sqlite:///var/engine.db"


class SchedulerConfig(_Strict):
    interval: int = Field(60, gt=0, description="seconds between ticks")
    batch_size: int = Field(1000, gt=0, le=10_000)
    lease_seconds: int = Field(300, gt=0)
    # A second process composes (loads and renders) the next batch while this one writes and delivers:
    # auto = when the machine has two or more cores and a send fills a batch.
    compose_worker: Literal["auto", "on", "off"] = "auto"
    # Events older than this when a tick first sees them (an import of history) never start a journey;
    # they still count for exits and goals.
    trigger_window: str = "2d"

    _trigger_window: timedelta = PrivateAttr()

    @field_validator("trigger_window")
    @classmethod
    def _window(cls, value: str) -> str:
        parse_duration(value)
        return value

    def model_post_init(self, context: Any, /) -> None:
        self._trigger_window = parse_duration(self.trigger_window)  # parsed once, here

    @property
    def trigger_age(self) -> timedelta:
        """trigger_window as a duration."""
        return self._trigger_window


class ChannelConfig(_Strict):
    provider: Literal["twilio", "sendgrid", "console", "outbox"]
    account_sid: str | None = None
    auth_token: str | None = None
    messaging_service_sid: str | None = None
    api_key: str | None = None
    webhook_public_key: str | None = None
    sender: str | None = Field(None, alias="from")
    base_url: str | None = None
    # Messages per second through this channel: omitted = the provider's documented default for the sender
    # type, 0 = no limit (for sandboxes and benchmarks).
    rate_per_second: float | None = Field(None, ge=0)
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    max_attempts: int = Field(5, ge=1, le=20, description="tries for a transient failure before it is failed")
    path: str | None = Field(None, description="outbox file (outbox provider)")
    timeout: float = Field(10.0, gt=0)
    # Messages handed to the provider before their answers are recorded: the most a crash (kill -9) can leave
    # ``unknown``. At least `concurrency`; more lets a slow provider work through fewer, larger chunks.
    in_flight: int = Field(100, ge=1, le=10_000, description="messages handed over before answers are recorded")
    # Seconds after a hand-over before a timed-out or crashed request is looked up at the provider: one still
    # being processed there would not be found yet and would be sent twice.
    reconcile_after: float = Field(60.0, ge=0, le=86_400)
    # SMS only: the reply to HELP, and a hint appended to marketing SMS that lack one.
    help_reply: str = "会员中心：回复 TD 退订，回复 START 重新订阅。Reply STOP to opt out, START to opt back in."
    opt_out_hint: dict[str, str] = {"zh": "回T退订", "en": "Reply STOP to opt out"}

    @model_validator(mode="after")
    def _window(self) -> ChannelConfig:
        if self.in_flight < self.concurrency:
            raise ValueError(f"in_flight must be at least concurrency ({self.concurrency}): the requests in flight "
                             f"at once are part of what is handed over, got: {self.in_flight}")
        return self


class ChannelsConfig(_Strict):
    sms: ChannelConfig = ChannelConfig(provider="outbox")
    email: ChannelConfig = ChannelConfig(provider="outbox")

    # Field validators rather than one model validator: each runs even when the other channel is wrong.
    @field_validator("sms")
    @classmethod
    def _sms_provider(cls, value: ChannelConfig) -> ChannelConfig:
        if value.provider == "sendgrid":
            raise ValueError("channels.sms.provider must be twilio, console or outbox, got: 'sendgrid' "
                             "(sendgrid sends email)")
        return value

    @field_validator("email")
    @classmethod
    def _email_provider(cls, value: ChannelConfig) -> ChannelConfig:
        if value.provider == "twilio":
            raise ValueError("channels.email.provider must be sendgrid, console or outbox, got: 'twilio' "
                             "(twilio sends SMS)")
        return value


class WebConfig(_Strict):
    listen: str = "127.0.0.1:8080"
    public_url: str = "http://127.0.0.1:8080"
    api_token: str | None = None
    webhook_max_age: int = Field(300, gt=0, description="seconds a signed webhook stays acceptable (replays)")
    read_timeout: float = Field(10, gt=0, le=300, description="seconds a client has to send its whole request")
    keepalive_timeout: int = Field(5, ge=1, le=300, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(1000, ge=1, le=100_000,
                                 description="open connections beyond which new ones are answered 503")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        listen_address(value)
        return value


def listen_address(listen: str) -> tuple[str, int]:
    """web.listen (or ``--listen``) as (host, port): ``127.0.0.1:8080``, ``[::1]:8080``, ``0.0.0.0:8080``; port 0
    picks a free one. ValueError names the form expected."""
    host, colon, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT such as 127.0.0.1:8080, got: {listen!r}")
    return host, int(port)


class QuietHours(_Strict):
    start: str = "21:00"
    end: str = "08:00"

    @field_validator("start", "end", mode="before")  # before: 2100 gets this message, not "must be a string"
    @classmethod
    def _hhmm(cls, value: Any) -> str:
        if not isinstance(value, str) or not _HHMM.match(value):
            raise ValueError(f'must be a 24-hour time written HH:MM such as "08:00" or "21:30", got: {value!r}')
        return value


class FrequencyCap(_Strict):
    channel: Literal["any", "sms", "email"] = "any"
    max: int = Field(gt=0)
    per: str

    _window: timedelta = PrivateAttr()

    @field_validator("per")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    def model_post_init(self, context: Any, /) -> None:
        self._window = parse_duration(self.per)  # parsed once, here

    @property
    def window(self) -> timedelta:
        return self._window


class AuditConfig(_Strict):
    anchor_file: str | None = Field(None, description="file the daemon appends the chain's head to (audit anchors)")
    anchor_every: int = Field(3600, gt=0, description="seconds between anchors")


class Config(_Strict):
    database: DatabaseConfig = DatabaseConfig()
    rules_dir: str = "rules"
    templates_dir: str = "templates"
    var_dir: str = "var"
    default_locale: str = "zh-CN"
    default_timezone: str = "Asia/Shanghai"
    default_region: str = Field("CN", description="phone numbering region for numbers without +country code")
    currency: str = "CNY"
    scheduler: SchedulerConfig = SchedulerConfig()
    channels: ChannelsConfig = ChannelsConfig()
    web: WebConfig = WebConfig()
    audit: AuditConfig = AuditConfig()
    quiet_hours: QuietHours | None = QuietHours()
    frequency_caps: list[FrequencyCap] = []

    # Not from the file: where it was, so relative paths can be resolved.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if not valid_zone(value):
            raise ValueError(f"must be an IANA time zone such as Asia/Shanghai, got: {value!r}")
        return value

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def rules_path(self) -> Path:
        return self.path(self.rules_dir)

    @property
    def templates_path(self) -> Path:
        return self.path(self.templates_dir)

    @property
    def var_path(self) -> Path:
        return self.path(self.var_dir)

    @property
    def database_url(self) -> str:
        """The URL with a relative SQLite path made absolute against the config's folder."""
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
            return prefix + str(self.path(url[len(prefix) :]))
        return url

    def outbox_path(self, channel: str) -> Path:
        configured = getattr(self.channels, channel).path
        return self.path(configured) if configured else self.var_path / "outbox" / f"{channel}.jsonl"


def _interpolate(value: Any, problems: list[tuple[Mark, str]], where: Mark) -> Any:
    if isinstance(value, YMap):
        out = YMap(value.mark)
        out.key_marks, out.value_marks = value.key_marks, value.value_marks
        for key, item in value.items():
            out[key] = _interpolate(item, problems, value.value_mark(key))
        return out
    if isinstance(value, YSeq):
        seq = YSeq(value.mark)
        seq.item_marks = value.item_marks
        seq.extend(_interpolate(item, problems, value.item_mark(i)) for i, item in enumerate(value))
        return seq
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problems.append((where, f"environment variable {name} is not set; export it or write ${{{name}:-default}}"))
            return ""

        return _ENV.sub(sub, value)
    return value


def _locate(data: Any, loc: tuple[int | str, ...]) -> Mark:
    mark = getattr(data, "mark", UNKNOWN)
    node = data
    for part in loc:
        if isinstance(node, YMap) and isinstance(part, str):
            key = part if part in node else ("from" if part == "sender" and "from" in node else None)
            if key is None:
                return mark
            mark = node.value_mark(key)
            node = node[key]
        elif isinstance(node, YSeq) and isinstance(part, int) and 0 <= part < len(node):
            mark = node.item_mark(part)
            node = node[part]
        else:
            return mark
    return mark


def _known_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        current = candidates[0]
    return [f.alias or name for name, f in getattr(current, "model_fields", {}).items() if name != "base_dir"]


def _dotted(loc: tuple[int | str, ...]) -> str:
    """scheduler.interval, frequency_caps[0].per: the way validate names places elsewhere."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: ErrorDetails, data: Any) -> tuple[Mark, str]:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = _dotted(loc)
    if error["type"] == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        mark = _locate_key(data, parent, key)
        known = _known_fields(Config, parent)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return mark, f"unknown key {dotted!r}{hint}"
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    deeper = re.match(r"^([\w.]+) must ", message)
    if deeper and deeper.group(1).startswith(f"{dotted}."):
        # A validator on a section names the key inside it that is wrong: point at that key.
        return _locate(data, tuple(deeper.group(1).split("."))), message
    value = error.get("input")
    if isinstance(value, (str, int, float, bool)) and "got:" not in message:
        message += f", got: {value!r}"
        if error["type"] == "literal_error" and isinstance(value, str):
            choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
            close = difflib.get_close_matches(value, choices, n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
    return _locate(data, loc), f"{dotted}: {message}"


def _locate_key(data: Any, parent: tuple[int | str, ...], key: str) -> Mark:
    node = data
    for part in parent:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return _locate(data, parent)
    return node.key_mark(key) if isinstance(node, YMap) else _locate(data, parent)


def _has_db_url(raw: YMap) -> bool:
    database = raw.get("database")
    return isinstance(database, YMap) and "url" in database


def load_config(path: str | Path = "config.yaml", db_url: str | None = None, *, required: bool = False) -> Config:
    """Load and validate config.yaml; a missing default file means all defaults."""
    file = Path(path)
    if not file.exists():
        if required:
            raise ConfigError(f"{file}: no such file; pass --config PATH or create config.yaml")
        config = Config(base_dir=file.resolve().parent)
    else:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{file}:1:1: file is not UTF-8 text; save it as UTF-8") from None
        try:
            raw = load_yaml(text)
        except YamlSyntaxError as exc:
            raise ConfigError(f"{file}:{exc.mark.line}:{exc.mark.col}: {exc.message}\n"
                              f"{snippet(text, exc.mark.line)}") from None
        if raw is None:
            raw = YMap()
        if not isinstance(raw, YMap):
            raise ConfigError(f"{file}:1:1: config must be a mapping of keys to values")
        problems: list[tuple[Mark, str]] = []
        data = _interpolate(raw, problems, raw.mark)
        if db_url:
            # --db replaces database.url, so a ${VAR} there need not be set.
            overridden = _locate(raw, ("database", "url"))
            problems = [p for p in problems if p[0] != overridden or not _has_db_url(raw)]
        try:
            config = Config.model_validate({**data, "base_dir": file.resolve().parent})
        except ValidationError as exc:
            problems.extend(_describe(e, data) for e in exc.errors())
        if problems:
            ordered = sorted(problems, key=lambda p: (p[0].line, p[0].col))
            raise ConfigError("\n".join(f"{file}:{mark.line}:{mark.col}: {message}" for mark, message in ordered))
    if db_url:
        config = config.model_copy(update={"database": DatabaseConfig(url=db_url)})
    return config
