"""Who is calling: dependencies for HTTP routes and the WebSocket variant.

Other domains use `CurrentUser`, `AgentUser`, `AdminUser` (an active `User`) and, for sockets,
`authenticate_websocket`. A credential is an access JWT or an API key (`hl_…`), sent as
`Authorization: Bearer …` (sockets may also pass `?token=…`, since browsers cannot set headers).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import jwt
from fastapi import Depends, Request, WebSocket
from fastapi.security import OAuth2PasswordBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection

from helpline.auth import service as auth_service
from helpline.auth.exceptions import InactiveUser
from helpline.auth.models import User, UserRole
from helpline.auth.principal import Principal
from helpline.auth.security import TokenCodec, is_api_key
from helpline.auth.service import Authentication, AuthEnvironment, ClientInfo
from helpline.core.database import DbSession
from helpline.core.errors import Forbidden, NotAuthenticated

oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="/auth/token",
    auto_error=False,
    description="An access token from `/auth/token`, or an API key (`hl_…`).",
)


def auth_environment(app: Starlette) -> AuthEnvironment:
    """The auth collaborators of `app` (built in its lifespan)."""
    state = app.state
    return AuthEnvironment(
        settings=state.settings,
        codec=TokenCodec.from_settings(state.settings, state.jwt_secret),
        limiter=state.limiter,
        revocations=state.revocations,
        sessionmaker=state.sessionmaker,
    )


def get_auth_environment(request: Request) -> AuthEnvironment:
    return auth_environment(request.app)


def get_client_info(request: Request) -> ClientInfo:
    return ClientInfo(
        user_agent=request.headers.get("user-agent"),
        ip=request.client.host if request.client else None,
    )


AuthEnv = Annotated[AuthEnvironment, Depends(get_auth_environment)]
Client = Annotated[ClientInfo, Depends(get_client_info)]


async def get_authentication(
    session: DbSession,
    env: AuthEnv,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Authentication:
    """The credential's user, active or not (401 without a valid credential)."""
    if not token:
        raise NotAuthenticated()
    return await auth_service.authenticate(session, env=env, token=token)


async def get_active_authentication(
    auth: Annotated[Authentication, Depends(get_authentication)],
) -> Authentication:
    if not auth.user.is_active:
        raise InactiveUser()
    return auth


async def get_current_user(
    auth: Annotated[Authentication, Depends(get_authentication)],
) -> User:
    """The authenticated user, even when deactivated."""
    return auth.user


async def get_current_active_user(
    auth: Annotated[Authentication, Depends(get_active_authentication)],
) -> User:
    """The authenticated user; `403 INACTIVE_USER` when deactivated."""
    return auth.user


CurrentAuth = Annotated[Authentication, Depends(get_active_authentication)]
CurrentUser = Annotated[User, Depends(get_current_active_user)]


async def get_agent_user(user: CurrentUser) -> User:
    if user.role not in (UserRole.AGENT, UserRole.ADMIN):
        raise Forbidden("Only support agents and administrators may do this")
    return user


async def get_admin_user(user: CurrentUser) -> User:
    if user.role != UserRole.ADMIN:
        raise Forbidden("Only administrators may do this")
    return user


AgentUser = Annotated[User, Depends(get_agent_user)]
AdminUser = Annotated[User, Depends(get_admin_user)]


@dataclass(frozen=True, slots=True)
class WebSocketIdentity:
    user: Principal
    login_id: uuid.UUID | None  # None for an API key
    expires_at: datetime | None  # when the access token expires; None for an API key


def websocket_token(websocket: WebSocket) -> str | None:
    """The credential of a handshake: `?token=` first, then `Authorization: Bearer`."""
    # Parsed without caching them on `websocket`, which lives as long as the socket.
    token = QueryParams(websocket.scope.get("query_string", b"")).get("token")
    if token:
        return token
    authorization = Headers(scope=websocket.scope).get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return None


async def authenticate_websocket(websocket: WebSocket) -> WebSocketIdentity:
    """Authenticate a handshake; raises `NotAuthenticated` (or a subclass) or `InactiveUser`.

    Looked up outside any request's unit of work, which a socket outlives."""
    token = websocket_token(websocket)
    if not token:
        raise NotAuthenticated()
    env = auth_environment(websocket.app)
    credential = await auth_service.check_credential(env, token)
    auth = await auth_service.authenticate_principal(env, credential)
    if not auth.is_active:
        raise InactiveUser()
    return WebSocketIdentity(user=auth.user, login_id=auth.login_id, expires_at=auth.expires_at)


def rate_limit_key(connection: HTTPConnection) -> str:
    """Who a request counts against: the user of a validly signed token, else the client IP.

    Checked without a database round trip, so only what a signature proves counts as a user: an
    expired token still names its user (it was issued to them). API keys can't be verified
    without the database, so they count against the IP: made-up keys get no buckets of their own.
    """
    scheme, credentials = get_authorization_scheme_param(connection.headers.get("authorization"))
    token = credentials if scheme.lower() == "bearer" else connection.query_params.get("token")
    if token and not is_api_key(token):
        state = connection.app.state
        try:
            claims = jwt.decode(
                token,
                state.jwt_secret,
                algorithms=[state.settings.auth_jwt_algorithm],
                options={"verify_exp": False},
            )
            return f"user:{claims['sub']}"
        except (jwt.InvalidTokenError, KeyError):
            pass
    return f"ip:{connection.client.host if connection.client else 'unknown'}"
