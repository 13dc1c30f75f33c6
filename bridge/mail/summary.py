"""ParsedMail to a Telegram message (parse_mode HTML) within the Bot API length limit; pure."""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from bridge.mail.parse import ParsedMail

MAX_MESSAGE = 4096  # Bot API: text is 1-4096 characters after entities parsing

_SUBJECT = 300
_LINE = 200
_NAME = 60
_LISTED = 10
_ATTACHMENTS = 800
_PROBLEM = 160
# C0/C1 controls except \t and \n, lone surrogates, BOM, and bidi overrides (which let a sender
# flip how the rest of the message reads, e.g. a filename "fdp.exe" shown as "exe.pdf").
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff\u202a-\u202e\u2066-\u2069]")


def _utf16(text: str) -> int:
    # Bot API lengths are in UTF-16 code units: an emoji outside the BMP counts 2.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _clean(text: str) -> str:
    return _UNSAFE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _one_line(text: str) -> str:
    return " ".join(_clean(text).split())


def _esc(text: str) -> str:
    # Telegram HTML knows only &lt; &gt; &amp; (and &quot;); quote=False keeps quotes literal.
    return html.escape(text, quote=False)


def _shorten(text: str, limit: int, *, escaped: bool = True) -> str:
    """Plain `text` cut at a word boundary with "…" so it fits `limit`.

    With `escaped`, `limit` counts UTF-16 units of the HTML-escaped text, so the caller can escape
    the result without ever splitting an entity; otherwise it counts characters.
    """

    def cost(ch: str) -> int:
        return _utf16(_esc(ch)) if escaped else 1

    if len(text) <= limit and sum(map(cost, text)) <= limit:
        return text
    if limit < 1:
        return ""
    used, cut = 0, 0
    for ch in text:
        used += cost(ch)
        if used > limit - 1:  # keep one unit for "…"
            break
        cut += 1
    prefix = text[:cut]
    boundary = max(prefix.rfind(" "), prefix.rfind("\n"))
    # Cut at the last word boundary unless the cut is one or that would waste most of the room.
    if not text[cut].isspace() and boundary > cut * 0.6:
        prefix = prefix[:boundary]
    return prefix.rstrip() + "…"


def format_size(size: int) -> str:
    """Human size: "512 B", "1.2 KB", "340 KB", "3.4 MB"."""
    if size < 1024:
        return f"{max(size, 0)} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1024
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def _sender(mail: ParsedMail) -> str:
    name, addr = _one_line(mail.from_name), _one_line(mail.from_addr)
    if name and addr and name != addr:
        return f"{name} <{addr}>"
    return addr or name or "(unknown sender)"


def _recipients(label: str, people: list[str]) -> str:
    if not people:
        return ""
    shown = ", ".join(_one_line(p) for p in people[:3])
    more = f", +{len(people) - 3} more" if len(people) > 3 else ""
    return f"{label}: {_esc(_shorten(shown, _LINE))}{more}"


def _preview(text: str, preview_chars: int) -> str:
    """Whitespace-normalised start of the text, paragraph breaks kept for reading on a phone."""
    lines = (" ".join(line.split()) for line in _clean(text).split("\n"))
    tidy = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return _shorten(tidy, max(preview_chars, 0), escaped=False)


def _attachments(mail: ParsedMail) -> str:
    if not mail.attachments:
        return ""
    names = []
    for item in mail.attachments[:_LISTED]:
        name = _one_line(item.filename) or _one_line(item.content_type) or "attachment"
        names.append(f"{_esc(_shorten(name, _NAME))} ({format_size(item.size)})")
    more = len(mail.attachments) - _LISTED
    line = "📎 " + ", ".join(names) + (f", +{more} more" if more > 0 else "")
    return line if _utf16(line) <= _ATTACHMENTS else f"📎 {len(mail.attachments)} attachments"


def _problems(problems: list[str]) -> str:
    if not problems:
        return ""
    detail = _one_line(problems[0]) + (
        f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    )
    note = _esc(_shorten(f"could not decode part of this mail: {detail}", _PROBLEM))
    return f"<i>⚠️ {note}</i>"


def render_summary(mail: ParsedMail, *, preview_chars: int = 1200) -> str:
    """The new-mail message: subject, sender, date, recipients, start of text, attachments."""
    subject = _one_line(mail.subject) or "(no subject)"
    head = [f"📧 <b>{_esc(_shorten(subject, _SUBJECT))}</b>"]
    head.append(f"From: {_esc(_shorten(_sender(mail), _LINE))}")
    if mail.date is not None:
        head.append(f"Date: {mail.date.strftime('%Y-%m-%d %H:%M %z').rstrip()}")
    head += [line for line in (_recipients("To", mail.to), _recipients("Cc", mail.cc)) if line]
    tail = "\n".join(line for line in (_attachments(mail), _problems(mail.problems)) if line)
    fixed = "\n".join(head) + ("\n\n" + tail if tail else "")
    preview = _preview(mail.text, preview_chars)
    # The preview gets whatever room the other lines leave: its budget counts escaped UTF-16.
    room = MAX_MESSAGE - _utf16(fixed) - 4
    body = _esc(_shorten(preview, room)) if preview and room > 0 else ""
    parts = ["\n".join(head)] + [part for part in (body, tail) if part]
    return "\n\n".join(parts)


def render_unparseable(uid: int, size: int | None, reason: str) -> str:
    """A short message for a mail that could not be fetched or parsed at all."""
    size_note = f" ({format_size(size)})" if size is not None else ""
    reason_line = _esc(_shorten(_one_line(reason) or "unknown error", 1000))
    return (
        f"📧 <b>A new mail could not be read</b>\nIMAP UID {uid}{size_note}\n<i>{reason_line}</i>"
    )


@dataclass(frozen=True)
class BatchLine:
    """One mail in a combined message: who sent it and what about."""

    sender_name: str
    sender: str
    subject: str


COMBINED_LISTED = 10  # mails listed (each with a button) in one combined message


def _who(line: BatchLine) -> str:
    return _one_line(line.sender_name) or _one_line(line.sender) or "(unknown sender)"


def render_batch(lines: Sequence[BatchLine], origin: str = "") -> str:
    """One message for mails that waited for the same chat, oldest first.

    Up to COMBINED_LISTED numbered lines (the newest, when there are more), and for a larger
    backlog the busiest senders with their counts.
    """
    count = len(lines)
    title = f"📬 <b>{count} new mail{'' if count == 1 else 's'}</b>"
    if origin:
        title += f" · {_esc(_shorten(_one_line(origin), 60))}"
    shown = lines[-COMBINED_LISTED:]
    first = count - len(shown) + 1
    body = [
        f"{first + n}. {_esc(_shorten(_who(line), 60))}: "
        f"{_esc(_shorten(_one_line(line.subject) or '(no subject)', 120))}"
        for n, line in enumerate(shown)
    ]
    parts = [title]
    if count > len(shown):
        parts.append(f"<i>Newest {len(shown)}:</i>")
    parts += body
    if count > len(shown):
        senders = Counter(_one_line(line.sender) or _who(line) for line in lines)
        busiest = ", ".join(
            f"{_esc(_shorten(who, 60))} ({n})" for who, n in senders.most_common(5)
        )
        parts.append(f"<i>Busiest senders:</i> {busiest}")
    # At most ~2,500 units: 10 lines of <= 190 and 5 senders of <= 70 (escaped, UTF-16).
    return "\n".join(parts)


def batch_line_label(number: int, line: BatchLine) -> str:
    """The button under a combined message that opens one mail's summary."""
    return f"{number}. {_shorten(_who(line), 24, escaped=False)}"


def plain_text(markup: str) -> str:
    """Our Telegram HTML as plain text: for when Telegram refuses the HTML."""
    return html.unescape(re.sub(r"<[^>]*>", "", markup))


def with_origin(summary: str, origin: str) -> str:
    """A summary with a line naming the account (and folder) it came to."""
    if not origin:
        return summary
    line = f"📥 {_esc(_shorten(_one_line(origin), 80))}\n"
    return line + summary if _utf16(line + summary) <= MAX_MESSAGE else summary


def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """The whole text as Telegram-HTML messages of at most `limit` UTF-16 units each, split at
    paragraph, then line, then word boundaries; each message is escaped on its own, so no
    entity is ever cut."""
    tidy = re.sub(r"\n{3,}", "\n\n", _clean(text)).strip()
    chunks: list[str] = []
    current = ""
    for piece in _pieces(tidy, limit):
        joined = f"{current}\n\n{piece}" if current else piece
        if _utf16(_esc(joined)) <= limit:
            current = joined
            continue
        if current:
            chunks.append(current)
        current = piece
    if current:
        chunks.append(current)
    return [_esc(chunk) for chunk in chunks]


def _pieces(text: str, limit: int) -> list[str]:
    """Paragraphs, with any paragraph too long for one message cut at lines, then words."""
    pieces: list[str] = []
    for paragraph in text.split("\n\n"):
        if _utf16(_esc(paragraph)) <= limit:
            pieces.append(paragraph)
            continue
        line_buf = ""
        for line in paragraph.split("\n"):
            for part in _hard_split(line, limit):
                joined = f"{line_buf}\n{part}" if line_buf else part
                if _utf16(_esc(joined)) <= limit:
                    line_buf = joined
                else:
                    pieces.append(line_buf)
                    line_buf = part
        if line_buf:
            pieces.append(line_buf)
    return [p for p in pieces if p.strip()]


def _hard_split(line: str, limit: int) -> list[str]:
    """A line longer than a message: cut at spaces, else anywhere (never inside an escape)."""
    parts: list[str] = []
    while _utf16(_esc(line)) > limit:
        used, cut = 0, 0
        for ch in line:
            used += _utf16(_esc(ch))
            if used > limit:
                break
            cut += 1
        space = line.rfind(" ", 0, cut)
        cut = space if space > cut // 2 else cut
        parts.append(line[:cut])
        line = line[cut:].lstrip(" ")
    return [*parts, line] if line else parts


@dataclass(frozen=True)
class ListLine:
    """One mail in a list (/search, /inbox): when, who, what."""

    date: datetime | None
    sender: str
    subject: str


def render_list(title: str, lines: Sequence[ListLine]) -> str:
    """A numbered list of mails in one message: each line shortened so that every line fits
    (Telegram's 4,096 limit), dates with their own UTC offset."""
    head = f"<b>{_esc(_shorten(_one_line(title), 200))}</b>"
    if not lines:
        return head
    budget = (MAX_MESSAGE - _utf16(head) - 40) // len(lines) - 2
    rows: list[str] = []
    for n, line in enumerate(lines, 1):
        when = line.date.strftime("%d %b %H:%M %z") if line.date else "—"
        sender = _esc(_shorten(_one_line(line.sender) or "(unknown sender)", min(40, budget // 3)))
        prefix = f"{n}. {when} · {sender} · "
        room = budget - _utf16(prefix) - len("<b></b>")
        subject = _esc(_shorten(_one_line(line.subject) or "(no subject)", max(room, 8)))
        rows.append(f"{prefix}<b>{subject}</b>")
    return "\n".join([head, *rows])
