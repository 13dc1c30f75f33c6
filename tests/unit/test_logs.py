"""The log filter masks secrets, also inside httpx's URL objects and tracebacks."""

from __future__ import annotations

import logging

import httpx

from bridge.logs import SecretFilter

TOKEN = "123456:ABC-secret-token"


def test_masks_formatted_message_with_url_object(caplog) -> None:
    logger = logging.getLogger("httpx.test")
    logger.addFilter(SecretFilter([TOKEN, "pw"]))
    with caplog.at_level(logging.INFO, logger="httpx.test"):
        logger.info("HTTP Request: %s %s", "POST", httpx.URL(f"https://api/bot{TOKEN}/getMe"))
    assert TOKEN not in caplog.text
    assert "bot***/getMe" in caplog.text


def test_masks_exception_text(caplog) -> None:
    logger = logging.getLogger("masked.exc")
    logger.addFilter(SecretFilter([TOKEN]))
    try:
        raise RuntimeError(f"failed for {TOKEN}")
    except RuntimeError:
        with caplog.at_level(logging.ERROR, logger="masked.exc"):
            logger.exception("boom")
    assert TOKEN not in caplog.text
    assert "failed for ***" in caplog.text


def _json_line(record_logger: logging.Logger, emit) -> dict:
    """Emit through a handler with the JSON formatter and the secret filter; the one line."""
    import io
    import json

    from bridge.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter([TOKEN]))
    record_logger.addHandler(handler)
    record_logger.setLevel(logging.DEBUG)
    record_logger.propagate = False
    try:
        emit()
    finally:
        record_logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    assert TOKEN not in line
    return json.loads(line)


def test_json_line_has_time_level_logger_message_and_context() -> None:
    logger = logging.getLogger("json.context")
    line = _json_line(
        logger,
        lambda: logger.warning(
            "mail %d for %s", 7, "ann", extra={"account": "home", "folder": "INBOX", "uid": 7}
        ),
    )
    assert line["level"] == "WARNING"
    assert line["logger"] == "json.context"
    assert line["message"] == "mail 7 for ann"
    assert (line["account"], line["folder"], line["uid"]) == ("home", "INBOX", 7)
    assert "chat" not in line
    assert line["time"].endswith("+00:00")  # ISO 8601, UTC


def test_json_line_masks_message_context_and_exception() -> None:
    logger = logging.getLogger("json.masked")

    def emit() -> None:
        try:
            raise RuntimeError(f"failed for {TOKEN}")
        except RuntimeError:
            logger.exception(
                "GET %s", httpx.URL(f"https://api/bot{TOKEN}/getMe"), extra={"account": TOKEN}
            )

    line = _json_line(logger, emit)
    assert line["message"] == "GET https://api/bot***/getMe"
    assert line["account"] == "***"
    assert "failed for ***" in line["exception"]
    assert line["exception"].startswith("Traceback")
