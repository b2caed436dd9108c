"""Errors of the auth domain (rendered as the SPEC envelope by `core.errors`)."""

from __future__ import annotations

from helpline.core.errors import Conflict, Forbidden, NotAuthenticated, NotFound


class InvalidCredentials(NotAuthenticated):
    code = "INVALID_CREDENTIALS"
    # One message whatever was wrong, so a failed login does not reveal which usernames exist.
    message = "Incorrect username or password"


class TokenInvalid(NotAuthenticated):
    code = "TOKEN_INVALID"
    message = "The token is invalid"


class TokenExpired(NotAuthenticated):
    code = "TOKEN_EXPIRED"
    message = "The token has expired"


class TokenRevoked(NotAuthenticated):
    code = "TOKEN_REVOKED"
    message = "The token has been revoked"


class InactiveUser(Forbidden):
    code = "INACTIVE_USER"
    message = "This account is deactivated"


class UsernameTaken(Conflict):
    code = "USERNAME_TAKEN"
    message = "This username is already taken"


class UserNotFound(NotFound):
    message = "User not found"


class LoginNotFound(NotFound):
    message = "Session not found"


class ApiKeyNotFound(NotFound):
    message = "API key not found"


class IdentityDisabled(NotFound):
    message = "Identity verification is not enabled on this server"


class NoPassword(Forbidden):
    message = "This account has no password"


class CannotChangeOwnAccess(Conflict):
    message = "Administrators cannot demote or deactivate their own account"
