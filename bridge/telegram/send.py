"""/send: the one-shot form and the guided dialogue (account, recipients, subject, body)."""

from __future__ import annotations

import html
import logging
import warnings
from collections.abc import Sequence
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

from bridge.chat_to_mail import RateLimited, UnknownAccount
from bridge.mail.compose import InvalidMail, OutgoingAttachment, OutgoingMail, parse_addresses
from bridge.telegram.deps import deps

logger = logging.getLogger(__name__)

ACCOUNT, RECIPIENTS, SUBJECT, BODY, CONFIRM = range(5)
ADDRESSES = "ADDR[,ADDR...] SUBJECT"
USAGE = (
    f"Usage: /send {ADDRESSES} on the first line, the text on the next lines; "
    "or /send alone to be asked step by step."
)
ASK_RECIPIENTS = "To whom? Send the address(es), separated by commas. /cancel stops."
ACCOUNT_BUTTON = "send:account:"
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


def usage(accounts: Sequence[str]) -> str:
    """The right form of /send, naming the accounts when there are several."""
    if len(accounts) < 2:
        return USAGE
    names = ", ".join(f"@{name}" for name in accounts)
    return (
        f"Usage: /send @ACCOUNT {ADDRESSES} on the first line (accounts: {names}), the text on "
        "the next lines; or /send alone to be asked step by step."
    )


def which_account(accounts: Sequence[str]) -> str:
    """One line asking for the account of a one-line /send (several accounts, no @NAME)."""
    if len(accounts) <= 3:
        forms = " or ".join(f"/send @{name} {ADDRESSES}" for name in accounts)
        return f"Which account? {forms}, the text on the next lines."
    names = ", ".join(f"@{name}" for name in accounts)
    return f"Which account? /send @ACCOUNT {ADDRESSES} ({names}), the text on the next lines."


def parse_send_command(
    text: str, accounts: Sequence[str]
) -> tuple[str, tuple[str, ...], str, str]:
    """Split "/send [@ACCOUNT] ADDRS SUBJECT\\nBODY" into account, addresses, subject, body.

    With one account the @ACCOUNT may be left out. Raises InvalidMail (a malformed command, no
    account named when there are several) or UnknownAccount.
    """
    if len(text) > MAX_COMMAND:
        raise InvalidMail(f"Not sent: the message is longer than {MAX_COMMAND} characters.")
    first, _, body = text.partition("\n")
    words = first.split(maxsplit=1)  # "/send", the rest
    rest = words[1] if len(words) > 1 else ""
    account: str | None = None
    if rest.startswith("@"):
        name, *tail = rest.split(maxsplit=1)
        rest = tail[0] if tail else ""
        account = name[1:].lower()
        if account not in accounts:
            raise UnknownAccount(account, accounts)
    elif len(accounts) == 1:
        account = accounts[0]
    parts = rest.split(maxsplit=1)  # addresses, subject
    if not parts:
        raise InvalidMail(usage(accounts))
    if account is None:
        raise InvalidMail(which_account(accounts))
    if len(parts) < 2 or not parts[1].strip():
        raise InvalidMail("No subject. " + usage(accounts))
    return account, parse_addresses(parts[0]), parts[1].strip(), body


async def submit(
    update: Update,
    context: ContextTypes.DEFAULT_TYPE,
    mail: OutgoingMail,
    source_id: int,
    *,
    account: str,
) -> None:
    """Hand a mail to the outbox (to leave through `account`) and say what happened.

    source_id is the chat message that asked for the mail: the outbox refuses it twice.
    """
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    if message is None:
        return
    try:
        item = await deps(context).outbox.submit(
            mail,
            account=account,
            chat_id=chat.id if chat else None,
            user_id=user.id if user else None,
            source_message_id=source_id,
        )
    except (InvalidMail, RateLimited, UnknownAccount) as exc:
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
    """/send with arguments sends at once; /send alone (or /send @ACCOUNT) starts the dialogue."""
    message = update.effective_message
    if message is None:
        return ConversationHandler.END
    accounts = deps(context).outbox.account_names
    text = text_of(message)
    words = text.split()
    if len(words) < 2 or (len(words) == 2 and words[1].startswith("@")):
        chosen = words[1][1:].lower() if len(words) == 2 else None
        return await _start_dialogue(message, context, accounts, chosen)
    try:
        account, to, subject, body = parse_send_command(text, accounts)
        attachments = await attachments_of(message)
        if not body.strip() and not attachments:
            raise InvalidMail("No text. " + usage(accounts))
        mail = OutgoingMail(to=to, subject=subject, body=body, attachments=attachments)
    except (InvalidMail, UnknownAccount, AttachmentError) as exc:
        await message.reply_text(str(exc), do_quote=False)
        return ConversationHandler.END
    await submit(update, context, mail, message.message_id, account=account)
    return ConversationHandler.END


async def _start_dialogue(
    message: Message,
    context: ContextTypes.DEFAULT_TYPE,
    accounts: Sequence[str],
    chosen: str | None,
) -> int:
    """Begin a new draft: ask for the account when there are several, else for recipients."""
    data = new_draft(context)
    if chosen is not None and chosen not in accounts:
        await message.reply_text(str(UnknownAccount(chosen, accounts)), do_quote=False)
        return ConversationHandler.END
    if chosen is None and len(accounts) > 1:
        prompt = await message.reply_text(
            "From which account? Press its button or type its name. /cancel stops.",
            reply_markup=InlineKeyboardMarkup(
                [
                    [InlineKeyboardButton(f"@{name}", callback_data=f"{ACCOUNT_BUTTON}{name}")]
                    for name in accounts
                ]
            ),
            do_quote=False,
        )
        data["prompt"] = prompt.message_id
        return ACCOUNT
    data["account"] = chosen or accounts[0]
    await message.reply_text(ASK_RECIPIENTS, do_quote=False)
    return RECIPIENTS


async def account_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Dialogue step 0 (several accounts): an account button."""
    query, message = update.callback_query, update.effective_message
    if query is None or message is None:
        return ACCOUNT
    data = draft(context)
    name = (query.data or "").removeprefix(ACCOUNT_BUTTON)
    # Callback data comes back from the client: only this draft's buttons, only real names.
    if message.message_id != data.get("prompt") or name not in deps(context).outbox.account_names:
        await query.answer("This button is not valid.")
        return ACCOUNT
    await query.answer()
    await query.edit_message_reply_markup(None)  # one press only
    return await _account_chosen(message, context, name)


async def account_typed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Dialogue step 0 (several accounts): the account's name, typed."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return ConversationHandler.END
    accounts = deps(context).outbox.account_names
    name = text_of(message).strip().removeprefix("@").lower()
    if name not in accounts:
        refusal = UnknownAccount(" ".join(name.split())[:40], accounts)
        await message.reply_text(f"{refusal} Type one, or /cancel.", do_quote=False)
        return ACCOUNT
    prompt = draft(context).pop("prompt", None)
    if prompt is not None:
        try:  # the buttons would now choose again
            await context.bot.edit_message_reply_markup(chat.id, prompt, reply_markup=None)
        except TelegramError as exc:
            logger.debug("could not remove the account buttons: %s", exc)
    return await _account_chosen(message, context, name)


async def _account_chosen(message: Message, context: ContextTypes.DEFAULT_TYPE, name: str) -> int:
    data = draft(context)
    data.pop("prompt", None)
    data["account"] = name
    await message.reply_text(f"From @{name}. {ASK_RECIPIENTS}", do_quote=False)
    return RECIPIENTS


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
    outbox = deps(context).outbox
    sender = ""
    if len(outbox.account_names) > 1:
        account = outbox.account(data["account"])
        sender = (
            f"<b>From:</b> {html.escape(account.smtp.sender)} (@{html.escape(account.name)})\n"
        )
    files = "".join(f"\n📎 {html.escape(a.filename)}" for a in attachments)
    preview = html.escape(data["body"][:1500])
    await message.reply_text(
        f"{sender}<b>To:</b> {html.escape(', '.join(data['to']))}\n<b>Subject:</b> "
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
    if query.data != "send:yes" or not data or "account" not in data:
        await message.reply_text("Cancelled; nothing was sent.", do_quote=False)
        return ConversationHandler.END
    mail = OutgoingMail(
        to=data["to"], subject=data["subject"], body=data["body"], attachments=data["attachments"]
    )
    # The draft message is the source: a re-delivered press does not send twice.
    await submit(update, context, mail, message.message_id, account=data["account"])
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


def new_draft(context: ContextTypes.DEFAULT_TYPE) -> dict[str, Any]:
    """A fresh, empty draft in user_data (a new dialogue forgets an abandoned one)."""
    if context.user_data is None:  # only updates without a user lack it; the gate drops them
        raise RuntimeError("the /send dialogue needs a user")
    value: dict[str, Any] = {}
    context.user_data["draft"] = value
    return value


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
            ACCOUNT: [
                CallbackQueryHandler(account_pressed, pattern=f"^{ACCOUNT_BUTTON}"),
                MessageHandler(text, account_typed),
            ],
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
