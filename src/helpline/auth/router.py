"""`/auth` (accounts, tokens, sessions, API keys) and `/admin/users` (SPEC.md: Auth)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from helpline.auth import service as auth_service
from helpline.auth.dependencies import (
    AdminUser,
    AuthEnv,
    Client,
    CurrentAuth,
    CurrentUser,
    get_admin_user,
)
from helpline.auth.models import UserRole
from helpline.auth.schemas import (
    AccountDeletion,
    AdminUserCreate,
    AdminUserUpdate,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    GuestRequest,
    IdentifyRequest,
    LoginRead,
    LogoutRequest,
    PasswordChange,
    RefreshRequest,
    TokenResponse,
    UserRead,
    UserRegister,
    UserUpdate,
)
from helpline.auth.security import TokenPair
from helpline.core.database import DbSession
from helpline.core.errors import error_responses
from helpline.kit.schemas import ItemList, Page

router = APIRouter(prefix="/auth", tags=["auth"])
# Every route here is for administrators; the dependency is resolved once per request.
admin_router = APIRouter(
    prefix="/admin/users", tags=["admin"], dependencies=[Depends(get_admin_user)]
)

AUTHENTICATED = (401, 403)


def _tokens(pair: TokenPair) -> TokenResponse:
    return TokenResponse(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        expires_in=pair.expires_in,
    )


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(409, 422),
)
async def register_user(session: DbSession, data: UserRegister) -> UserRead:
    """Create a customer account."""
    user = await auth_service.register(session, data=data)
    return UserRead.model_validate(user)


@router.post("/token", responses=error_responses(401, 403, 422, 429))
async def create_token(
    session: DbSession,
    env: AuthEnv,
    client: Client,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
) -> TokenResponse:
    """Sign in with username and password (OAuth2 password form); opens a new login."""
    pair = await auth_service.login(
        session, env=env, username=form.username, password=form.password, client=client
    )
    return _tokens(pair)


@router.post("/refresh", responses=error_responses(401, 403, 422))
async def refresh_token(env: AuthEnv, data: RefreshRequest) -> TokenResponse:
    """Exchange a refresh token for a new pair; replaying a spent one revokes its login."""
    return _tokens(await auth_service.refresh(env, refresh_token=data.refresh_token))


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(*AUTHENTICATED, 422),
)
async def logout(
    session: DbSession,
    env: AuthEnv,
    auth: CurrentAuth,
    data: Annotated[LogoutRequest | None, Body()] = None,
) -> None:
    """End the current login: its access and refresh tokens stop working at once."""
    await auth_service.logout(
        session, env=env, auth=auth, refresh_token=data.refresh_token if data else None
    )


@router.post(
    "/guest",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(422, 429),
)
async def create_guest(
    session: DbSession,
    env: AuthEnv,
    client: Client,
    data: Annotated[GuestRequest | None, Body()] = None,
) -> TokenResponse:
    """Create an anonymous customer (a chat-widget visitor) and return its token pair."""
    pair = await auth_service.create_guest(
        session, env=env, display_name=data.display_name if data else None, client=client
    )
    return _tokens(pair)


@router.post("/identify", responses=error_responses(401, 403, 404, 422))
async def identify_customer(
    session: DbSession, env: AuthEnv, client: Client, data: IdentifyRequest
) -> TokenResponse:
    """Sign in a customer of the host application, vouched for by an HMAC of its id."""
    return _tokens(await auth_service.identify(session, env=env, data=data, client=client))


@router.get("/me", responses=error_responses(*AUTHENTICATED))
async def read_me(user: CurrentUser) -> UserRead:
    """The signed-in user."""
    return UserRead.model_validate(user)


@router.patch("/me", responses=error_responses(*AUTHENTICATED, 422))
async def update_me(session: DbSession, user: CurrentUser, data: UserUpdate) -> UserRead:
    """Change the signed-in user's display name or e-mail."""
    updated = await auth_service.update_profile(session, user=user, data=data)
    return UserRead.model_validate(updated)


@router.delete(
    "/me",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(*AUTHENTICATED, 422, 429),
)
async def delete_me(
    session: DbSession,
    env: AuthEnv,
    auth: CurrentAuth,
    data: Annotated[AccountDeletion | None, Body()] = None,
) -> None:
    """Erase the account with its conversations and messages (guests send no password)."""
    await auth_service.delete_account(
        session, env=env, auth=auth, password=data.password if data else None
    )


@router.post(
    "/password",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(*AUTHENTICATED, 422, 429),
)
async def change_password(
    session: DbSession, env: AuthEnv, auth: CurrentAuth, data: PasswordChange
) -> None:
    """Change the password; every other login of the user is revoked."""
    await auth_service.change_password(
        session,
        env=env,
        auth=auth,
        current_password=data.current_password,
        new_password=data.new_password,
    )


@router.get("/sessions", responses=error_responses(*AUTHENTICATED))
async def list_sessions(session: DbSession, auth: CurrentAuth) -> ItemList[LoginRead]:
    """The user's active logins; `current` marks the one making this request."""
    logins = await auth_service.list_sessions(session, user=auth.user)
    return ItemList[LoginRead](
        items=[
            LoginRead(
                id=login.id,
                created_at=login.created_at,
                last_activity_at=login.last_activity_at,
                user_agent=login.user_agent,
                ip=login.ip,
                current=login.id == auth.login_id,
            )
            for login in logins
        ]
    )


@router.delete(
    "/sessions/{login_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(*AUTHENTICATED, 404),
)
async def revoke_session(
    session: DbSession, env: AuthEnv, user: CurrentUser, login_id: uuid.UUID
) -> None:
    """Revoke one of the user's logins: its tokens stop working and its sockets close."""
    await auth_service.revoke_session(session, env=env, user=user, login_id=login_id)


@router.post(
    "/api-keys",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(*AUTHENTICATED, 422),
)
async def create_api_key(
    session: DbSession, user: CurrentUser, data: ApiKeyCreate
) -> ApiKeyCreated:
    """Create an API key; the key (`hl_…`) is in this answer only."""
    api_key, key = await auth_service.create_api_key(session, user=user, name=data.name)
    return ApiKeyCreated(
        id=api_key.id,
        name=api_key.name,
        prefix=api_key.prefix,
        created_at=api_key.created_at,
        last_used_at=api_key.last_used_at,
        key=key,
    )


@router.get("/api-keys", responses=error_responses(*AUTHENTICATED))
async def list_api_keys(session: DbSession, user: CurrentUser) -> ItemList[ApiKeyRead]:
    """The user's API keys (without the keys themselves)."""
    api_keys = await auth_service.list_api_keys(session, user=user)
    return ItemList[ApiKeyRead](items=[ApiKeyRead.model_validate(key) for key in api_keys])


@router.delete(
    "/api-keys/{api_key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(*AUTHENTICATED, 404),
)
async def revoke_api_key(session: DbSession, user: CurrentUser, api_key_id: uuid.UUID) -> None:
    """Revoke an API key."""
    await auth_service.revoke_api_key(session, user=user, api_key_id=api_key_id)


@admin_router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(*AUTHENTICATED, 409, 422),
)
async def create_user(session: DbSession, data: AdminUserCreate) -> UserRead:
    """Create an account of any role."""
    user = await auth_service.admin_create_user(session, data=data)
    return UserRead.model_validate(user)


@admin_router.get("", responses=error_responses(*AUTHENTICATED, 400, 422))
async def list_users(
    session: DbSession,
    role: UserRole | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Page[UserRead]:
    """Users, newest first (keyset cursor)."""
    users, next_cursor = await auth_service.list_users(
        session, role=role, limit=limit, cursor=cursor
    )
    return Page[UserRead](
        items=[UserRead.model_validate(user) for user in users], next_cursor=next_cursor
    )


@admin_router.patch("/{user_id}", responses=error_responses(*AUTHENTICATED, 404, 409, 422))
async def update_user(
    session: DbSession, env: AuthEnv, admin: AdminUser, user_id: uuid.UUID, data: AdminUserUpdate
) -> UserRead:
    """Change a user's role or deactivate it (which revokes its logins and closes its sockets)."""
    user = await auth_service.admin_update_user(
        session, env=env, admin=admin, user_id=user_id, data=data
    )
    return UserRead.model_validate(user)
