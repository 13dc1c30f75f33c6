"""/send: the one-shot form and the guided dialogue (recipients, subject, body, confirm)."""

from __future__ import annotations

import html
import logging
import warnings
from typing import Any

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.constants import ParseMode
from telegram.error import TelegramError
from telegram.ext import (
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    TypeHandler,
    filters,
)
from telegram.warnings import PTBUserWarning

from bridge.chat_to_mail import RateLimited
from bridge.mail.compose import InvalidMail, OutgoingAttachment, OutgoingMail, parse_addresses
from bridge.telegram.deps import deps

logger = logging.getLogger(__name__)

RECIPIENTS, SUBJECT, BODY, CONFIRM = range(4)
USAGE = (
    "Usage: /send ADDR[,ADDR...] SUBJECT on the first line, the text on the next lines; "
    "or /send alone to be asked step by step."
)
# Bot API: getFile downloads at most 20 MB.
MAX_DOWNLOAD = 20 * 1024 * 1024
MAX_COMMAND = 100_000


class AttachmentError(Exception):
    """A Telegram file that cannot become an attachment; the message is for the chat."""


async def attachments_of(message: Message) -> tuple[OutgoingAttachment, ...]:
    """Download the photo or document of a message as a MIME attachment."""
    if message.document is not None:
        doc = message.document
        size, name = doc.file_size or 0, doc.file_name or "file"
        content_type = doc.mime_type or ""
        file_id = doc.file_id
    elif message.photo:
        photo = message.photo[-1]  # the largest size
        size, name, content_type = (
            photo.file_size or 0,
            f"photo_{photo.file_unique_id}.jpg",
            "image/jpeg",
        )
        file_id = photo.file_id
    else:
        return ()
    if size > MAX_DOWNLOAD:
        raise AttachmentError(
            f"Not sent: {name} is {size / 1048576:.1f} MB, and Telegram lets bots fetch files "
            "up to 20 MB. Send a smaller file or a link."
        )
    try:
        telegram_file = await message.get_bot().get_file(file_id)
        data = bytes(await telegram_file.download_as_bytearray())
    except TelegramError as exc:
        raise AttachmentError(f"Not sent: could not fetch {name} from Telegram ({exc}).") from exc
    return (OutgoingAttachment(filename=name, content_type=content_type, data=data),)


def text_of(message: Message) -> str:
    """The text, or the caption of a photo/document."""
    return message.text or message.caption or ""


def parse_send_command(text: str) -> tuple[tuple[str, ...], str, str]:
    """Split "/send ADDRS SUBJECT\\nBODY" into addresses, subject, body; raises InvalidMail."""
    if len(text) > MAX_COMMAND:
        raise InvalidMail(f"Not sent: the message is longer than {MAX_COMMAND} characters.")
    first, _, body = text.partition("\n")
    parts = first.split(maxsplit=2)  # "/send", addresses, subject
    if len(parts) < 2:
        raise InvalidMail(USAGE)
    if len(parts) < 3 or not parts[2].strip():
        raise InvalidMail("No subject. " + USAGE)
    return parse_addresses(parts[1]), parts[2].strip(), body


async def submit(
    update: Update, context: ContextTypes.DEFAULT_TYPE, mail: OutgoingMail, source_id: int
) -> None:
    """Hand a mail to the outbox and say what happened.

    source_id is the chat message that asked for the mail: the outbox refuses it twice.
    """
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    outbox = deps(context).outbox
    if message is None or outbox is None:
        return
    try:
        item = await outbox.submit(
            mail,
            chat_id=chat.id if chat else None,
            user_id=user.id if user else None,
            source_message_id=source_id,
        )
    except (InvalidMail, RateLimited) as exc:
        await message.reply_text(str(exc), do_quote=False)
        return
    if item is None:
        return  # a re-delivered update: it was answered the first time
    await message.reply_text(
        f"📤 Sending to {html.escape(', '.join(mail.to + mail.cc + mail.bcc))}…",
        parse_mode=ParseMode.HTML,
        do_quote=False,
    )


async def send_entry(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """/send with arguments sends at once; /send alone starts the dialogue."""
    message = update.effective_message
    if message is None:
        return ConversationHandler.END
    text = text_of(message)
    if len(text.split()) < 2:
        await message.reply_text(
            "To whom? Send the address(es), separated by commas. /cancel stops.", do_quote=False
        )
        return RECIPIENTS
    try:
        to, subject, body = parse_send_command(text)
        attachments = await attachments_of(message)
        if not body.strip() and not attachments:
            raise InvalidMail("No text. " + USAGE)
        mail = OutgoingMail(to=to, subject=subject, body=body, attachments=attachments)
    except (InvalidMail, AttachmentError) as exc:
        await message.reply_text(str(exc), do_quote=False)
        return ConversationHandler.END
    await submit(update, context, mail, message.message_id)
    return ConversationHandler.END


async def recipients(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Dialogue step 1: the addresses."""
    message = update.effective_message
    if message is None:
        return ConversationHandler.END
    try:
        draft(context)["to"] = parse_addresses(text_of(message))
    except InvalidMail as exc:
        await message.reply_text(f"{exc} Try again, or /cancel.", do_quote=False)
        return RECIPIENTS
    await message.reply_text("Subject?", do_quote=False)
    return SUBJECT


async def subject(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Dialogue step 2: the subject."""
    message = update.effective_message
    if message is None:
        return ConversationHandler.END
    value = " ".join(text_of(message).split())
    if not value:
        await message.reply_text("The subject cannot be empty. Subject?", do_quote=False)
        return SUBJECT
    draft(context)["subject"] = value
    await message.reply_text(
        "The text? (A photo or file with a caption becomes an attachment.)", do_quote=False
    )
    return BODY


async def body(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Dialogue step 3: the text and attachments; then show the draft with Send/Cancel."""
    message = update.effective_message
    if message is None:
        return ConversationHandler.END
    try:
        attachments = await attachments_of(message)
    except AttachmentError as exc:
        await message.reply_text(f"{exc} Send the text again, or /cancel.", do_quote=False)
        return BODY
    data = draft(context)
    data["body"], data["attachments"] = text_of(message), attachments
    files = "".join(f"\n📎 {html.escape(a.filename)}" for a in attachments)
    preview = html.escape(data["body"][:1500])
    await message.reply_text(
        f"<b>To:</b> {html.escape(', '.join(data['to']))}\n<b>Subject:</b> "
        f"{html.escape(data['subject'])}\n\n{preview}{files}",
        parse_mode=ParseMode.HTML,
        reply_markup=InlineKeyboardMarkup(
            [
                [
                    InlineKeyboardButton("Send", callback_data="send:yes"),
                    InlineKeyboardButton("Cancel", callback_data="send:no"),
                ]
            ]
        ),
        do_quote=False,
    )
    return CONFIRM


async def confirm(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Dialogue step 4: the Send or Cancel button."""
    query, message = update.callback_query, update.effective_message
    if query is None or message is None:
        return ConversationHandler.END
    await query.answer()
    data = context.user_data.pop("draft", None) if context.user_data is not None else None
    await query.edit_message_reply_markup(None)  # one press only
    if query.data != "send:yes" or not data:
        await message.reply_text("Cancelled; nothing was sent.", do_quote=False)
        return ConversationHandler.END
    mail = OutgoingMail(
        to=data["to"], subject=data["subject"], body=data["body"], attachments=data["attachments"]
    )
    await submit(update, context, mail, message.message_id)  # the draft message is the source
    return ConversationHandler.END


async def cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Stop the /send dialogue."""
    if context.user_data is not None:
        context.user_data.pop("draft", None)
    if update.effective_message is not None:
        await update.effective_message.reply_text("Cancelled; nothing was sent.", do_quote=False)
    return ConversationHandler.END


async def expired(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The dialogue was left alone too long."""
    if context.user_data is not None:
        context.user_data.pop("draft", None)
    if update.effective_chat is not None:
        await context.bot.send_message(
            update.effective_chat.id, "The /send draft expired; nothing was sent."
        )


def draft(context: ContextTypes.DEFAULT_TYPE) -> dict[str, Any]:
    """The dialogue's draft in user_data."""
    if context.user_data is None:  # only updates without a user lack it; the gate drops them
        raise RuntimeError("the /send dialogue needs a user")
    value: dict[str, Any] = context.user_data.setdefault("draft", {})
    return value


def conversation(timeout: float) -> ConversationHandler[Any]:
    """The /send ConversationHandler (it needs the JobQueue for conversation_timeout)."""
    text = filters.TEXT & ~filters.COMMAND
    with_files = (filters.TEXT | filters.PHOTO | filters.Document.ALL) & ~filters.COMMAND
    with warnings.catch_warnings():
        # per_message=False is right for a per-user dialogue; PTB warns about the button step.
        warnings.simplefilter("ignore", PTBUserWarning)
        return _conversation(timeout, text, with_files)


def _conversation(timeout: float, text: Any, with_files: Any) -> ConversationHandler[Any]:
    return ConversationHandler(
        entry_points=[
            CommandHandler("send", send_entry),
            MessageHandler(
                (filters.PHOTO | filters.Document.ALL) & filters.CaptionRegex(r"^/send(@\w+)?\s"),
                send_entry,
            ),
        ],
        states={
            RECIPIENTS: [MessageHandler(text, recipients)],
            SUBJECT: [MessageHandler(text, subject)],
            BODY: [MessageHandler(with_files, body)],
            CONFIRM: [CallbackQueryHandler(confirm, pattern=r"^send:(yes|no)$")],
            ConversationHandler.TIMEOUT: [TypeHandler(Update, expired)],
        },
        fallbacks=[CommandHandler("cancel", cancel)],
        conversation_timeout=timeout,
        allow_reentry=True,
    )
