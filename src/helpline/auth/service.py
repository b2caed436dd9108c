"""Accounts, sign-in, token families, API keys and user administration."""

from __future__ import annotations

import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import structlog
from limits import RateLimitItem, RateLimitItemPerSecond
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.auth import repository
from helpline.auth.exceptions import (
    ApiKeyNotFound,
    CannotChangeOwnAccess,
    IdentityDisabled,
    InactiveUser,
    InvalidCredentials,
    LoginNotFound,
    NoPassword,
    TokenExpired,
    TokenInvalid,
    TokenRevoked,
    UsernameTaken,
    UserNotFound,
)
from helpline.auth.models import USER_AGENT_MAX_LENGTH, ApiKey, Login, User, UserRole
from helpline.auth.principal import Principal
from helpline.auth.revocation import Revocations
from helpline.auth.schemas import (
    AdminUserCreate,
    AdminUserUpdate,
    IdentifyRequest,
    UserRegister,
    UserUpdate,
)
from helpline.auth.security import (
    TokenClaims,
    TokenCodec,
    TokenPair,
    generate_api_key,
    hash_api_key,
    hash_password,
    is_api_key,
    new_jti,
    verify_identity_hash,
    verify_password,
)
from helpline.core.config import Settings
from helpline.core.database import driver_connection, lookup_session, on_commit, unit_of_work
from helpline.core.errors import AppError, RateLimited
from helpline.core.limiter import RateLimiter
from helpline.kit.models import utcnow

log = structlog.get_logger(__name__)

# Activity timestamps are written at most this often per login / API key.
ACTIVITY_INTERVAL = timedelta(minutes=1)
_LOGIN_FAILURES = "auth-login-failures"
_GUESTS = "auth-guests"


@dataclass(frozen=True, slots=True)
class AuthEnvironment:
    """The per-app collaborators the auth service needs (built from `app.state`)."""

    settings: Settings
    codec: TokenCodec
    limiter: RateLimiter
    revocations: Revocations
    sessionmaker: async_sessionmaker[AsyncSession]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    user_agent: str | None
    ip: str | None


@dataclass(frozen=True, slots=True)
class Authentication:
    """Who made a request, and with which credential."""

    user: User
    login_id: uuid.UUID | None  # None when an API key was used
    api_key_id: uuid.UUID | None
    expires_at: datetime | None  # when the access token expires; None for API keys


class _RecentlyTouched:
    """Process-local memo of recent activity writes, so most requests skip the UPDATE.

    Correctness does not rest on it: the UPDATE itself only writes when the stored time is
    older than the interval, which also keeps several instances from writing in turn.
    """

    def __init__(self, interval: timedelta, max_entries: int = 10_000) -> None:
        self.interval_s = interval.total_seconds()
        self.max_entries = max_entries
        self._seen: OrderedDict[uuid.UUID, float] = OrderedDict()

    def due(self, key: uuid.UUID) -> bool:
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return True


_recently_touched = _RecentlyTouched(ACTIVITY_INTERVAL)


# --- users -------------------------------------------------------------------------------


def normalize_username(username: str) -> str:
    return username.strip().lower()


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    """The user with this id, or None."""
    return await repository.get_user(session, user_id)


async def create_user(
    session: AsyncSession,
    *,
    username: str,
    password: str,
    role: UserRole | str,
    email: str | None = None,
    display_name: str | None = None,
) -> User:
    """Create an account with a password; `UsernameTaken` when the name is in use."""
    username = normalize_username(username)
    if await repository.username_exists(session, username):
        raise UsernameTaken(details={"username": username})
    user = User(
        username=username,
        password_hash=await hash_password(password),
        role=UserRole(role),
        email=email,
        display_name=display_name,
        is_active=True,
        is_guest=False,
    )
    try:
        # A savepoint, so losing a race for the name leaves the request's transaction usable.
        async with session.begin_nested():
            await repository.add_user(session, user)
    except IntegrityError as exc:
        raise UsernameTaken(details={"username": username}) from exc
    log.info("auth.user_created", user_id=str(user.id), role=user.role.value)
    return user


async def register(session: AsyncSession, *, data: UserRegister) -> User:
    """Create a customer account (self-service sign-up)."""
    return await create_user(
        session,
        username=data.username,
        password=data.password,
        role=UserRole.CUSTOMER,
        email=data.email,
        display_name=data.display_name,
    )


async def update_profile(session: AsyncSession, *, user: User, data: UserUpdate) -> User:
    """Change the caller's display name and e-mail (only the fields sent)."""
    for field in data.model_fields_set & {"display_name", "email"}:
        setattr(user, field, getattr(data, field))
    await session.flush()
    return user


# --- passwords and throttling ------------------------------------------------------------


def _failure_limit(settings: Settings) -> RateLimitItem:
    return RateLimitItemPerSecond(settings.login_max_failures, settings.login_failure_window_s)


async def _refuse_if_throttled(env: AuthEnvironment, username: str) -> None:
    status = await env.limiter.peek(_failure_limit(env.settings), _LOGIN_FAILURES, username)
    if not status.allowed:
        log.warning("auth.login_throttled", retry_after=status.retry_after)
        raise RateLimited(
            f"Too many failed sign-in attempts; try again in {status.retry_after} s",
            headers=status.headers(),
        )


async def _record_failure(env: AuthEnvironment, username: str) -> None:
    await env.limiter.hit(_failure_limit(env.settings), _LOGIN_FAILURES, username)


async def _verify_user_password(
    session: AsyncSession, env: AuthEnvironment, *, user: User | None, key: str, password: str
) -> User:
    """Check a password with the per-username failure throttle; the user on success."""
    await _refuse_if_throttled(env, key)
    valid, new_hash = await verify_password(password, user.password_hash if user else None)
    if user is None or not valid:
        await _record_failure(env, key)
        raise InvalidCredentials()
    if new_hash is not None:  # hashing parameters changed since this hash was made
        user.password_hash = new_hash
        await session.flush()
    return user


# --- logins and tokens -------------------------------------------------------------------


def _truncate(value: str | None, length: int) -> str | None:
    return value[:length] if value else None


async def _open_login(
    session: AsyncSession, env: AuthEnvironment, *, user: User, client: ClientInfo
) -> TokenPair:
    now = utcnow()
    login = Login(
        user_id=user.id,
        created_at=now,
        last_activity_at=now,
        user_agent=_truncate(client.user_agent, USER_AGENT_MAX_LENGTH),
        ip=_truncate(client.ip, 64),
        refresh_jti=new_jti(),
        expires_at=now + env.codec.refresh_ttl,
    )
    await repository.add_login(session, login)
    log.info("auth.login_opened", user_id=str(user.id), login_id=str(login.id))
    return env.codec.issue_pair(
        user_id=user.id, login_id=login.id, refresh_jti=login.refresh_jti, now=now
    )


def _publish_revocation(
    session: AsyncSession,
    env: AuthEnvironment,
    *,
    user_id: uuid.UUID,
    login_ids: Collection[uuid.UUID],
    all_logins: bool = False,
) -> None:
    """Tell the revocation lookup and its listeners, once this transaction has committed."""
    ids = frozenset(login_ids)
    if not ids and not all_logins:
        return

    async def publish() -> None:
        await env.revocations.revoke(user_id=user_id, login_ids=ids, all_logins=all_logins)

    on_commit(session, publish)


async def _revoke(
    session: AsyncSession,
    env: AuthEnvironment,
    *,
    user_id: uuid.UUID,
    login_ids: Collection[uuid.UUID],
) -> None:
    """Mark logins revoked in this transaction; publish once it has committed."""
    await repository.revoke_logins(session, login_ids, now=utcnow())
    _publish_revocation(session, env, user_id=user_id, login_ids=login_ids)


async def login(
    session: AsyncSession, *, env: AuthEnvironment, username: str, password: str, client: ClientInfo
) -> TokenPair:
    """Sign in with a username and password; opens a new login (token family)."""
    key = normalize_username(username)[:64]
    # Unknown names still cost a full hash check, so timing does not reveal which exist.
    user = await repository.get_user_by_username(session, key)
    user = await _verify_user_password(session, env, user=user, key=key, password=password)
    if not user.is_active:
        raise InactiveUser()
    await env.limiter.clear(_failure_limit(env.settings), _LOGIN_FAILURES, key)
    return await _open_login(session, env, user=user, client=client)


async def refresh(env: AuthEnvironment, *, refresh_token: str) -> TokenPair:
    """Exchange a refresh token for a new pair; a spent token revokes its whole login.

    Runs in its own unit of work rather than the request's: when reuse is detected the
    revocation must be committed even though the request then fails with 401.
    """
    claims = env.codec.decode(refresh_token, expected_type="refresh")
    now = utcnow()
    next_jti = new_jti()
    failure: AppError
    async with unit_of_work(env.sessionmaker) as session:
        rotated = await repository.rotate_refresh_jti(
            session,
            login_id=claims.login_id,
            old_jti=claims.jti,
            new_jti=next_jti,
            now=now,
            expires_at=now + env.codec.refresh_ttl,
        )
        if rotated:
            user = await repository.get_user(session, claims.user_id)
            if user is None:
                raise TokenRevoked()
            if not user.is_active:
                raise InactiveUser()
            return env.codec.issue_pair(
                user_id=user.id, login_id=claims.login_id, refresh_jti=next_jti, now=now
            )
        login_row = await repository.get_login(session, claims.login_id)
        if login_row is None or login_row.revoked_at is not None:
            failure = TokenRevoked()
        elif login_row.expires_at <= now:
            failure = TokenExpired()
        else:
            log.warning(
                "auth.refresh_token_reused",
                user_id=str(login_row.user_id),
                login_id=str(login_row.id),
            )
            await _revoke(session, env, user_id=login_row.user_id, login_ids=[login_row.id])
            failure = TokenRevoked("This refresh token was already used; the session is revoked")
    raise failure


async def logout(
    session: AsyncSession, *, env: AuthEnvironment, auth: Authentication, refresh_token: str | None
) -> None:
    """End the current login (and the one of `refresh_token`, if it is the caller's)."""
    login_ids: set[uuid.UUID] = set()
    if auth.login_id is not None:
        login_ids.add(auth.login_id)
    if refresh_token:
        # As in RFC 7009, an unusable token is no reason to fail a logout.
        try:
            claims = env.codec.decode(refresh_token, expected_type="refresh")
        except (TokenExpired, TokenInvalid):
            claims = None
        if claims is not None and claims.user_id == auth.user.id:
            login_ids.add(claims.login_id)
    await _revoke(session, env, user_id=auth.user.id, login_ids=login_ids)


async def create_guest(
    session: AsyncSession, *, env: AuthEnvironment, display_name: str | None, client: ClientInfo
) -> TokenPair:
    """Create an anonymous customer (a chat-widget visitor) and sign it in."""
    await env.limiter.enforce(env.settings.rate_limit_guest, _GUESTS, client.ip or "unknown")
    user = User(
        username=f"guest-{secrets.token_hex(8)}",
        role=UserRole.CUSTOMER,
        is_guest=True,
        is_active=True,
        display_name=display_name,
    )
    await repository.add_user(session, user)
    log.info("auth.guest_created", user_id=str(user.id))
    return await _open_login(session, env, user=user, client=client)


async def identify(
    session: AsyncSession, *, env: AuthEnvironment, data: IdentifyRequest, client: ClientInfo
) -> TokenPair:
    """Sign in a customer vouched for by the host application (HMAC of its external id)."""
    secret = env.settings.identity_secret
    if not secret:
        raise IdentityDisabled()
    if not verify_identity_hash(secret, data.external_id, data.user_hash):
        log.warning("auth.identity_hash_mismatch")
        raise InvalidCredentials("The identity hash does not match")
    profile = {
        field: getattr(data, field) for field in data.model_fields_set & {"display_name", "email"}
    }
    user = await repository.get_user_by_external_id(session, data.external_id)
    if user is None:
        user = User(
            username=f"customer-{secrets.token_hex(8)}",
            role=UserRole.CUSTOMER,
            external_id=data.external_id,
            is_active=True,
            is_guest=False,
            **profile,
        )
        try:
            async with session.begin_nested():
                await repository.add_user(session, user)
        except IntegrityError:
            # Another request created this customer first: use that account.
            user = await repository.get_user_by_external_id(session, data.external_id)
            if user is None:
                raise
        else:
            log.info("auth.identified_customer_created", user_id=str(user.id))
            profile = {}
    for field, value in profile.items():
        setattr(user, field, value)
    if not user.is_active:
        raise InactiveUser()
    return await _open_login(session, env, user=user, client=client)


@dataclass(frozen=True, slots=True)
class CheckedCredential:
    """A Bearer credential as far as it is checked before its user is read."""

    token: str
    claims: TokenClaims | None  # a valid access token's; None for an API key
    revoked: bool  # the access token's login is revoked


async def check_credential(env: AuthEnvironment, token: str) -> CheckedCredential:
    """An access token's signature, type, lifetime (401 otherwise) and revocation; an API key
    is checked with its user.

    Done before the user is read, with no pooled connection held meanwhile: the revocation
    lookup may take one of its own.
    """
    if is_api_key(token):
        return CheckedCredential(token=token, claims=None, revoked=False)
    claims = env.codec.decode(token, expected_type="access")
    revoked = await env.revocations.is_revoked(claims.login_id)
    return CheckedCredential(token=token, claims=claims, revoked=revoked)


async def authenticate(
    session: AsyncSession, *, env: AuthEnvironment, token: str
) -> Authentication:
    """Resolve a Bearer credential (access JWT or API key) to the user behind it."""
    credential = await check_credential(env, token)
    claims = credential.claims
    if claims is None:
        return await _authenticate_api_key(session, token)
    user = await repository.get_user(session, claims.user_id)
    user = _in_good_standing(user, revoked=credential.revoked)
    if _recently_touched.due(claims.login_id):
        await repository.touch_login(
            session, claims.login_id, now=utcnow(), interval=ACTIVITY_INTERVAL
        )
    return Authentication(
        user=user, login_id=claims.login_id, api_key_id=None, expires_at=claims.expires_at
    )


async def _authenticate_api_key(session: AsyncSession, token: str) -> Authentication:
    api_key = await repository.get_api_key_by_hash(session, hash_api_key(token))
    if api_key is None:
        raise TokenInvalid("The API key is invalid")
    if api_key.revoked_at is not None:
        raise TokenRevoked("The API key has been revoked")
    user = await repository.get_user(session, api_key.user_id)
    if user is None:  # pragma: no cover - keys are deleted with their user
        raise TokenRevoked()
    if _recently_touched.due(api_key.id):
        await repository.touch_api_key(
            session, api_key.id, now=utcnow(), interval=ACTIVITY_INTERVAL
        )
    return Authentication(user=user, login_id=None, api_key_id=api_key.id, expires_at=None)


@dataclass(frozen=True, slots=True)
class PrincipalAuthentication:
    """`Authentication` without the user's ORM row, for what lives long (a socket)."""

    user: Principal
    is_active: bool
    login_id: uuid.UUID | None  # None when an API key was used
    expires_at: datetime | None  # when the access token expires; None for API keys


async def authenticate_principal(
    env: AuthEnvironment, credential: CheckedCredential
) -> PrincipalAuthentication:
    """`authenticate`, for a `check_credential`ed credential, without the user's ORM row.

    For a socket's handshake: an access token costs one statement on the driver (and the
    activity write, at most once per `ACTIVITY_INTERVAL`), where an ORM session and its `get`
    cost three times the CPU (`bench/answer_db.py`). An API key is looked up as `authenticate`
    does.
    """
    claims = credential.claims
    if claims is None:
        async with lookup_session(env.sessionmaker) as session:
            auth = await _authenticate_api_key(session, credential.token)
        return PrincipalAuthentication(
            user=Principal.of(auth.user),
            is_active=auth.user.is_active,
            login_id=None,
            expires_at=None,
        )
    async with driver_connection(env.sessionmaker.kw["bind"]) as connection:
        standing = await repository.get_user_standing(connection, claims.user_id)
        user = _in_good_standing(standing, revoked=credential.revoked)
        if _recently_touched.due(claims.login_id):
            await repository.touch_login_on(
                connection, claims.login_id, now=utcnow(), interval=ACTIVITY_INTERVAL
            )
    return PrincipalAuthentication(
        user=Principal(id=user.id, role=user.role),
        is_active=user.is_active,
        login_id=claims.login_id,
        expires_at=claims.expires_at,
    )


_UserT = TypeVar("_UserT", User, repository.UserStanding)


def _in_good_standing(user: _UserT | None, *, revoked: bool) -> _UserT:
    """The user behind a valid token, unless the account is gone or the login revoked."""
    if user is None:
        raise TokenRevoked("The account no longer exists")
    if revoked:
        # Deactivation revokes every login; say why rather than only that it happened.
        raise InactiveUser() if not user.is_active else TokenRevoked()
    return user


# --- the signed-in user's account --------------------------------------------------------


async def change_password(
    session: AsyncSession,
    *,
    env: AuthEnvironment,
    auth: Authentication,
    current_password: str,
    new_password: str,
) -> None:
    """Replace the password and revoke every other login of the user."""
    user = auth.user
    if not user.has_password:
        raise NoPassword("Guest and widget accounts have no password to change")
    await _verify_user_password(
        session, env, user=user, key=user.username, password=current_password
    )
    user.password_hash = await hash_password(new_password)
    await session.flush()
    revoked = await repository.revoke_user_logins(
        session, user.id, now=utcnow(), keep=auth.login_id
    )
    _publish_revocation(session, env, user_id=user.id, login_ids=revoked)
    log.info("auth.password_changed", user_id=str(user.id), revoked_logins=len(revoked))


async def delete_account(
    session: AsyncSession, *, env: AuthEnvironment, auth: Authentication, password: str | None
) -> None:
    """Erase the user and everything that references it (ON DELETE CASCADE)."""
    user = auth.user
    if user.has_password:
        if password is None:
            raise InvalidCredentials("Your password is required to delete the account")
        await _verify_user_password(session, env, user=user, key=user.username, password=password)
    login_ids = await repository.live_login_ids(session, user.id)
    await repository.delete_user(session, user.id)
    session.expunge(user)
    _publish_revocation(session, env, user_id=user.id, login_ids=login_ids, all_logins=True)
    log.info("auth.user_deleted", user_id=str(user.id))


async def list_sessions(session: AsyncSession, *, user: User) -> list[Login]:
    """The user's logins that can still be used, most recently active first."""
    return list(await repository.list_active_logins(session, user.id, now=utcnow()))


async def revoke_session(
    session: AsyncSession, *, env: AuthEnvironment, user: User, login_id: uuid.UUID
) -> None:
    """Revoke one of the user's logins (its tokens stop working, its sockets close)."""
    login_row = await repository.get_login(session, login_id)
    if login_row is None or login_row.user_id != user.id or not login_row.is_active_at(utcnow()):
        raise LoginNotFound(f"Session {login_id} not found")
    await _revoke(session, env, user_id=user.id, login_ids=[login_id])


async def create_api_key(session: AsyncSession, *, user: User, name: str) -> tuple[ApiKey, str]:
    """A new API key for the user; the key itself is returned once and stored hashed."""
    generated = generate_api_key()
    api_key = ApiKey(
        user_id=user.id,
        name=name,
        prefix=generated.prefix,
        key_hash=generated.key_hash,
        created_at=utcnow(),
    )
    await repository.add_api_key(session, api_key)
    log.info("auth.api_key_created", user_id=str(user.id), api_key_id=str(api_key.id))
    return api_key, generated.key


async def list_api_keys(session: AsyncSession, *, user: User) -> list[ApiKey]:
    """The user's API keys that are not revoked, newest first."""
    return list(await repository.list_active_api_keys(session, user.id))


async def revoke_api_key(session: AsyncSession, *, user: User, api_key_id: uuid.UUID) -> None:
    """Revoke one of the user's API keys; it is refused from then on."""
    api_key = await repository.get_user_api_key(session, user.id, api_key_id)
    if api_key is None:
        raise ApiKeyNotFound(f"API key {api_key_id} not found")
    api_key.revoked_at = utcnow()
    await session.flush()
    log.info("auth.api_key_revoked", user_id=str(user.id), api_key_id=str(api_key_id))


# --- administration ----------------------------------------------------------------------


async def admin_create_user(session: AsyncSession, *, data: AdminUserCreate) -> User:
    """Create an account of any role."""
    return await create_user(
        session,
        username=data.username,
        password=data.password,
        role=data.role,
        email=data.email,
        display_name=data.display_name,
    )


async def list_users(
    session: AsyncSession, *, role: UserRole | None, limit: int, cursor: str | None
) -> tuple[list[User], str | None]:
    """Users, newest first, keyset-paginated."""
    return await repository.list_users(session, role=role, limit=limit, cursor=cursor)


async def admin_update_user(
    session: AsyncSession,
    *,
    env: AuthEnvironment,
    admin: User,
    user_id: uuid.UUID,
    data: AdminUserUpdate,
) -> User:
    """Change a user's role or active flag; deactivating revokes all of the user's logins."""
    user = await repository.get_user(session, user_id)
    if user is None:
        raise UserNotFound(f"User {user_id} not found")
    demoting = data.role is not None and data.role != UserRole.ADMIN
    if user.id == admin.id and (demoting or data.is_active is False):
        # Keeps the last administrator from locking everyone out by accident.
        raise CannotChangeOwnAccess()
    if data.role is not None:
        user.role = data.role
    deactivated = data.is_active is False and user.is_active
    if data.is_active is not None:
        user.is_active = data.is_active
    await session.flush()
    if deactivated:
        revoked = await repository.revoke_user_logins(session, user.id, now=utcnow())
        _publish_revocation(session, env, user_id=user.id, login_ids=revoked, all_logins=True)
        log.info("auth.user_deactivated", user_id=str(user.id), revoked_logins=len(revoked))
    return user
