"""The inline keyboards under summaries and the callback data their buttons carry; pure.

Bot API: callback_data is 1-64 bytes and comes back from the client, so it carries only an
action word and the id of a database row (`archive:123`); the handler checks that the row
belongs to the chat the press came from. Nothing is cached in memory: a summary posted before
a restart keeps working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

# Actions a summary's buttons ask for; "part" carries the attachment's number as well.
ACTIONS = (
    "text",
    "att",
    "part",
    "read",
    "unread",
    "archive",
    "delete",
    "spam",
    "undo",
    "fwd",
    "mute",
    "more",
    "less",
    "open",
)
_DATA = re.compile(r"^(?P<action>[a-z]{3,8}):(?P<id>[1-9][0-9]{0,17})(?::(?P<n>[0-9]{1,3}))?$")
STATE_LINES = {
    "archived": "🗄 Archived",
    "deleted": "🗑 Moved to the trash",
    "spam": "🚫 Moved to spam",
}


@dataclass(frozen=True)
class Press:
    """A parsed callback: the action, the mail row it names, an attachment's number."""

    action: str
    mail_id: int
    number: int | None = None


def parse_callback(data: str | None) -> Press | None:
    """The press a callback_data describes, or None when it is not one of ours."""
    match = _DATA.match(data or "")
    if match is None or match["action"] not in ACTIONS:
        return None
    number = int(match["n"]) if match["n"] is not None else None
    if (match["action"] == "part") != (number is not None):
        return None
    return Press(match["action"], int(match["id"]), number)


def _button(
    label: str, action: str, mail_id: int, number: int | None = None
) -> InlineKeyboardButton:
    data = f"{action}:{mail_id}" if number is None else f"{action}:{mail_id}:{number}"
    return InlineKeyboardButton(label, callback_data=data)


def summary_keyboard(
    mail_id: int, *, attachments: int, seen: bool, state: str, more: bool = False
) -> InlineKeyboardMarkup:
    """The buttons under a summary; the rarer ones sit behind "More" to keep it calm."""
    first = [_button("📄 Full text", "text", mail_id)]
    if attachments:
        first.append(_button(f"📎 Attachments ({attachments})", "att", mail_id))
    if state:
        return InlineKeyboardMarkup([first, [_button("↩️ Undo", "undo", mail_id)]])
    flag = (
        _button("✉️ Mark unread", "unread", mail_id)
        if seen
        else _button("✓ Mark read", "read", mail_id)
    )
    rows = [
        first,
        [flag, _button("🗄 Archive", "archive", mail_id), _button("🗑 Delete", "delete", mail_id)],
    ]
    if more:
        rows.append(
            [
                _button("🚫 Spam", "spam", mail_id),
                _button("↪️ Forward", "fwd", mail_id),
                _button("🔇 Mute sender", "mute", mail_id),
            ]
        )
        rows.append([_button("⋯ Less", "less", mail_id)])
    else:
        rows.append([_button("⋯ More", "more", mail_id)])
    return InlineKeyboardMarkup(rows)


def attachment_keyboard(mail_id: int, labels: list[str]) -> InlineKeyboardMarkup:
    """One button per attachment, labelled with a paperclip, its name and size."""
    return InlineKeyboardMarkup(
        [[_button(f"📎 {label}", "part", mail_id, n)] for n, label in enumerate(labels)]
    )


def open_keyboard(items: list[tuple[int, str]]) -> InlineKeyboardMarkup:
    """One button per listed mail (search results, combined messages) that posts its summary."""
    buttons = [_button(label, "open", mail_id) for mail_id, label in items]
    return InlineKeyboardMarkup([buttons[i : i + 2] for i in range(0, len(buttons), 2)])
