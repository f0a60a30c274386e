"""Redis for the token service: one-shot OAuth state, the encrypted token cache and refresh locks."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from token_manager.errors import StorageUnavailable

if TYPE_CHECKING:
    # `import redis` costs ~110-195 ms at cold start; it is imported where a client is
    # built, so functions that never touch Redis (key rotation) do not pay for it.
    import redis
    from redis.commands.core import Script

logger = logging.getLogger(__name__)

STATE_TTL_SECONDS = 600
MAX_TOKEN_CACHE_TTL_SECONDS = 3600
FAILURE_LOG_INTERVAL_SECONDS = 60.0

OutcomeStatus = Literal["pending", "linked", "failed"]
_OUTCOME_STATUSES: frozenset[str] = frozenset(get_args(OutcomeStatus))

# GETDEL and the "pending" record in one script: a callback that wins the state always
# leaves a record behind, so a repeated callback (double click, API Gateway retry) can
# answer like the first one instead of "invalid state". pcall keeps a malformed value
# from aborting the script after the GETDEL already ran (scripts do not roll back).
_CONSUME_STATE_LUA = """
local value = redis.call('GETDEL', KEYS[1])
if not value then
  return false
end
local ok, decoded = pcall(cjson.decode, value)
if ok and type(decoded) == 'table' and type(decoded['user_id']) == 'string' then
  local pending = cjson.encode({status = 'pending', user_id = decoded['user_id']})
  redis.call('SET', KEYS[2], pending, 'EX', tonumber(ARGV[1]))
end
return value
"""

# A fill that raced with a revoke or an expiry (it read the grant before the row was
# deleted) must not put the token back: fills are refused while the user is blocked.
_SET_UNLESS_BLOCKED_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""

# Compare-and-delete: a holder whose lock expired must not delete the next holder's lock.
_RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class CacheUnavailable(Exception):
    """Redis failed during a lock operation; the caller falls back (store-only path).

    Internal to the layer: never shown to a caller of the service. The message names
    the operation and the Redis exception class only.
    """


@dataclass(frozen=True, slots=True)
class OAuthState:
    """What initiate stores under ``sonos:oauth:state:{state}``."""

    user_id: str
    redirect_uri: str
    # When the state lapses (epoch seconds); None for a state stored without it.
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class StateOutcome:
    """The short record of a consumed state, under ``sonos:oauth:done:{state}``."""

    status: OutcomeStatus
    user_id: str
    household_id: str | None = None
    error_code: str | None = None


def state_key(state: str) -> str:
    return f"sonos:oauth:state:{state}"


def outcome_key(state: str) -> str:
    return f"sonos:oauth:done:{state}"


def token_key(user_id: str) -> str:
    return f"sonos:token:{user_id}"


def blocked_key(user_id: str) -> str:
    # Not under "sonos:token:": user ids may hold ':', and "sonos:token:blocked:alice" was
    # also the cached token of a user named "blocked:alice".
    return f"sonos:token-blocked:{user_id}"


def lock_key(user_id: str) -> str:
    return f"sonos:lock:refresh:{user_id}"


def unstored_refresh_key(user_id: str) -> str:
    return f"sonos:refresh-unstored:{user_id}"


class RedisCache:
    """The service's Redis keys behind one object.

    Failure policy (DESIGN.md section 7, Redis is a cache):

    - OAuth state and outcome operations raise ``StorageUnavailable``: initiate and
      callback cannot work without them.
    - Token cache reads miss and writes are skipped; ``delete_token`` reports failure
      with ``False`` for the caller to log.
    - ``acquire_lock`` and ``lock_held`` raise ``CacheUnavailable`` so the manager can
      fall back; ``release_lock`` and ``delete_lock`` never raise.

    Nothing retries here: a call makes one attempt within the socket timeouts and the
    caller decides. Failures that are swallowed or turned into ``StorageUnavailable``
    are logged as one warning line naming the operation and the exception class, with
    repeats of the same (operation, class) limited to one line per
    ``FAILURE_LOG_INTERVAL_SECONDS`` of ``clock``.
    """

    def __init__(self, client: redis.Redis, *, clock: Callable[[], float] = time.time) -> None:
        # Already loaded by whoever built `client`; imported here to keep module import cheap.
        from redis.exceptions import RedisError

        self._client = client
        # redis-py wraps socket errors, but an SSL or OS error can escape during connect.
        self._failures: tuple[type[Exception], ...] = (RedisError, OSError)
        self._consume_state_script: Script = client.register_script(_CONSUME_STATE_LUA)
        self._release_lock_script: Script = client.register_script(_RELEASE_LOCK_LUA)
        self._set_token_script: Script = client.register_script(_SET_UNLESS_BLOCKED_LUA)
        self._clock = clock
        self._failure_log = _FailureLog(clock)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> RedisCache:
        """A cache on ``redis://`` or ``rediss://`` (TLS, as ElastiCache in transit encryption).

        Example: ``RedisCache.from_url("rediss://:auth-token@master.example.cache.amazonaws.com:6379/0")``.
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            decode_responses=True,
            # No retries inside: a Lambda has a deadline, and the caller knows what to fall back to.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, clock=clock)

    # --- OAuth state ---------------------------------------------------------

    def put_state(self, state: str, value: OAuthState, ttl_seconds: int = STATE_TTL_SECONDS) -> None:
        payload = _state_payload(value, expires_at=self._clock() + ttl_seconds)
        try:
            self._client.set(state_key(state), payload, ex=ttl_seconds)
        except self._failures as exc:
            raise self._storage_unavailable("oauth state write", exc) from None

    def reopen_state(self, state: str, value: OAuthState, last_try: StateOutcome) -> bool:
        """Put a consumed state back until its original deadline, so the same callback URL can
        be tried again (the code exchange failed transiently: the code may still be good).

        ``last_try`` becomes the state's outcome record, so a repeated callback that races
        with the reopening answers with the last try's error rather than "expired". ``False``
        (and nothing changed) when the deadline is unknown or past, or Redis fails.
        """
        if value.expires_at is None:
            return False
        remaining_ms = int((value.expires_at - self._clock()) * 1000)
        if remaining_ms <= 0:
            return False
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(state_key(state), _state_payload(value, expires_at=value.expires_at), px=remaining_ms)
            pipe.set(outcome_key(state), _outcome_payload(last_try), px=remaining_ms)
            pipe.execute()
        except self._failures as exc:
            self._failure_log.report("oauth state reopen", type(exc).__name__)
            return False
        return True

    def peek_state(self, state: str) -> OAuthState | None:
        """The state's value, left in place; ``None`` when unknown, expired or already consumed."""
        try:
            raw = self._client.get(state_key(state))
        except self._failures as exc:
            raise self._storage_unavailable("oauth state read", exc) from None
        return None if raw is None else self._decode_state(raw)

    def consume_state(self, state: str) -> OAuthState | None:
        """The state's value, exactly once; ``None`` when unknown, expired or already consumed.

        Removing the state and recording ``StateOutcome(status="pending")`` under the done
        key happen atomically, so one state completes exactly one code exchange.
        """
        try:
            raw = self._consume_state_script(keys=[state_key(state), outcome_key(state)], args=[STATE_TTL_SECONDS])
        except self._failures as exc:
            raise self._storage_unavailable("oauth state consume", exc) from None
        return None if raw is None else self._decode_state(raw)

    def _decode_state(self, raw: Any) -> OAuthState | None:
        fields = _decode_object(raw)
        user_id = fields.get("user_id") if fields else None
        redirect_uri = fields.get("redirect_uri") if fields else None
        if not isinstance(user_id, str) or not isinstance(redirect_uri, str):
            self._failure_log.report("oauth state decode", "MalformedValue")
            return None
        expires_at = fields.get("expires_at") if fields else None
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
            expires_at = None
        return OAuthState(user_id=user_id, redirect_uri=redirect_uri, expires_at=expires_at)

    def record_outcome(self, state: str, outcome: StateOutcome, ttl_seconds: int = STATE_TTL_SECONDS) -> None:
        try:
            self._client.set(outcome_key(state), _outcome_payload(outcome), ex=ttl_seconds)
        except self._failures as exc:
            raise self._storage_unavailable("oauth outcome write", exc) from None

    def get_outcome(self, state: str) -> StateOutcome | None:
        try:
            raw = self._client.get(outcome_key(state))
        except self._failures as exc:
            raise self._storage_unavailable("oauth outcome read", exc) from None
        if raw is None:
            return None
        fields = _decode_object(raw)
        if fields is None:
            self._failure_log.report("oauth outcome decode", "MalformedValue")
            return None
        status, user_id = fields.get("status"), fields.get("user_id")
        household_id, error_code = fields.get("household_id"), fields.get("error_code")
        if (
            status not in _OUTCOME_STATUSES
            or not isinstance(user_id, str)
            or not isinstance(household_id, str | None)
            or not isinstance(error_code, str | None)
        ):
            self._failure_log.report("oauth outcome decode", "MalformedValue")
            return None
        return StateOutcome(
            status=cast(OutcomeStatus, status), user_id=user_id, household_id=household_id, error_code=error_code
        )

    # --- encrypted token cache -----------------------------------------------

    def get_token(self, user_id: str) -> str | None:
        """The cached ciphertext, or ``None`` on a miss or when Redis fails."""
        try:
            raw = self._client.get(token_key(user_id))
        except self._failures as exc:
            self._failure_log.report("token cache read", type(exc).__name__)
            return None
        return None if raw is None else _text(raw)

    def set_token(self, user_id: str, blob: str, ttl_seconds: float) -> None:
        """Cache ``blob`` for at most ``MAX_TOKEN_CACHE_TTL_SECONDS``.

        A TTL that rounds to under a millisecond means the token is already due for
        refresh: nothing is written and any older entry is dropped, so the cache never
        serves a token past its refresh point. Skipped (logged) when Redis fails.
        """
        ttl_ms = int(min(ttl_seconds, MAX_TOKEN_CACHE_TTL_SECONDS) * 1000)
        try:
            if ttl_ms <= 0:
                self._client.delete(token_key(user_id))
            else:
                self._set_token_script(keys=[token_key(user_id), blocked_key(user_id)], args=[blob, ttl_ms])
        except self._failures as exc:
            self._failure_log.report("token cache write", type(exc).__name__)

    def delete_token(self, user_id: str) -> bool:
        """Drop the cached token. ``False`` when Redis failed (logged); never raises."""
        try:
            self._client.delete(token_key(user_id))
        except self._failures as exc:
            self._failure_log.report("token cache delete", type(exc).__name__)
            return False
        return True

    def block_token(self, user_id: str) -> bool:
        """Drop the cached token (and any unstored refresh) and refuse fills for the longest
        cache TTL (revoke, expiry).

        ``False`` when Redis failed (the caller logs); never raises.
        """
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(blocked_key(user_id), "1", ex=MAX_TOKEN_CACHE_TTL_SECONDS)
            pipe.delete(token_key(user_id), unstored_refresh_key(user_id))
            pipe.execute()
        except self._failures as exc:
            self._failure_log.report("token cache block", type(exc).__name__)
            return False
        return True

    def unblock_token(self, user_id: str) -> bool:
        """Allow fills again (a new link) and drop what the old grant left: its cached token and
        any refresh of it the store could not take."""
        try:
            self._client.delete(blocked_key(user_id), token_key(user_id), unstored_refresh_key(user_id))
        except self._failures as exc:
            self._failure_log.report("token cache unblock", type(exc).__name__)
            return False
        return True

    # --- a refresh the store could not take -----------------------------------

    def keep_unstored_refresh(self, user_id: str, record: str, ttl_seconds: int) -> bool:
        """Keep a refresh's result (ciphertexts only) that the store failed to write.

        ``False`` when Redis failed too (logged); never raises.
        """
        try:
            self._client.set(unstored_refresh_key(user_id), record, ex=max(1, ttl_seconds))
        except self._failures as exc:
            self._failure_log.report("unstored refresh write", type(exc).__name__)
            return False
        return True

    def unstored_refresh(self, user_id: str) -> str | None:
        """The kept result, or ``None`` (also when Redis fails: logged)."""
        try:
            raw = self._client.get(unstored_refresh_key(user_id))
        except self._failures as exc:
            self._failure_log.report("unstored refresh read", type(exc).__name__)
            return None
        return None if raw is None else _text(raw)

    def forget_unstored_refresh(self, user_id: str) -> None:
        """Drop the kept result (written, or outdated). Never raises; a failure is logged."""
        try:
            self._client.delete(unstored_refresh_key(user_id))
        except self._failures as exc:
            self._failure_log.report("unstored refresh delete", type(exc).__name__)

    # --- single-flight refresh lock ------------------------------------------

    def acquire_lock(self, user_id: str, ttl_seconds: float) -> str | None:
        """The owner token when this caller now holds the lock; ``None`` when someone else does.

        Raises ``CacheUnavailable`` when Redis fails.
        """
        owner = secrets.token_urlsafe(16)
        try:
            acquired = self._client.set(lock_key(user_id), owner, nx=True, px=max(1, int(ttl_seconds * 1000)))
        except self._failures as exc:
            raise CacheUnavailable(f"redis refresh lock acquire failed: {type(exc).__name__}") from None
        return owner if acquired else None

    def release_lock(self, user_id: str, owner: str) -> bool:
        """Release the lock if ``owner`` still holds it. ``False`` otherwise or on failure (logged)."""
        try:
            deleted = self._release_lock_script(keys=[lock_key(user_id)], args=[owner])
        except self._failures as exc:
            self._failure_log.report("refresh lock release", type(exc).__name__)
            return False
        return bool(deleted)

    def lock_held(self, user_id: str) -> bool:
        """Whether anyone holds the lock. Raises ``CacheUnavailable`` when Redis fails."""
        try:
            return bool(self._client.exists(lock_key(user_id)))
        except self._failures as exc:
            raise CacheUnavailable(f"redis refresh lock check failed: {type(exc).__name__}") from None

    def delete_lock(self, user_id: str) -> None:
        """Remove the lock whoever holds it (revoke). Never raises; a failure is logged."""
        try:
            self._client.delete(lock_key(user_id))
        except self._failures as exc:
            self._failure_log.report("refresh lock delete", type(exc).__name__)

    # --- health ----------------------------------------------------------------

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except self._failures:
            return False

    def _storage_unavailable(self, operation: str, exc: Exception) -> StorageUnavailable:
        # The caller sees only the generic message; the Redis error class goes to the log.
        self._failure_log.report(operation, type(exc).__name__)
        return StorageUnavailable()


class _FailureLog:
    """One warning line per failure, at most one per (operation, error class) per interval.

    A Redis outage would otherwise log on every request; the next line after a quiet
    interval says how many were left out.
    """

    def __init__(self, clock: Callable[[], float], interval_seconds: float = FAILURE_LOG_INTERVAL_SECONDS) -> None:
        self._clock = clock
        self._interval_seconds = interval_seconds
        self._lock = threading.Lock()
        # (operation, error class) -> [time of the last line, failures left out since]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def report(self, operation: str, error_class: str) -> None:
        now = self._clock()
        with self._lock:
            entry = self._seen.get((operation, error_class))
            if entry is not None and now - entry[0] < self._interval_seconds:
                entry[1] += 1
                return
            suppressed = int(entry[1]) if entry is not None else 0
            self._seen[(operation, error_class)] = [now, 0]
        if suppressed:
            logger.warning("redis %s failed: %s (%d more since the last report)", operation, error_class, suppressed)
        else:
            logger.warning("redis %s failed: %s", operation, error_class)


def _compact_json(fields: Mapping[str, str | float]) -> str:
    return json.dumps(fields, separators=(",", ":"))


def _state_payload(value: OAuthState, *, expires_at: float) -> str:
    return _compact_json(
        {"user_id": value.user_id, "redirect_uri": value.redirect_uri, "expires_at": round(expires_at, 3)}
    )


def _outcome_payload(outcome: StateOutcome) -> str:
    fields: dict[str, str] = {"status": outcome.status, "user_id": outcome.user_id}
    if outcome.household_id is not None:
        fields["household_id"] = outcome.household_id
    if outcome.error_code is not None:
        fields["error_code"] = outcome.error_code
    return _compact_json(fields)


def _text(raw: Any) -> str:
    # A client built without decode_responses returns bytes.
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _decode_object(raw: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(_text(raw))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
