"""Service settings (pydantic-settings): what both services share, and how they are loaded.

Sources, highest precedence first: command-line options, environment variables (a prefix per
service: P2PDOE_EDGE_, P2PDOE_DSO_), files in a secrets directory (one file per setting, named like its
environment variable, e.g. `p2pdoe_edge_password`: the Docker and Kubernetes secrets convention), a
YAML or JSON settings file, the defaults. A bad setting fails at start with one line.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from p2pdoe.core.realtime.clock import SimClock
from p2pdoe.errors import P2PDoeError, first_error

S = TypeVar("S", bound="ServiceSettings")
M = TypeVar("M", bound=BaseModel)


class ConfigError(P2PDoeError):
    """A setting is missing or invalid."""


class ServiceSettings(BaseSettings):
    broker: str = "mqtt://127.0.0.1:1883"  # mqtt://[user:password@]host[:port]
    username: str | None = None
    password: SecretStr | None = None  # best given through the secrets directory or a password file
    password_file: Path | None = None  # a file holding the password (`p2pdoe provision` writes them)
    ca_cert: Path | None = None  # the CA certificate that signed an mqtts:// broker's (default: the system's)
    client_id: str | None = None  # default: the service's own id
    health_file: Path | None = None  # rewritten every 5 s: alive, and connected or not (services.health)
    # Prometheus metrics on http://<metrics_host>:<metrics_port>/metrics (p2pdoe.services.metrics);
    # None: none served. 0: a free port (logged).
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    # > 0: a persistent MQTT session the broker keeps this long after a disconnect, queueing the QoS 1
    # messages meant for this client meanwhile (the coordinator and the edge agents keep a day's)
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 86_400)] = 0
    # End-to-end signatures (p2pdoe.services.signing): this identity's Ed25519 key, and the public
    # keys of every identity; with them, only authentic messages are believed.
    signing_key: Path | None = None
    trusted_keys: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The shared simulated clock (p2pdoe.core.realtime.clock): every service of a bench gets the
    # same values; speed 1 with the default origins is wall time.
    start: str = "today"  # the day's first interval: "today", "now", "scenario", or an ISO 8601 time
    # wall (deployments), scaled (`speed` x wall time from the origins), lockstep (time granted by
    # `python -m p2pdoe.services.lockstep` once every participant has finished its step). Default:
    # scaled when a speed or an origin is given, else wall.
    clock: Literal["wall", "scaled", "lockstep"] | None = None
    speed: Annotated[float, Field(gt=0, le=100000)] = 1.0  # simulated seconds per wall second
    sim_origin: str | None = None  # simulated time at `wall_origin` (default: the wall time at start)
    wall_origin: str | None = None  # (default: now)

    @model_validator(mode="after")
    def _one_password(self) -> ServiceSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give the password or a password file, not both")
        return self

    def secret(self) -> str | None:
        """The password, read from its file if one is named (a ConfigError if it cannot be read)."""
        if self.password_file is None:
            return None if self.password is None else self.password.get_secret_value()
        return read_password_file(self.password_file)

    def clock_kind(self) -> Literal["wall", "scaled", "lockstep"]:
        if self.clock is not None:
            return self.clock
        scaled = self.speed != 1.0 or self.sim_origin is not None or self.wall_origin is not None
        return "scaled" if scaled else "wall"

    def sim_clock(self, now: datetime) -> SimClock:
        """The shared clock; a bad origin is a ConfigError."""
        return SimClock(
            _moment(self.sim_origin, "sim_origin", now),
            _moment(self.wall_origin, "wall_origin", now),
            self.speed,
        )


def read_password_file(path: Path) -> str:
    """The password in `path` (its first line), or a ConfigError naming the file, never its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the password file {path}: {why}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"the password file {path} is empty")
    return password


def _moment(value: str | None, name: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"setting {name}: {value!r} is not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise ConfigError(f"setting {name}: {value!r} needs a time zone")
    return moment.astimezone(UTC)


class _FileSource(PydanticBaseSettingsSource):
    """Values read from the settings file (lowest precedence above the defaults)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]):
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_settings_file(path: Path) -> dict[str, Any]:
    import yaml  # only a process started with --config reads YAML

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:  # where and what only: the offending line may hold a password
        problem, mark = "cannot be parsed", None
        if isinstance(exc, yaml.MarkedYAMLError):
            problem, mark = exc.problem or exc.context or problem, exc.problem_mark
        where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
        raise ConfigError(f"settings file {path} is not valid YAML or JSON: {problem}{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"settings file {path} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def load_settings(
    kind: type[S], options: dict[str, Any], settings_file: Path | None = None, secrets_dir: Path | None = None
) -> S:
    """The settings from every source; `options` are the command line's (None values left out)."""
    file_values = read_settings_file(settings_file) if settings_file is not None else {}
    if secrets_dir is not None and not secrets_dir.is_dir():
        raise ConfigError(f"secrets directory {secrets_dir} does not exist")

    class _Loaded(kind):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls: type[BaseSettings],
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, file_secret_settings, _FileSource(settings_cls, file_values))

    given = {k: v for k, v in options.items() if v is not None}
    try:
        loaded: S = _Loaded(_secrets_dir=secrets_dir, **given)
    except ValidationError as exc:
        raise ConfigError("setting " + first_error(exc, "settings")) from None
    return loaded


def configure_logging(level: str, name: str) -> logging.Logger:
    logging.basicConfig(level=level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(name)


def read_config_file(model: type[M], path: Path, what: str) -> M:
    """A service's JSON configuration file (`p2pdoe site-config`), or one clear line."""
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except ValueError as exc:
        first = " ".join(str(exc).splitlines()[:3])
        raise ConfigError(f"{what} {path} is invalid: {first}") from None
