"""classify(): each PTB exception, built as PTB builds it from Telegram's answer, has a verdict."""

from __future__ import annotations

import datetime as dtm

import pytest
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    EndPointNotFound,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)

from bridge.telegram.errors import MAX_REASON, TelegramFailure, Verdict, classify

TOKEN = "123456789:AAFakeTokenForMailbridgeTests_0123456"

# PTB passes the Bot API's "description" to the exception (request/_baserequest.py).
CASES = [
    (Forbidden("Forbidden: bot was kicked from the group chat"), Verdict.CHAT_GONE),
    (Forbidden("Forbidden: bot was blocked by the user"), Verdict.CHAT_GONE),
    (Forbidden("Forbidden: bot can't initiate conversation with a user"), Verdict.CHAT_GONE),
    (BadRequest("Bad Request: chat not found"), Verdict.CHAT_GONE),
    (
        BadRequest("Bad Request: not enough rights to send text messages to the chat"),
        Verdict.CHAT_GONE,
    ),
    (BadRequest("Bad Request: TOPIC_CLOSED"), Verdict.CHAT_GONE),
    (
        BadRequest(
            'Bad Request: can\'t parse entities: unsupported start tag "x" at byte offset 3'
        ),
        Verdict.BAD_HTML,
    ),
    (BadRequest("CAN'T PARSE ENTITIES: can't find end of the entity"), Verdict.BAD_HTML),
    (BadRequest("Bad Request: message thread not found"), Verdict.TOPIC_GONE),
    (BadRequest("Bad Request: message text is empty"), Verdict.BUG),
    (BadRequest("Bad Request: message is too long"), Verdict.BUG),
    (BadRequest("Bad Request: message to be replied not found"), Verdict.BUG),
    (EndPointNotFound("Not Found"), Verdict.BUG),
    (InvalidToken(), Verdict.TOKEN),
    (InvalidToken("Unauthorized"), Verdict.TOKEN),
    (
        Conflict("Conflict: terminated by other getUpdates request; make sure that only one"),
        Verdict.TRANSIENT,
    ),
    (NetworkError("Bad Gateway"), Verdict.TRANSIENT),
    (NetworkError("Internal Server Error"), Verdict.TRANSIENT),
    (TimedOut(), Verdict.TRANSIENT),
    (TelegramError("something Telegram adds next year"), Verdict.TRANSIENT),
]


@pytest.mark.parametrize(("exc", "verdict"), CASES, ids=lambda v: repr(v)[:60])
def test_verdict(exc: TelegramError, verdict: Verdict) -> None:
    failure = classify(exc)
    assert failure.verdict is verdict
    assert failure.delay is None
    assert failure.new_chat_id is None
    assert failure.reason


@pytest.mark.parametrize("retry_after", [5, dtm.timedelta(seconds=5)])
def test_retry_after_waits_what_telegram_says(
    retry_after: int | dtm.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")  # PTB 22.2+ warns about int retry_after
    failure = classify(RetryAfter(retry_after))
    assert failure == TelegramFailure(
        verdict=Verdict.RETRY_AFTER, delay=5.0, reason="flood control: retry in 5 s"
    )


def test_migrated_carries_the_new_chat_id() -> None:
    failure = classify(ChatMigrated(-1001234567890))
    assert failure.verdict is Verdict.MIGRATED
    assert failure.new_chat_id == -1001234567890
    assert failure.delay is None
    assert "-1001234567890" in failure.reason


def test_reason_names_the_kind_and_telegram_words_once() -> None:
    assert (
        classify(BadRequest("Bad Request: chat not found")).reason == "BadRequest: Chat not found"
    )
    forbidden = Forbidden("Forbidden: bot was kicked from the group chat")
    assert classify(forbidden).reason == "Forbidden: bot was kicked from the group chat"


def test_reason_is_one_short_line_without_the_token() -> None:
    exc = NetworkError(
        f"httpx.ConnectError: failed POST http://api.test/bot{TOKEN}/sendMessage\n"
        + "traceback line\n" * 50
    )
    reason = classify(exc).reason
    assert TOKEN not in reason
    assert TOKEN.split(":")[1] not in reason
    assert "/bot***/sendMessage" in reason
    assert "\n" not in reason
    assert len(reason) <= MAX_REASON
