"""The bridge's exceptions: one root, one class per kind of failure a user must tell apart."""


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A setting is missing or invalid; the message names the BRIDGE_... variable (exit 2)."""


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
