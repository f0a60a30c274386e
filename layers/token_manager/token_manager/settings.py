"""Configuration: environment variables first, then SSM Parameter Store (DESIGN.md section 4).

Read once per container. Secrets come from SSM in one batched, decrypted call; a
non-empty environment variable wins (local runs, ``sam local invoke --env-vars``).
Bad or missing configuration raises one ``ConfigurationError`` naming the setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from token_manager.errors import ConfigurationError

ENVIRONMENTS = ("dev", "staging", "prod")
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
DEFAULT_SSM_MAX_AGE_SECONDS = 300
# Per attempt: three attempts of a hanging Sonos (plus connects and backoff) must end well
# inside the API functions' 25 s timeout, so the caller gets upstream_unavailable, not a
# killed invocation.
DEFAULT_SONOS_HTTP_TIMEOUT_SECONDS = 4.0
MAX_SONOS_HTTP_TIMEOUT_SECONDS = 60.0

# setting -> (environment variable, SSM name under /storytailor-{env}/, secret?)
SSM_BACKED: dict[str, tuple[str, str | None]] = {
    "client_id": ("SONOS_CLIENT_ID", "sonos/client-id"),
    "client_secret": ("SONOS_CLIENT_SECRET", "sonos/client-secret"),
    "redirect_uri": ("SONOS_REDIRECT_URI", "sonos/redirect-uri"),
    "key_ring": ("TOKEN_ENCRYPTION_KEYS", "sonos/token-encryption-keys"),
    "supabase_url": ("SUPABASE_URL", "supabase/url"),
    "supabase_service_role_key": ("SUPABASE_SERVICE_ROLE_KEY", "supabase/service-role-key"),
    "redis_url": ("REDIS_URL", "redis/url"),
    "database_url": ("DATABASE_URL", None),
}

# Fetches SSM parameters by full name; returns the values found (decrypted).
SsmFetcher = Callable[[list[str], int], Mapping[str, str]]


@dataclass(frozen=True)
class Settings:
    """Everything a container needs. Secret fields are kept out of ``repr``."""

    env: str
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: tuple[str, ...]
    key_ring_json: str = field(repr=False)
    redis_url: str = field(repr=False)
    database_url: str | None = field(default=None, repr=False)
    supabase_url: str | None = None
    supabase_service_role_key: str | None = field(default=None, repr=False)
    auth_base_url: str = "https://api.sonos.com"
    control_base_url: str = "https://api.ws.sonos.com/control/api/v1"
    scope: str = "playback-control-all"
    revoke_url: str = ""
    refresh_ahead_seconds: int = 300
    link_success_url: str = ""
    link_failure_url: str = ""
    event_bus_name: str = ""
    ssm_max_age_seconds: int = DEFAULT_SSM_MAX_AGE_SECONDS
    refresher_concurrency: int = 16
    refresher_period_seconds: int = 300
    sonos_http_timeout_seconds: float = DEFAULT_SONOS_HTTP_TIMEOUT_SECONDS

    @property
    def default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def ssm_name(self, setting: str) -> str:
        suffix = SSM_BACKED[setting][1]
        if suffix is None:
            raise KeyError(setting)
        return ssm_parameter_name(self.env, suffix)


def ssm_parameter_name(env: str, suffix: str) -> str:
    return f"/storytailor-{env}/{suffix}"


def powertools_ssm_fetcher(names: list[str], max_age: int) -> Mapping[str, str]:
    """One batched, decrypted read through Powertools Parameters (cached for ``max_age``)."""
    from aws_lambda_powertools.utilities.parameters import get_parameters_by_name

    found = get_parameters_by_name(
        parameters={name: {} for name in names}, decrypt=True, max_age=max_age, raise_on_error=False
    )
    return {name: value for name, value in found.items() if name != "_errors" and isinstance(value, str)}


def powertools_ssm_fresh_fetcher(names: list[str], max_age: int) -> Mapping[str, str]:
    """Read parameters straight from SSM (decrypted), never from Powertools' cache.

    ``get_parameters_by_name(max_age=0)`` still answers from the cache a batched read
    filled (Powertools 3.x checks only the stored expiry there), so a ring rotated a
    minute ago would come back as the old one; ``force_fetch`` really asks SSM.
    """
    from aws_lambda_powertools.utilities.parameters import get_parameter

    values: dict[str, str] = {}
    for name in names:
        value = get_parameter(name, decrypt=True, force_fetch=True, max_age=max_age)
        if isinstance(value, str):
            values[name] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None, fetch_ssm: SsmFetcher = powertools_ssm_fetcher) -> Settings:
    """Build and validate the settings; raises ConfigurationError naming the bad setting."""
    env_vars = os.environ if environ is None else environ

    def env(name: str, default: str = "") -> str:
        return env_vars.get(name, "").strip() or default

    deploy_env = env("ENV", "dev")
    if deploy_env not in ENVIRONMENTS:
        raise ConfigurationError(f"ENV must be one of {', '.join(ENVIRONMENTS)}.")
    max_age = _int_setting(env, "SSM_PARAMETER_MAX_AGE_SECONDS", DEFAULT_SSM_MAX_AGE_SECONDS, minimum=0)

    values: dict[str, str] = {key: env(var) for key, (var, _) in SSM_BACKED.items()}
    # Direct Postgres replaces Supabase: do not ask SSM for Supabase then.
    skip = {"supabase_url", "supabase_service_role_key"} if values["database_url"] else set()
    wanted = {
        ssm_parameter_name(deploy_env, suffix): key
        for key, (_, suffix) in SSM_BACKED.items()
        if suffix is not None and not values[key] and key not in skip
    }
    if wanted:
        try:
            fetched = fetch_ssm(sorted(wanted), max_age)
        except Exception as exc:  # noqa: BLE001 - any SDK or network failure: never start half-configured
            raise ConfigurationError(f"Could not read settings from SSM ({type(exc).__name__}).") from None
        for name, key in wanted.items():
            values[key] = (fetched.get(name) or "").strip()

    def required(key: str) -> str:
        if not values[key]:
            var, suffix = SSM_BACKED[key]
            where = f"{var} or SSM {ssm_parameter_name(deploy_env, suffix)}" if suffix else var
            raise ConfigurationError(f"Missing setting {where}.")
        return values[key]

    client_id, client_secret = required("client_id"), required("client_secret")
    redirect_uris = parse_redirect_uris(required("redirect_uri"))
    key_ring_json = required("key_ring")
    redis_url = required("redis_url")
    _check_redis_url(redis_url)
    if not values["database_url"]:
        required("supabase_url")
        required("supabase_service_role_key")
        _check_url("SUPABASE_URL", values["supabase_url"])

    revoke_url = env("SONOS_REVOKE_URL")
    for name, url in (
        ("SONOS_AUTH_BASE_URL", env("SONOS_AUTH_BASE_URL", "https://api.sonos.com")),
        ("SONOS_CONTROL_BASE_URL", env("SONOS_CONTROL_BASE_URL", "https://api.ws.sonos.com/control/api/v1")),
        ("SONOS_REVOKE_URL", revoke_url),
        ("SONOS_LINK_SUCCESS_URL", env("SONOS_LINK_SUCCESS_URL")),
        ("SONOS_LINK_FAILURE_URL", env("SONOS_LINK_FAILURE_URL")),
    ):
        if url:
            _check_url(name, url)

    return Settings(
        env=deploy_env,
        client_id=client_id,
        client_secret=client_secret,
        redirect_uris=redirect_uris,
        key_ring_json=key_ring_json,
        redis_url=redis_url,
        database_url=values["database_url"] or None,
        supabase_url=values["supabase_url"] or None,
        supabase_service_role_key=values["supabase_service_role_key"] or None,
        auth_base_url=env("SONOS_AUTH_BASE_URL", "https://api.sonos.com").rstrip("/"),
        control_base_url=env("SONOS_CONTROL_BASE_URL", "https://api.ws.sonos.com/control/api/v1").rstrip("/"),
        scope=env("SONOS_SCOPE", "playback-control-all"),
        revoke_url=revoke_url,
        refresh_ahead_seconds=_int_setting(env, "REFRESH_AHEAD_SECONDS", 300, minimum=0, maximum=86_400),
        link_success_url=env("SONOS_LINK_SUCCESS_URL"),
        link_failure_url=env("SONOS_LINK_FAILURE_URL"),
        event_bus_name=env("EVENT_BUS_NAME"),
        ssm_max_age_seconds=max_age,
        refresher_concurrency=_int_setting(env, "REFRESHER_CONCURRENCY", 16, minimum=1, maximum=256),
        refresher_period_seconds=_int_setting(env, "REFRESHER_PERIOD_SECONDS", 300, minimum=1, maximum=86_400),
        sonos_http_timeout_seconds=_seconds_setting(
            env,
            "SONOS_HTTP_TIMEOUT_SECONDS",
            DEFAULT_SONOS_HTTP_TIMEOUT_SECONDS,
            maximum=MAX_SONOS_HTTP_TIMEOUT_SECONDS,
        ),
    )


def load_key_ring_json(settings: Settings, fetch_ssm: SsmFetcher = powertools_ssm_fresh_fetcher) -> str:
    """The key ring as it is now (environment, else SSM bypassing the cache).

    Used when a row carries a key id this container does not know yet: another
    container rotated the ring after this one started.
    """
    from_env = os.environ.get("TOKEN_ENCRYPTION_KEYS", "").strip()
    if from_env:
        return from_env
    name = settings.ssm_name("key_ring")
    try:
        value = fetch_ssm([name], 0).get(name, "").strip()
    except Exception as exc:  # noqa: BLE001 - reported as configuration: the ring cannot be read
        raise ConfigurationError(f"Could not read {name} from SSM ({type(exc).__name__}).") from None
    if not value:
        raise ConfigurationError(f"Missing setting TOKEN_ENCRYPTION_KEYS or SSM {name}.")
    return value


def parse_redirect_uris(raw: str) -> tuple[str, ...]:
    """The exact-match allow-list: comma-separated, byte-identical, https (http only for localhost)."""
    uris = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not uris:
        raise ConfigurationError("SONOS_REDIRECT_URI is empty.")
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme == "http" and (parts.hostname or "") in LOCAL_HOSTS:
            continue
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigurationError(
                "SONOS_REDIRECT_URI must be https (http is allowed only for localhost or 127.0.0.1)."
            )
        if parts.fragment:
            raise ConfigurationError("SONOS_REDIRECT_URI must not contain a fragment.")
    return uris


def _check_url(name: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"{name} is not an http(s) URL.")
    if parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS:
        raise ConfigurationError(f"{name} must be https (http is allowed only for localhost).")


def _check_redis_url(url: str) -> None:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError("REDIS_URL must be a redis:// or rediss:// URL.")


def _int_setting(
    env: Callable[[str, str], str], name: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    raw = env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer.") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigurationError(f"{name} must be between {minimum} and {maximum or 'unbounded'}.")
    return value


def _seconds_setting(env: Callable[[str, str], str], name: str, default: float, *, maximum: float) -> float:
    raw = env(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds.") from None
    if not (math.isfinite(value) and 0 < value <= maximum):
        raise ConfigurationError(f"{name} must be more than 0 and at most {maximum:g} seconds.")
    return value
