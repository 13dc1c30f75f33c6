"""Hostile chat input: nothing gets through that the user did not name, strangers get nothing."""

from __future__ import annotations

import pytest

from tests.integration.chat import answer, answer_containing
from tests.integration.conftest import OWNER, running

STRANGER = 31337


@pytest.fixture
def abuse_settings(settings_for, smtpd):
    return settings_for(smtpd=smtpd, imap={"save_sent": False})


@pytest.mark.parametrize(
    "addresses",
    [
        "ann@exa\u200bmple.org",  # zero-width space
        "\u202egro.elpmaxe@nna",  # right-to-left override
        "ann@example.org\ufeff",  # byte-order mark
        "ann@example.org,bob@exam\u200dple.org",  # zero-width joiner in the second
        "a" * 3000 + "@example.org",  # absurdly long
    ],
)
async def test_unicode_tricks_in_addresses_are_refused(
    abuse_settings, botapi, smtpd, addresses
) -> None:
    async with running(abuse_settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, f"/send {addresses} Subject\nbody")
        reply = await answer(botapi)
    assert "Sending" not in reply
    assert smtpd.received == []


async def test_very_long_command_is_handled(abuse_settings, botapi, smtpd) -> None:
    body = "x" * 4000  # Telegram's limit is 4096 characters per message
    async with running(abuse_settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, f"/send ann@example.org Long\n{body}")
        received = await smtpd.next_message(timeout=20)
    assert received.message().get_content().strip() == body


async def test_header_injection_through_the_dialogue(abuse_settings, botapi, smtpd) -> None:
    async with running(abuse_settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send")
        await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "ann@example.org")
        await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "Hello\r\nBcc: victim@evil.org\nX-Evil: 1")
        await answer(botapi)
        botapi.send_user_message(
            OWNER,
            OWNER,
            document=(
                "report\r\nContent-Type: text/html.pdf",
                b"%PDF-1.4 data",
                "application/pdf",
            ),
            caption="See attached",
        )
        draft = await botapi.next_call("sendMessage", timeout=10, ok_only=True)
        botapi.press_button(OWNER, OWNER, int(draft.result["message_id"]), "send:yes")
        received = await smtpd.next_message(timeout=20)
    msg = received.message()
    assert received.rcpt_tos == ["ann@example.org"]
    assert msg["Bcc"] is None
    assert msg["X-Evil"] is None
    assert "\n" not in msg["Subject"]
    (attachment,) = list(msg.iter_attachments())
    assert "\n" not in attachment.get_filename()
    assert attachment.get_content_type() == "application/pdf"


async def test_stranger_flood_gets_one_refusal(abuse_settings, botapi, smtpd, caplog) -> None:
    async with running(abuse_settings) as bridge:
        await bridge.ready()
        for n in range(40):
            botapi.send_user_message(STRANGER, STRANGER, f"/send ann@example.org S{n}\nspam")
        botapi.send_user_message(OWNER, OWNER, "/help")  # processed after the flood
        await answer_containing(botapi, "Commands")
    refusals = list(botapi.sent_messages(STRANGER))
    assert len(refusals) == 1
    assert str(STRANGER) in refusals[0]
    assert smtpd.received == []
    logged = [r for r in caplog.records if "refused user" in r.getMessage()]
    assert len(logged) == 1
    assert str(STRANGER) in logged[0].getMessage()


async def test_callback_from_a_stranger_is_refused(abuse_settings, botapi, smtpd) -> None:
    """A stranger pressing the Send button of the owner's draft sends nothing."""
    async with running(abuse_settings) as bridge:
        await bridge.ready()
        for text in ("/send", "ann@example.org", "Draft", "body"):
            botapi.send_user_message(OWNER, OWNER, text)
            call = await botapi.next_call("sendMessage", timeout=10, ok_only=True)
        botapi.press_button(STRANGER, OWNER, int(call.result["message_id"]), "send:yes")
        refused = await botapi.next_call("answerCallbackQuery", timeout=10)
        botapi.send_user_message(OWNER, OWNER, "/cancel")
        await answer_containing(botapi, "Cancelled")
    assert "Not allowed" in str(refused.params.get("text"))
    assert smtpd.received == []
