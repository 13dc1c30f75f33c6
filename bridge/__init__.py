"""mailbridge: a Telegram bot joined to an email account."""

__version__ = "0.1.0"
