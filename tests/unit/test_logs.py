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
