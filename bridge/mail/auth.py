"""OAuth2 for the mail logins: where an access token comes from, and the one retry a refusal gets.

The logins (IMAP in mail/imap.py, SMTP in mail/smtp.py) see only a TokenSource; bridge/oauth.py
implements it per account (refresh before expiry, the encrypted store, revocation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class TokenSource(Protocol):
    """One account's OAuth2 access tokens."""

    async def token(self) -> str:
        """A current access token (refreshed first when it is about to expire).

        Raises SignInNeeded when the account must sign in again, TemporaryMailError while the
        token endpoint is unreachable and no unexpired token is left.
        """
        ...

    async def refused(self, token: str) -> str:
        """The server refused `token`: a fresh one to try once more, or SignInNeeded when a
        freshly refreshed token was refused too (the grant counts as revoked)."""
        ...


async def with_token(
    tokens: TokenSource,
    attempt: Callable[[str], Awaitable[T]],
    is_refusal: Callable[[BaseException], bool],
) -> T:
    """`attempt(token)`; when the server refuses the login, once more with a refreshed token.

    RFC 6750 §3.1: a refused bearer token (invalid_token) may be expired or revoked early; a
    refresh tells which. A second refusal goes back to the source, which then gives up.
    """
    token = await tokens.token()
    try:
        return await attempt(token)
    except Exception as exc:
        if not is_refusal(exc):
            raise
    fresh = await tokens.refused(token)
    try:
        return await attempt(fresh)
    except Exception as exc:
        if is_refusal(exc):
            await tokens.refused(fresh)  # raises SignInNeeded: a fresh token was refused too
        raise
