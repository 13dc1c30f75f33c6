"""The bridge's exceptions: one root, one class per kind of failure a user must tell apart."""


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A setting is missing or invalid; the message names the BRIDGE_... variable (exit 2)."""


class TokenRefused(ConfigError):
    """Telegram refused the bot token (401): revoked or mistyped. Restarting will not help."""

    def __init__(self) -> None:
        super().__init__(
            "Telegram refused the bot token (BRIDGE_TELEGRAM__TOKEN): it was revoked or is "
            "mistyped; @BotFather shows the current one"
        )


class UsageError(BridgeError):
    """A chat command or option in the wrong form; the message says the right one."""


class DatabaseError(BridgeError):
    """The database cannot be used: unknown revision, locked, disk full (exit 1)."""


class MailError(BridgeError):
    """An IMAP or SMTP server could not be reached or refused us."""


class TemporaryMailError(MailError):
    """A failure worth retrying later: connection refused, timeout, a 4xx answer."""


class PermanentMailError(MailError):
    """A failure that a retry will not fix: bad login, a 5xx answer, a refused recipient."""


class LeaseLost(BridgeError):
    """Another instance took over this work (its lease expired): stop, write nothing more."""


class SignInNeeded(PermanentMailError):
    """An OAuth2 account has no usable sign-in (never signed in, revoked, expired): it is not
    retried until `mailbridge login` or /connect signs it in again."""
