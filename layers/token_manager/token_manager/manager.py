"""The Sonos token lifecycle (DESIGN.md section 8): link, fetch, refresh, expire, revoke.

Everything that decides what happens to a grant lives here; storage, cache, cipher
and the Sonos client are injected so each rule can be tested on the real services.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from token_manager.cache import STATE_TTL_SECONDS, CacheUnavailable, OAuthState, RedisCache, StateOutcome
from token_manager.crypto import KeyRing, TokenCipher
from token_manager.errors import (
    AccessDenied,
    CodeExchangeUnavailable,
    ConfigurationError,
    HouseholdNotLinked,
    InvalidRedirectUri,
    InvalidRequest,
    InvalidState,
    NotConnected,
    ReconnectRequired,
    StorageUnavailable,
    TokenDecryptionError,
    TokenServiceError,
    UpstreamUnavailable,
)
from token_manager.models import ID_PATTERN, MAX_ID_CHARS, NewGrant, StoredGrant, TokenStatus, TokenUpdate
from token_manager.notifications import ReconnectNotifier
from token_manager.provider_errors import (
    SonosClientRejected,
    SonosError,
    SonosGrantRejected,
    SonosInvalidResponse,
    SonosUnavailable,
)
from token_manager.store.base import TokenStore

if TYPE_CHECKING:
    # The client imports requests: only a call that needs Sonos builds one (see runtime).
    from token_manager.provider import SonosClient, TokenResponse

logger = logging.getLogger(__name__)

STATE_BYTES = 32
MAX_CODE_LENGTH = 2048
MAX_STATE_LENGTH = 128
MAX_REDIRECT_URI_LENGTH = 2048
REFRESH_LOCK_TTL_SECONDS = 30.0
LOCK_WAIT_SECONDS = 10.0
LOCK_POLL_SECONDS = 0.025
CALLBACK_WAIT_SECONDS = 8.0
CALLBACK_POLL_SECONDS = 0.1
# Without the lock (Redis down) a refresh refused as invalid may only mean another container
# just rotated the refresh token; its write follows its Sonos answer within milliseconds.
UNLOCKED_REJECTION_GRACE_SECONDS = 1.0
UNLOCKED_REJECTION_POLL_SECONDS = 0.1
# How long a refresh the store could not take is kept for the next refresh to write: the
# refresher runs every few minutes, so once the store is back it is written within one run.
UNSTORED_REFRESH_TTL_SECONDS = 86_400

_ID_PATTERN = re.compile(ID_PATTERN)
_STATE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_ERROR_CODE_PATTERN = re.compile(r"^[a-z0-9_]{1,64}$")


class TokenState(StrEnum):
    """Freshness of a stored access token relative to its refresh point."""

    FRESH = "fresh"  # before the refresh point: serve as is
    STALE = "stale"  # past the refresh point, still valid: refresh, but serve it if the refresh fails transiently
    EXPIRED = "expired"  # past expiry: only a refreshed token will do


class RefreshOutcome(StrEnum):
    """What one refresh attempt by the background refresher came to."""

    REFRESHED = "refreshed"
    NOT_DUE = "not_due"  # someone else refreshed first, or it was not due after all
    SKIPPED = "skipped"  # another caller holds the lock
    FAILED_TRANSIENT = "failed_transient"
    FAILED_PERMANENT = "failed_permanent"  # the grant is expired: its user must connect again
    FAILED_CONFIGURATION = "failed_configuration"  # ours to fix (e.g. a key missing from the ring); grant kept
    CLIENT_REJECTED = "client_rejected"  # Sonos refuses our client: every other refresh would fail too


class Metrics(Protocol):
    def add(self, name: str, value: float = 1.0) -> None: ...


class _NoMetrics:
    def add(self, name: str, value: float = 1.0) -> None:
        return None


@dataclass(frozen=True)
class AuthorizationRequest:
    authorization_url: str
    state: str
    expires_in: int


@dataclass(frozen=True)
class LinkResult:
    user_id: str
    household_id: str
    household_ids: tuple[str, ...]
    repeated: bool = False  # a repeated callback answered from the first one's outcome


@dataclass(frozen=True)
class AccessToken:
    """What fetch returns. ``access_token`` is the only secret; keep it out of logs."""

    access_token: str
    household_id: str
    household_ids: tuple[str, ...]
    expires_at: datetime

    def __repr__(self) -> str:
        return f"AccessToken(household_id={self.household_id!r}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class RevokeResult:
    revoked: bool
    provider_revoked: bool


def utc_now() -> datetime:
    return datetime.now(UTC)


class SonosTokenManager:
    """Owns every rule about a user's Sonos grant.

    >>> manager.initiate_oauth_flow("user-1")           # doctest: +SKIP
    >>> manager.handle_oauth_callback(code, state)      # doctest: +SKIP
    >>> manager.get_token("user-1").access_token        # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        store: TokenStore,
        cache: RedisCache,
        cipher: TokenCipher,
        sonos: SonosClient,
        notifier: ReconnectNotifier,
        redirect_uris: tuple[str, ...],
        refresh_ahead_seconds: int = 300,
        reload_key_ring: Callable[[], KeyRing] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        lock_ttl_seconds: float = REFRESH_LOCK_TTL_SECONDS,
        lock_wait_seconds: float = LOCK_WAIT_SECONDS,
        lock_poll_seconds: float = LOCK_POLL_SECONDS,
        use_refresh_lock: bool = True,
    ) -> None:
        if not redirect_uris:
            raise ConfigurationError("At least one redirect URI must be registered.")
        self._store = store
        self._cache = cache
        self._cipher = cipher
        self._sonos = sonos
        self._notifier = notifier
        self._redirect_uris = redirect_uris
        self._refresh_ahead = timedelta(seconds=refresh_ahead_seconds)
        self._reload_key_ring = reload_key_ring
        self._metrics: Metrics = metrics or _NoMetrics()
        self._now = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock_ttl = lock_ttl_seconds
        self._lock_wait = lock_wait_seconds
        self._lock_poll = lock_poll_seconds
        self._use_lock = use_refresh_lock

    # ------------------------------------------------------------------ OAuth

    def initiate_oauth_flow(self, user_id: str, redirect_uri: str | None = None) -> AuthorizationRequest:
        """Store a single-use CSRF state (10 minutes) and build the Sonos authorize URL."""
        user_id = _require_id("userId", user_id)
        if redirect_uri is None or redirect_uri == "":
            redirect_uri = self._redirect_uris[0]
        elif not isinstance(redirect_uri, str) or len(redirect_uri) > MAX_REDIRECT_URI_LENGTH:
            raise InvalidRequest("redirectUri must be a string of at most 2048 characters.")
        elif redirect_uri not in self._redirect_uris:  # exact, byte-identical match only
            raise InvalidRedirectUri()
        state = secrets.token_urlsafe(STATE_BYTES)
        self._cache.put_state(state, OAuthState(user_id=user_id, redirect_uri=redirect_uri))
        url = self._sonos.authorize_url(state=state, redirect_uri=redirect_uri)
        logger.info("oauth flow initiated", extra={"user_id": user_id})
        return AuthorizationRequest(authorization_url=url, state=state, expires_in=STATE_TTL_SECONDS)

    def handle_oauth_callback(self, code: str | None, state: str | None, error: str | None = None) -> LinkResult:
        """Complete the flow: one code exchange per state, households, encrypted storage.

        A repeated callback for a state already consumed (double click, API Gateway
        retry) answers like the first one and makes no second token request.
        """
        if not state or not isinstance(state, str) or len(state) > MAX_STATE_LENGTH:
            raise InvalidState()
        if not _STATE_PATTERN.match(state):
            raise InvalidState()
        if error is not None:
            return self._deny(state, error)
        if not code or not isinstance(code, str) or len(code) > MAX_CODE_LENGTH:
            raise InvalidRequest("The callback has no authorization code.")

        waiting = self._cache.peek_state(state)
        if waiting is not None:
            # The grant must have somewhere to go before the state is consumed and the code
            # spent: with the store down the browser gets storage_unavailable, and reloading
            # the page once the store is back completes the link with the same code.
            self._store.get(waiting.user_id)
        pending = self._cache.consume_state(state)
        if pending is None:
            return self._answer_repeated_callback(state)
        try:
            result = self._link(pending, code)
        except CodeExchangeUnavailable:
            # Sonos did not answer the exchange, so the code may still be good: reopen the
            # state, and reloading the page tries again instead of ending on a dead link.
            last_try = StateOutcome(status="failed", user_id=pending.user_id, error_code=UpstreamUnavailable.code)
            if not self._cache.reopen_state(state, pending, last_try):
                self._cache_outcome(state, last_try)
                raise UpstreamUnavailable() from None
            logger.info("oauth state reopened after sonos did not answer", extra={"user_id": pending.user_id})
            raise
        except TokenServiceError as exc:
            self._cache_outcome(state, StateOutcome(status="failed", user_id=pending.user_id, error_code=exc.code))
            raise
        self._cache_outcome(
            state, StateOutcome(status="linked", user_id=result.user_id, household_id=result.household_id)
        )
        return result

    def _deny(self, state: str, error: str) -> LinkResult:
        pending = self._cache.consume_state(state)
        if pending is None:
            outcome = self._cache.get_outcome(state)
            if outcome is not None and outcome.error_code == AccessDenied.code:
                raise AccessDenied()
            raise InvalidState()
        self._cache_outcome(state, StateOutcome(status="failed", user_id=pending.user_id, error_code="access_denied"))
        if error == "access_denied":
            logger.info("oauth access denied by user", extra={"user_id": pending.user_id})
            raise AccessDenied()
        code = error if _ERROR_CODE_PATTERN.match(error) else "unknown"
        logger.info("oauth authorization failed", extra={"user_id": pending.user_id, "provider_error": code})
        raise AccessDenied(f"Sonos did not authorize the link ({code}).")

    def _answer_repeated_callback(self, state: str) -> LinkResult:
        deadline = self._monotonic() + CALLBACK_WAIT_SECONDS
        while True:
            outcome = self._cache.get_outcome(state)
            if outcome is None:
                raise InvalidState()
            if outcome.status == "linked":
                grant = self._store.get(outcome.user_id)
                if grant is None or grant.token_status is not TokenStatus.ACTIVE:
                    raise InvalidState()
                return LinkResult(
                    user_id=grant.user_id,
                    household_id=grant.household_id,
                    household_ids=grant.household_ids,
                    repeated=True,
                )
            if outcome.status == "failed":
                raise _error_for_code(outcome.error_code)
            if self._monotonic() >= deadline:  # the first callback is still exchanging the code
                raise UpstreamUnavailable("The link is still being completed; reload the page in a moment.")
            self._sleep(CALLBACK_POLL_SECONDS)

    def _link(self, pending: OAuthState, code: str) -> LinkResult:
        with _sonos_errors(operation="code exchange", unavailable=CodeExchangeUnavailable):
            tokens = self._sonos.exchange_code(code, pending.redirect_uri)
        try:
            return self._keep_new_grant(pending, tokens)
        except BaseException:
            # Sonos issued a grant we cannot keep: revoke it (best effort) rather than leave it behind.
            provider_revoked = self._sonos.revoke(tokens.refresh_token or tokens.access_token)
            logger.info(
                "new sonos grant abandoned", extra={"user_id": pending.user_id, "provider_revoked": provider_revoked}
            )
            raise

    def _keep_new_grant(self, pending: OAuthState, tokens: TokenResponse) -> LinkResult:
        if not tokens.refresh_token:
            raise UpstreamUnavailable("Sonos returned no refresh token; the link cannot be kept fresh.")
        with _sonos_errors(operation="household discovery"):
            households = tuple(self._sonos.list_households(tokens.access_token))
        if not households:
            raise HouseholdNotLinked("This Sonos account has no household yet. Set up Sonos, then connect again.")
        now = self._now()
        user_id = pending.user_id
        grant = self._store.link(
            NewGrant(
                user_id=user_id,
                household_id=households[0],
                household_ids=households,
                access_token_encrypted=self._cipher.encrypt(tokens.access_token, user_id=user_id, field="access_token"),
                refresh_token_encrypted=self._cipher.encrypt(
                    tokens.refresh_token, user_id=user_id, field="refresh_token"
                ),
                encryption_key_id=self._cipher.active_key_id,
                expires_at=now + timedelta(seconds=tokens.expires_in),
                scope=tokens.scope or "",
                last_refreshed_at=now,
            )
        )
        self._cache.unblock_token(user_id)  # a new grant: drop the old one's cache entry and allow fills
        self._metrics.add("GrantLinked")
        logger.info("sonos account linked", extra={"user_id": user_id, "households": len(households)})
        return LinkResult(user_id=user_id, household_id=grant.household_id, household_ids=grant.household_ids)

    def _cache_outcome(self, state: str, outcome: StateOutcome) -> None:
        try:
            self._cache.record_outcome(state, outcome)
        except TokenServiceError:  # the link itself is done; only a repeated callback loses its answer
            logger.warning("could not record oauth outcome", extra={"user_id": outcome.user_id})

    # ------------------------------------------------------------------ fetch

    def get_token(self, user_id: str, household_id: str | None = None) -> AccessToken:
        """A valid access token, refreshed first when it is past its refresh point."""
        user_id = _require_id("userId", user_id)
        if household_id is not None:
            household_id = _require_id("householdId", household_id)
        cached = self._read_cache(user_id)
        if cached is not None and self._now() < cached.refresh_at:
            self._metrics.add("CacheHit")
            return _for_household(cached.token, household_id)
        self._metrics.add("CacheMiss")
        grant = self._active_grant(user_id)
        _check_household(grant, household_id)
        if self.token_state(grant) is TokenState.FRESH:
            token = self._to_access_token(grant)
            self._fill_cache(grant, token)
            return _for_household(token, household_id)
        return _for_household(self._refresh_for_caller(grant).token, household_id)

    def token_state(self, grant: StoredGrant) -> TokenState:
        now = self._now()
        if grant.expires_at is None or now >= grant.expires_at:
            return TokenState.EXPIRED
        return TokenState.FRESH if now < self.refresh_point(grant) else TokenState.STALE

    def refresh_point(self, grant: StoredGrant) -> datetime:
        """When a grant's token is due for refresh.

        Normally ``refresh_ahead`` before expiry. A token that lives no longer than the
        window (Sonos answering ``expires_in: 60`` with a 300 s window) is due at half
        its lifetime instead, so a refresh does not fire again on every fetch.
        """
        assert grant.expires_at is not None
        ahead = self._refresh_ahead
        if grant.last_refreshed_at is not None:
            lifetime = grant.expires_at - grant.last_refreshed_at
            if lifetime <= ahead * 2:
                ahead = max(lifetime / 2, timedelta(0))
        return grant.expires_at - ahead

    # ---------------------------------------------------------------- refresh

    def refresh_token(self, user_id: str) -> AccessToken:
        """Refresh now (single flight), whatever the token's freshness."""
        user_id = _require_id("userId", user_id)
        grant = self._active_grant(user_id)
        return self._refresh_for_caller(grant, due_before=datetime.max.replace(tzinfo=UTC)).token

    def refresh_if_due(self, grant: StoredGrant, due_before: datetime) -> RefreshOutcome:
        """The background refresher's step: refresh if due before ``due_before``; never waits
        for another caller's lock and never raises for the grant's own trouble."""
        try:
            if self._use_lock and self._cache.lock_held(grant.user_id):
                return RefreshOutcome.SKIPPED
        except CacheUnavailable:
            pass  # the store's version check still keeps refreshes single
        try:
            result = self._refresh_for_caller(grant, due_before=due_before, wait_for_lock=False)
        except _LockBusy:
            return RefreshOutcome.SKIPPED
        except (ReconnectRequired, NotConnected):
            return RefreshOutcome.FAILED_PERMANENT
        except _TransientFailure:
            return RefreshOutcome.FAILED_TRANSIENT
        except _ClientRejected:
            return RefreshOutcome.CLIENT_REJECTED
        except ConfigurationError:
            return RefreshOutcome.FAILED_CONFIGURATION
        except TokenServiceError as exc:
            logger.warning("refresh failed", extra={"user_id": grant.user_id, "code": exc.code})
            return RefreshOutcome.FAILED_TRANSIENT if exc.retryable else RefreshOutcome.FAILED_PERMANENT
        return RefreshOutcome.REFRESHED if result.refreshed else RefreshOutcome.NOT_DUE

    def _refresh_for_caller(
        self, grant: StoredGrant, *, due_before: datetime | None = None, wait_for_lock: bool = True
    ) -> _Refreshed:
        """Single flight: take the lock and refresh, or wait for the holder's result."""
        deadline = self._monotonic() + self._lock_wait
        while True:
            owner: str | None = None
            busy = False
            if self._use_lock:
                try:
                    owner = self._cache.acquire_lock(grant.user_id, self._lock_ttl)
                    busy = owner is None
                except CacheUnavailable:
                    logger.warning(
                        "refresh lock unavailable; relying on the version check", extra={"user_id": grant.user_id}
                    )
            if not busy:
                try:
                    return self._refresh_holding_lock(grant, due_before or self._now(), exclusive=owner is not None)
                except _TransientFailure as failure:
                    if not wait_for_lock:
                        raise
                    return _Refreshed(self._fallback_after_transient(failure.grant), refreshed=False)
                finally:
                    if owner is not None:
                        self._cache.release_lock(grant.user_id, owner)
            if not wait_for_lock:
                raise _LockBusy()
            token = self._wait_for_holder(grant, deadline)
            if token is not None:
                return _Refreshed(token, refreshed=False)
            # The holder ended without a newer token (it crashed, or its lock expired): try ourselves.
            grant = self._active_grant(grant.user_id)

    def _wait_for_holder(self, grant: StoredGrant, deadline: float) -> AccessToken | None:
        """Wait for another caller's refresh; return its token, or None to try ourselves."""
        while self._monotonic() < deadline:
            self._sleep(self._lock_poll)
            cached = self._read_cache(grant.user_id)
            if cached is not None and grant.expires_at is not None and cached.token.expires_at > grant.expires_at:
                self._metrics.add("RefreshWaitedForHolder")
                return cached.token
            try:
                if self._cache.lock_held(grant.user_id):
                    continue
            except CacheUnavailable:
                pass
            current = self._active_grant(grant.user_id)
            if current.version == grant.version:
                return None
            if _was_refreshed_since(grant, current) or self.token_state(current) is TokenState.FRESH:
                return self._to_access_token(current)
            # The holder tried and failed transiently (it recorded the failure): do not pile on.
            return self._fallback_after_transient(current)
        return self._fallback_after_transient(self._active_grant(grant.user_id))

    def _fallback_after_transient(self, grant: StoredGrant) -> AccessToken:
        """Rule 1: a still-valid token is returned when the early refresh fails transiently."""
        if self.token_state(grant) is not TokenState.EXPIRED:
            return self._to_access_token(grant)
        raise UpstreamUnavailable()

    def _refresh_holding_lock(self, grant: StoredGrant, due_before: datetime, *, exclusive: bool) -> _Refreshed:
        # Re-read under the lock: whoever held it before us may already have refreshed.
        current = self._active_grant(grant.user_id)
        written = self._write_unstored_refresh(current)
        if written is not None:
            current = written
            if self.refresh_point(current) > due_before:
                return _Refreshed(self._to_access_token(current), refreshed=True)
        if current.expires_at is not None and self.refresh_point(current) > due_before:
            return _Refreshed(self._to_access_token(current), refreshed=False)
        refresh_token = self._decrypt(current, "refresh_token")
        try:
            tokens = self._sonos.refresh(refresh_token)
        except SonosGrantRejected as exc:
            return _Refreshed(self._on_grant_rejected(current, exc.error_code, exclusive=exclusive), refreshed=False)
        except SonosClientRejected as exc:
            self._metrics.add("RefreshFailedConfiguration")
            logger.error("sonos rejected our client", extra={"user_id": current.user_id, "status": exc.status})
            raise _client_rejected(exc) from None
        except (SonosUnavailable, SonosInvalidResponse) as exc:
            return _Refreshed(self._on_transient_failure(current, exc), refreshed=False)
        return self._persist_refresh(current, tokens)

    def _persist_refresh(self, grant: StoredGrant, tokens: TokenResponse) -> _Refreshed:
        now = self._now()
        user_id = grant.user_id
        # Rule 3: a non-empty rotated refresh token replaces the stored one; none keeps the old one.
        refresh_plain = tokens.refresh_token or self._decrypt(grant, "refresh_token")
        update = TokenUpdate(
            access_token_encrypted=self._cipher.encrypt(tokens.access_token, user_id=user_id, field="access_token"),
            refresh_token_encrypted=self._cipher.encrypt(refresh_plain, user_id=user_id, field="refresh_token"),
            encryption_key_id=self._cipher.active_key_id,
            expires_at=now + timedelta(seconds=tokens.expires_in),
            scope=tokens.scope,
            last_refreshed_at=now,
        )
        # Persisted before anything else: a rotated refresh token must never live only in memory.
        try:
            stored = self._store.update_tokens(user_id, grant.version, update)
        except StorageUnavailable:
            if tokens.refresh_token:
                # Sonos rotated the refresh token, and the old one may be dead already.
                self._keep_unstored_refresh(grant, update)
            raise
        if stored is None:
            # Lost the race: revoked meanwhile (write nothing back) or refreshed by another container.
            self._metrics.add("RefreshLostRace")
            winner = self._store.get(user_id)
            if winner is None or winner.token_status is not TokenStatus.ACTIVE:
                logger.info("refresh finished after the grant ended; discarded", extra={"user_id": user_id})
                raise NotConnected() if winner is None else ReconnectRequired()
            return _Refreshed(self._to_access_token(winner), refreshed=False)
        self._metrics.add("RefreshSucceeded")
        logger.info(
            "token refreshed",
            extra={"user_id": user_id, "expires_in": tokens.expires_in, "rotated": bool(tokens.refresh_token)},
        )
        token = AccessToken(
            access_token=tokens.access_token,
            household_id=stored.household_id,
            household_ids=stored.household_ids,
            expires_at=update.expires_at,
        )
        self._fill_cache(stored, token)
        return _Refreshed(token, refreshed=True)

    def _keep_unstored_refresh(self, grant: StoredGrant, update: TokenUpdate) -> None:
        """Keep a refresh the store could not take in Redis (ciphertexts only), so the next
        refresh writes it instead of sending Sonos a refresh token Sonos already replaced."""
        record = json.dumps(
            {
                "basedOnVersion": grant.version,
                "accessTokenEncrypted": update.access_token_encrypted,
                "refreshTokenEncrypted": update.refresh_token_encrypted,
                "encryptionKeyId": update.encryption_key_id,
                "expiresAt": update.expires_at.isoformat(),
                "scope": update.scope,
                "lastRefreshedAt": update.last_refreshed_at.isoformat() if update.last_refreshed_at else None,
            },
            separators=(",", ":"),
        )
        kept = self._cache.keep_unstored_refresh(grant.user_id, record, UNSTORED_REFRESH_TTL_SECONDS)
        logger.error(
            "refreshed tokens could not be stored",
            extra={"user_id": grant.user_id, "kept_for_the_next_refresh": kept},
        )

    def _write_unstored_refresh(self, current: StoredGrant) -> StoredGrant | None:
        """Write a kept refresh if it was made from the row as it still is; the written row.

        A kept refresh made from another version is outdated (the row moved on: written after
        all, refreshed again, re-linked) and is dropped. A store still down raises
        StorageUnavailable and the kept refresh waits for the next try.
        """
        raw = self._cache.unstored_refresh(current.user_id)
        if raw is None:
            return None
        kept = _unstored_update(raw)
        if kept is None or kept[0] != current.version:
            self._cache.forget_unstored_refresh(current.user_id)
            return None
        stored = self._store.update_tokens(current.user_id, current.version, kept[1])
        self._cache.forget_unstored_refresh(current.user_id)
        if stored is None:
            return None
        self._metrics.add("UnstoredRefreshWritten")
        logger.warning("refreshed tokens kept after a store failure are now stored", extra={"user_id": current.user_id})
        self._fill_cache(stored, self._to_access_token(stored))
        return stored

    def _on_grant_rejected(self, grant: StoredGrant, error_code: str, *, exclusive: bool) -> AccessToken:
        # Rule 5: if another container refreshed while we failed, its token is the answer.
        current = self._store.get(grant.user_id)
        if not exclusive:
            # No lock: Sonos may have refused a refresh token that a concurrent refresh had just
            # rotated, and that refresh's write may not have landed yet. Expiring now would make
            # its write lose and throw a working grant away, so give it a moment first.
            deadline = self._monotonic() + UNLOCKED_REJECTION_GRACE_SECONDS
            while current is not None and not _was_refreshed_since(grant, current) and self._monotonic() < deadline:
                self._sleep(UNLOCKED_REJECTION_POLL_SECONDS)
                current = self._store.get(grant.user_id)
        if current is None:
            raise NotConnected()
        if current.token_status is TokenStatus.ACTIVE and _was_refreshed_since(grant, current):
            return self._to_access_token(current)
        self._metrics.add("RefreshFailedPermanent")
        self.mark_token_expired(grant.user_id, error_code, expected_version=current.version)
        after = self._store.get(grant.user_id)
        if after is not None and after.token_status is TokenStatus.ACTIVE and _was_refreshed_since(grant, after):
            return self._to_access_token(after)  # the mark lost to a concurrent successful refresh
        raise ReconnectRequired()

    def _on_transient_failure(self, grant: StoredGrant, exc: SonosError) -> AccessToken:
        self._metrics.add("RefreshFailedTransient")
        logger.warning("refresh failed transiently", extra={"user_id": grant.user_id, "error": type(exc).__name__})
        # Bumps the version, which tells callers waiting on the lock not to pile on.
        self._store.record_refresh_failure(grant.user_id, grant.version, "upstream_unavailable")
        current = self._active_grant(grant.user_id)
        if _was_refreshed_since(grant, current):
            return self._to_access_token(current)  # another container refreshed meanwhile
        raise _TransientFailure(current)

    # ------------------------------------------------------------- expire/revoke

    def mark_token_expired(self, user_id: str, reason: str, *, expected_version: int | None = None) -> bool:
        """Mark the grant expired, clear its tokens and cache, and notify once.

        Returns True when this call changed the grant's state (and so sent the event).
        """
        reason = reason if _ERROR_CODE_PATTERN.match(reason or "") else "unknown"
        changed = self._store.mark_expired(user_id, reason, expected_version)
        self._cache.block_token(user_id)
        if changed:
            logger.warning("grant expired; reconnect required", extra={"user_id": user_id, "reason": reason})
            self._notifier.reconnect_required(user_id, reason)
            self._metrics.add("ReconnectRequired")
        return changed

    def revoke_token(self, user_id: str, household_id: str | None = None) -> RevokeResult:
        """Drop the cached token, revoke at the provider (best effort), delete the row and lock. Idempotent.

        All or nothing for the caller: when Redis cannot drop the cached token, nothing else
        happens and the answer is ``storage_unavailable``, so the caller retries. Deleting the
        row anyway would leave the token in a Redis that is only unreachable (a partition, a
        failover), to be served again to a user who disconnected, once it answers.
        """
        user_id = _require_id("userId", user_id)
        if household_id is not None:
            household_id = _require_id("householdId", household_id)
        grant = self._store.get(user_id)
        if grant is not None:
            _check_household(grant, household_id)
        if not self._cache.block_token(user_id):
            logger.warning("revoke refused: the cached token could not be dropped", extra={"user_id": user_id})
            raise StorageUnavailable()
        provider_revoked = False
        if grant is not None and grant.refresh_token_encrypted is not None:
            try:
                provider_revoked = self._sonos.revoke(self._decrypt(grant, "refresh_token"))
            except TokenServiceError:
                logger.warning("provider revocation skipped: token unreadable", extra={"user_id": user_id})
        deleted = self._store.delete(user_id)
        self._cache.delete_lock(user_id)
        if deleted:
            self._metrics.add("GrantRevoked")
            logger.info("grant revoked", extra={"user_id": user_id, "provider_revoked": provider_revoked})
        return RevokeResult(revoked=deleted, provider_revoked=provider_revoked)

    # ---------------------------------------------------------------- helpers

    def _active_grant(self, user_id: str) -> StoredGrant:
        grant = self._store.get(user_id)
        if grant is None or grant.token_status is TokenStatus.REVOKED:
            raise NotConnected()
        if grant.token_status is TokenStatus.EXPIRED:
            raise ReconnectRequired()
        return grant

    def _to_access_token(self, grant: StoredGrant) -> AccessToken:
        assert grant.expires_at is not None
        return AccessToken(
            access_token=self._decrypt(grant, "access_token"),
            household_id=grant.household_id,
            household_ids=grant.household_ids,
            expires_at=grant.expires_at,
        )

    def _decrypt(self, grant: StoredGrant, field: str) -> str:
        ciphertext = grant.access_token_encrypted if field == "access_token" else grant.refresh_token_encrypted
        if ciphertext is None:
            raise ReconnectRequired()
        if not self._cipher.knows(grant.encryption_key_id) and self._reload_key_ring is not None:
            # Another container rotated the ring after this one loaded it.
            self._cipher = TokenCipher(self._reload_key_ring())
        try:
            return self._cipher.decrypt(ciphertext, key_id=grant.encryption_key_id, user_id=grant.user_id, field=field)
        except TokenDecryptionError:
            self._metrics.add("DecryptFailed")
            logger.error(
                "stored token does not decrypt", extra={"user_id": grant.user_id, "key_id": grant.encryption_key_id}
            )
            raise ConfigurationError("A stored token cannot be decrypted with the configured key ring.") from None

    def _read_cache(self, user_id: str) -> _CachedToken | None:
        blob = self._cache.get_token(user_id)
        if blob is None:
            return None
        try:
            key_id, _, ciphertext = blob.partition(".")
            data = json.loads(self._cipher.decrypt(ciphertext, key_id=key_id, user_id=user_id, field="cache"))
            token = AccessToken(
                access_token=data["accessToken"],
                household_id=data["householdId"],
                household_ids=tuple(data["householdIds"]),
                expires_at=datetime.fromisoformat(data["expiresAt"]),
            )
            return _CachedToken(token, refresh_at=datetime.fromisoformat(data["refreshAt"]))
        except (TokenDecryptionError, ValueError, KeyError, TypeError):
            # An entry from another key ring or format is just a miss.
            self._cache.delete_token(user_id)
            return None

    def _fill_cache(self, grant: StoredGrant, token: AccessToken) -> None:
        refresh_at = self.refresh_point(grant)
        ttl = (refresh_at - self._now()).total_seconds()
        if ttl <= 0:
            return
        payload = json.dumps(
            {
                "accessToken": token.access_token,
                "householdId": token.household_id,
                "householdIds": list(token.household_ids),
                "expiresAt": token.expires_at.isoformat(),
                "refreshAt": refresh_at.isoformat(),
            },
            separators=(",", ":"),
        )
        blob = self._cipher.active_key_id + "." + self._cipher.encrypt(payload, user_id=grant.user_id, field="cache")
        self._cache.set_token(grant.user_id, blob, ttl)


@dataclass(frozen=True)
class _CachedToken:
    token: AccessToken
    refresh_at: datetime


@dataclass(frozen=True)
class _Refreshed:
    token: AccessToken
    refreshed: bool  # False: another caller's token, or not due after all


class _LockBusy(Exception):
    """Another caller holds the refresh lock (the refresher skips such grants)."""


class _TransientFailure(Exception):
    """A refresh failed transiently; the caller decides whether the old token still serves."""

    def __init__(self, grant: StoredGrant) -> None:
        super().__init__("transient refresh failure")
        self.grant = grant


def _unstored_update(raw: str) -> tuple[int, TokenUpdate] | None:
    """The (version it was made from, update) of a kept refresh; ``None`` when unreadable."""
    try:
        fields = json.loads(raw)
        last_refreshed_at = fields["lastRefreshedAt"]
        return int(fields["basedOnVersion"]), TokenUpdate(
            access_token_encrypted=str(fields["accessTokenEncrypted"]),
            refresh_token_encrypted=str(fields["refreshTokenEncrypted"]),
            encryption_key_id=str(fields["encryptionKeyId"]),
            expires_at=datetime.fromisoformat(fields["expiresAt"]),
            scope=fields["scope"] if isinstance(fields["scope"], str) else None,
            last_refreshed_at=datetime.fromisoformat(last_refreshed_at) if last_refreshed_at else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


def _was_refreshed_since(before: StoredGrant, after: StoredGrant) -> bool:
    return after.last_refreshed_at != before.last_refreshed_at or after.expires_at != before.expires_at


class _sonos_errors:
    """Maps Sonos client failures during linking to the service's error codes."""

    def __init__(self, *, operation: str, unavailable: type[UpstreamUnavailable] = UpstreamUnavailable) -> None:
        self._operation = operation
        self._unavailable = unavailable

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or not isinstance(exc, SonosError):
            return
        logger.warning("sonos %s failed", self._operation, extra={"error": type(exc).__name__})
        if isinstance(exc, SonosClientRejected):
            raise _client_rejected(exc) from None
        if isinstance(exc, SonosGrantRejected):
            raise InvalidState("The authorization code is expired or was already used. Start again.") from None
        if isinstance(exc, SonosInvalidResponse):
            raise UpstreamUnavailable(f"Sonos returned an unusable answer during {self._operation}.") from None
        raise self._unavailable() from None


class _ClientRejected(ConfigurationError):
    """Sonos refused our client: a configuration error that every grant shares."""


def _client_rejected(exc: SonosClientRejected) -> _ClientRejected:
    """Our configuration, named as precisely as Sonos's answer allows (status and error code only)."""
    if exc.error_code == "invalid_client":
        return _ClientRejected("Sonos rejected the client credentials (invalid_client).")
    answer = f"HTTP {exc.status}" if exc.status is not None else "a request error"
    return _ClientRejected(
        f"Sonos refused this service's request ({answer}): check the Sonos client settings and URLs."
    )


def _require_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name} is required and must be a non-empty string.")
    if len(value) > MAX_ID_CHARS or not _ID_PATTERN.match(value):
        raise InvalidRequest(f"{name} must be at most {MAX_ID_CHARS} printable characters without spaces.")
    return value


def _check_household(grant: StoredGrant, household_id: str | None) -> None:
    if household_id is not None and household_id not in grant.household_ids:
        raise HouseholdNotLinked()


def _for_household(token: AccessToken, household_id: str | None) -> AccessToken:
    if household_id is None or household_id == token.household_id:
        return token
    if household_id not in token.household_ids:
        raise HouseholdNotLinked()
    return AccessToken(
        access_token=token.access_token,
        household_id=household_id,
        household_ids=token.household_ids,
        expires_at=token.expires_at,
    )


def _error_for_code(code: str | None) -> TokenServiceError:
    from token_manager.errors import ALL_ERRORS

    for error_type in ALL_ERRORS:
        if error_type.code == code:
            return error_type()
    return InvalidState()
