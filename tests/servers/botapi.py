"""A fake Telegram Bot API server (aiohttp on loopback) speaking the methods the bridge calls."""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import math
import mimetypes
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any

from aiohttp import web

DEFAULT_TOKEN = "123456789:AAFakeTokenForMailbridgeTests_0123456"
JSON = dict[str, Any]

# PTB (telegram/request/_requestparameter.py) posts form fields, JSON-encoding every value
# that is not already a str; these parameters are strings and must not be JSON-decoded.
STRING_PARAMS = frozenset(
    {
        "text",
        "caption",
        "parse_mode",
        "callback_query_id",
        "inline_message_id",
        "file_id",
        "action",
        "url",
        "emoji",
        "language_code",
        "description",
        "short_description",
        "name",
        "title",
        "query",
        "business_connection_id",
        "message_effect_id",
        "photo",
        "document",
    }
)
# Methods that put a new message in a chat: these count towards Telegram's flood limits
# (Bot API FAQ: about 1 message/s per chat, 20 messages/min per group).
SEND_METHODS = frozenset(
    {
        "sendmessage",
        "sendphoto",
        "senddocument",
        "sendmediagroup",
        "sendaudio",
        "sendvideo",
        "sendvoice",
        "sendanimation",
        "sendsticker",
        "copymessage",
        "forwardmessage",
    }
)
_NGINX_TITLES = {
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}
# Bot API "Formatting options": the tags Telegram's HTML parse mode accepts.
HTML_TAGS = frozenset(
    {
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "span",
        "tg-spoiler",
        "a",
        "tg-emoji",
        "code",
        "pre",
        "blockquote",
    }
)
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*)?)>")
_ENTITY_RE = re.compile(r"&(?:lt|gt|amp|quot|#[0-9]+|#x[0-9a-fA-F]+);")
MAX_TEXT = 4096  # Bot API sendMessage: 1-4096 characters after entities parsing
MAX_CAPTION = 1024
# Bot API FAQ "My bot is hitting limits": no more than 20 messages per minute in one group.
GROUP_LIMIT = 20
GROUP_WINDOW = 60.0
# Bot API createForumTopic: the first of the six allowed icon colors (0x6FB9F0).
TOPIC_COLOR = 7322096


class BotApiError(Exception):
    """An error answer, as the Bot API gives it: HTTP status, description, parameters."""

    def __init__(self, status: int, description: str, parameters: JSON | None = None) -> None:
        """Remember the status, the description and the ResponseParameters (if any)."""
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart request."""

    filename: str | None
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Call:
    """One request to the fake API: method name, decoded params, arrival time and outcome."""

    method: str
    params: JSON
    time: float
    status: int = 200
    result: Any = None

    @property
    def ok(self) -> bool:
        """Whether the call was answered with success."""
        return self.status == 200


@dataclass
class _Fault:
    """A queued misbehaviour for one method (or "*" for any)."""

    status: int | None
    count: int
    retry_after: int | None = None
    description: str | None = None
    delay: float = 0.0


@dataclass
class _StoredFile:
    """A file getFile can describe and /file/ can serve."""

    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes


@dataclass
class _State:
    """Mutable server state, kept in one place to reset easily."""

    calls: list[Call] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)
    updates: deque[JSON] = field(default_factory=deque)
    messages: dict[tuple[int, int], JSON] = field(default_factory=dict)
    raw_texts: dict[tuple[int, int], str] = field(default_factory=dict)
    next_message_id: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    chats: dict[int, JSON] = field(default_factory=dict)
    files: dict[str, _StoredFile] = field(default_factory=dict)
    files_by_path: dict[str, _StoredFile] = field(default_factory=dict)
    callback_ids: set[str] = field(default_factory=set)
    commands: dict[str, list[JSON]] = field(default_factory=dict)
    send_times: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    faults: dict[str, deque[_Fault]] = field(default_factory=lambda: defaultdict(deque))
    topics: dict[int, dict[int, JSON]] = field(default_factory=lambda: defaultdict(dict))
    migrated: dict[int, int] = field(default_factory=dict)
    refused_chats: dict[int, tuple[int, str]] = field(default_factory=dict)
    flood_refusals: dict[int, int] = field(default_factory=lambda: defaultdict(int))


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of Bot API entity offsets and lengths."""
    return len(text.encode("utf-16-le")) // 2


def html_to_text(text: str) -> str:
    """Check Telegram-HTML like the Bot API does and return the visible text.

    Raises BotApiError(400, "Bad Request: can't parse entities: ...") for an unsupported or
    unbalanced tag or a bare `<`/`&`, as Telegram does.
    """
    out: list[str] = []
    stack: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "<":
            match = _TAG_RE.match(text, i)
            if match is None:
                raise _entities_error(f"unsupported start tag at byte offset {i}")
            closing, name = match.group(1), match.group(2).lower()
            if name not in HTML_TAGS:
                raise _entities_error(f'unsupported start tag "{name}" at byte offset {i}')
            if closing:
                if not stack or stack[-1] != name:
                    raise _entities_error(f'can\'t find start tag for end tag "{name}"')
                stack.pop()
            else:
                stack.append(name)
            i = match.end()
        elif char == "&":
            match = _ENTITY_RE.match(text, i)
            if match is None:
                raise _entities_error(f"unsupported HTML entity at byte offset {i}")
            out.append(html.unescape(match.group(0)))
            i = match.end()
        elif char == ">":
            raise _entities_error(f"unexpected '>' at byte offset {i}")
        else:
            out.append(char)
            i += 1
    if stack:
        raise _entities_error(f'can\'t find end tag corresponding to start tag "{stack[-1]}"')
    return "".join(out)


def _entities_error(detail: str) -> BotApiError:
    """Return the 400 error Telegram gives for bad formatting."""
    return BotApiError(400, f"Bad Request: can't parse entities: {detail}")


def _decode_param(name: str, value: str) -> Any:
    """Undo PTB's encoding of one form field: JSON for non-strings, raw for strings."""
    if name in STRING_PARAMS:
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return value if isinstance(decoded, str) else decoded


def _without_reply(message: JSON) -> JSON:
    """A copy of `message` fit for `reply_to_message` (Telegram nests one level only)."""
    return {k: v for k, v in message.items() if k != "reply_to_message"}


def _as_int(value: Any, name: str) -> int:
    """Return an integer parameter or raise the Bot API's 400."""
    if isinstance(value, bool):
        raise BotApiError(400, f"Bad Request: invalid {name} specified")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    if name == "chat_id":
        raise BotApiError(400, "Bad Request: chat not found")
    raise BotApiError(400, f"Bad Request: invalid {name} specified")


class FakeBotApi:
    """The Bot API at `url` for one token: records calls, queues updates, injects faults."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        host: str = "127.0.0.1",
        bot_username: str = "mailbridge_test_bot",
        group_limit: int | None = GROUP_LIMIT,
        group_window: float = GROUP_WINDOW,
    ) -> None:
        """Prepare (but do not start) the server.

        `group_limit` sends per `group_window` seconds are accepted for one group (negative
        chat id); more are answered 429 like Telegram's flood control. None switches it off.
        """
        self.token = token
        self.host = host
        self.port = 0
        self.group_limit = group_limit
        self.group_window = group_window
        self.bot: JSON = {
            "id": int(token.split(":", 1)[0]),
            "is_bot": True,
            "first_name": "Mailbridge Test",
            "username": bot_username,
        }
        self._state = _State()
        self._ids = itertools.count(1)
        self._next_update_id = 100_000
        self._down = False
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls_changed: asyncio.Condition | None = None
        self._updates_changed: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._poll_generation = 0

    # Lifecycle

    @property
    def url(self) -> str:
        """The API root, as BRIDGE_TELEGRAM__API_URL (PTB: base_url=f"{url}/bot")."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """PTB's `base_url` for this server."""
        return f"{self.url}/bot"

    @property
    def base_file_url(self) -> str:
        """PTB's `base_file_url` for this server."""
        return f"{self.url}/file/bot"

    async def start(self) -> None:
        """Listen on a free port of `host` in the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._calls_changed = asyncio.Condition()
        self._updates_changed = asyncio.Event()
        self._closing = asyncio.Event()
        # Bot API upload limit is 50 MB; aiohttp's default body limit is 1 MiB.
        app = web.Application(client_max_size=50 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Release pending long polls and stop listening."""
        if self._closing is not None:
            self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeBotApi:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        await self.stop()

    # Fault injection

    webhook: JSON | None = None  # the last setWebhook's url and secret_token

    def fail(
        self,
        method: str,
        status: int,
        count: int = 1,
        *,
        retry_after: int | None = None,
        description: str | None = None,
    ) -> None:
        """Answer the next `count` calls of `method` ("*" = any) with HTTP `status`.

        429 carries `parameters.retry_after` (default 1) like Telegram's flood control;
        502/503/504 without a description get nginx's HTML page, the rest a JSON error.
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        self._state.faults[method.lower()].append(
            _Fault(status, count, retry_after=retry_after, description=description)
        )

    def delay(self, method: str, seconds: float, count: int = 1) -> None:
        """Answer the next `count` calls of `method` ("*" = any) only after `seconds`."""
        self._state.faults[method.lower()].append(_Fault(None, count, delay=seconds))

    def down(self) -> None:
        """Answer every request with nginx's 502 page until up()."""
        self._down = True

    def up(self) -> None:
        """Undo down()."""
        self._down = False

    def migrate_chat(self, old_id: int, new_id: int) -> None:
        """Upgrade group `old_id` to supergroup `new_id`: calls to `old_id` get ChatMigrated."""
        self._chat(old_id, "group")
        self._chat(new_id, "supergroup")
        self._state.migrated[old_id] = new_id

    def forbid_chat(
        self, chat_id: int, description: str = "Forbidden: bot was kicked from the group chat"
    ) -> None:
        """Answer every call to `chat_id` with 403 `description` until unforbid_chat()."""
        self._state.refused_chats[chat_id] = (403, description)

    def unforbid_chat(self, chat_id: int) -> None:
        """Undo forbid_chat() (the bot was added back, the user unblocked it)."""
        if self._state.refused_chats.get(chat_id, (0, ""))[0] == 403:
            del self._state.refused_chats[chat_id]

    def lose_chat(self, chat_id: int) -> None:
        """Answer every call to `chat_id` with 400 "chat not found" (the chat was deleted)."""
        self._state.refused_chats[chat_id] = (400, "Bad Request: chat not found")

    def make_forum(self, chat_id: int) -> None:
        """Make `chat_id` a supergroup with topics enabled (is_forum)."""
        if chat_id >= 0:
            raise ValueError(f"chat {chat_id} is not a group: forums are supergroups")
        self._chat(chat_id, "supergroup")["is_forum"] = True

    def add_topic(self, chat_id: int, name: str, *, user_id: int | None = None) -> int:
        """Create a topic in forum `chat_id` without an API call; returns its thread id.

        The creation message is from user `user_id`, or from the bot when None (as if the bot
        had called createForumTopic earlier). No update is queued.
        """
        chat = self._state.chats.get(chat_id)
        if chat is None or not chat.get("is_forum"):
            raise ValueError(f"chat {chat_id} is not a forum: call make_forum() first")
        creator = self.bot if user_id is None else self._user(user_id)
        topic = self._new_topic(chat_id, chat, creator, name, TOPIC_COLOR)
        return int(topic["message_thread_id"])

    def delete_topic(self, chat_id: int, thread_id: int) -> None:
        """Delete a topic and its messages, as a group admin would."""
        if self._state.topics[chat_id].pop(thread_id, None) is None:
            raise ValueError(f"no topic {thread_id} in chat {chat_id}")
        for key, message in list(self._state.messages.items()):
            if key[0] == chat_id and message.get("message_thread_id") == thread_id:
                del self._state.messages[key]

    def _take_fault(self, method: str) -> _Fault | None:
        """Use up one pending fault for `method` (or for any method)."""
        for key in (method.lower(), "*"):
            queue = self._state.faults.get(key)
            if queue:
                fault = queue[0]
                fault.count -= 1
                if fault.count <= 0:
                    queue.popleft()
                return fault
        return None

    # Observations

    def calls(self, method: str | None = None, *, ok_only: bool = False) -> list[Call]:
        """Every call so far (of `method`, if given), oldest first."""
        return [
            call
            for call in self._state.calls
            if (method is None or call.method.lower() == method.lower())
            and (call.ok or not ok_only)
        ]

    async def next_call(
        self,
        method: str,
        timeout: float = 5.0,
        *,
        ok_only: bool = False,
    ) -> Call:
        """Await the oldest call of `method` not yet returned by next_call (bounded).

        With `ok_only`, failed calls (faults, errors) are skipped and consumed.
        """
        assert self._calls_changed is not None, "FakeBotApi is not started"
        key = method.lower()

        def pending() -> Call | None:
            matching = self.calls(method)
            cursor = self._state.cursors.get(key, 0)
            while cursor < len(matching):
                call = matching[cursor]
                cursor += 1
                if call.ok or not ok_only:
                    self._state.cursors[key] = cursor
                    return call
            self._state.cursors[key] = cursor
            return None

        try:
            async with asyncio.timeout(timeout), self._calls_changed:
                while (call := pending()) is None:
                    await self._calls_changed.wait()
                return call
        except TimeoutError:
            seen = [c.method for c in self._state.calls[-10:]]
            raise TimeoutError(
                f"no {method} call within {timeout} s (last calls: {seen})"
            ) from None

    def sent_messages(self, chat_id: int) -> list[str]:
        """Texts (and captions) the bot sent to `chat_id`, as sent (edits: see message())."""
        return [
            text for (chat, _), text in sorted(self._state.raw_texts.items()) if chat == chat_id
        ]

    def message(self, chat_id: int, message_id: int) -> JSON:
        """The stored Message object (current text and markup after edits)."""
        return self._state.messages[(chat_id, message_id)]

    def commands(self, scope: JSON | None = None, language_code: str = "") -> list[JSON]:
        """The command list setMyCommands stored for `scope`/`language_code`."""
        return self._state.commands.get(self._commands_key(scope, language_code), [])

    def send_times(self, chat_id: int) -> list[float]:
        """Monotonic times of the successful sends to `chat_id`."""
        return list(self._state.send_times.get(chat_id, []))

    def max_sends_in_window(self, chat_id: int, window: float) -> int:
        """The most sends to `chat_id` within any `window` seconds (flood-limit checks)."""
        times = sorted(self._state.send_times.get(chat_id, []))
        best = 0
        start = 0
        for end, moment in enumerate(times):
            while moment - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def flood_refusals(self, chat_id: int) -> int:
        """How many calls to `chat_id` the group flood limit answered with 429."""
        return self._state.flood_refusals.get(chat_id, 0)

    def topics(self, chat_id: int) -> dict[int, str]:
        """The topics of forum `chat_id`: thread id -> name."""
        return {
            thread_id: str(topic["name"])
            for thread_id, topic in sorted(self._state.topics.get(chat_id, {}).items())
        }

    @property
    def pending_updates(self) -> int:
        """Updates queued and not yet confirmed by a getUpdates offset."""
        return len(self._state.updates)

    # Acting as a user

    def add_file(self, file_id: str, data: bytes, name: str) -> str:
        """Register a downloadable file; returns its file_path (getFile answers with it)."""
        stored = _StoredFile(file_id, f"u{file_id[-12:]}", f"documents/{name}", data)
        self._state.files[file_id] = stored
        self._state.files_by_path[stored.file_path] = stored
        return stored.file_path

    def queue_update(self, update: JSON) -> int:
        """Queue a raw update (update_id assigned if missing) and wake getUpdates."""
        if "update_id" not in update:
            self._next_update_id += 1
            update = {"update_id": self._next_update_id, **update}
        self._state.updates.append(update)
        self._wake_pollers()
        return int(update["update_id"])

    def pop_updates(self) -> list[JSON]:
        """Take the queued updates out of the queue: a test delivers them to a webhook, as
        Telegram does once setWebhook was called."""
        updates = list(self._state.updates)
        self._state.updates.clear()
        return updates

    def send_user_message(
        self,
        user_id: int,
        chat_id: int,
        text: str | None = None,
        *,
        chat_type: str = "private",
        reply_to_message_id: int | None = None,
        photo: bytes | None = None,
        document: tuple[str, bytes] | tuple[str, bytes, str] | None = None,
        caption: str | None = None,
        thread_id: int | None = None,
    ) -> int:
        """Queue a message from user `user_id` in `chat_id`, like a real client; returns its id.

        `thread_id` posts in that topic of a forum (`chat_type` is then ignored); a reply to a
        message in a topic is in that topic too, as in Telegram.
        """
        replied = None
        if reply_to_message_id is not None:
            replied = self._state.messages.get((chat_id, reply_to_message_id))
            if replied is None:
                raise ValueError(f"no message {reply_to_message_id} in chat {chat_id}")
            if thread_id is None and replied.get("is_topic_message"):
                thread_id = replied.get("message_thread_id")
        if thread_id is None:
            chat = self._chat(chat_id, chat_type)
        elif thread_id in self._state.topics.get(chat_id, {}):
            chat = self._state.chats[chat_id]
        else:
            raise ValueError(f"no topic {thread_id} in chat {chat_id}")
        message_id = self._new_message_id(chat_id)
        message: JSON = {
            "message_id": message_id,
            "from": self._user(user_id),
            "chat": chat,
            "date": int(time.time()),
        }
        if text is not None:
            message["text"] = text
            if text.startswith("/"):
                # PTB's CommandHandler needs the bot_command entity at offset 0.
                command = text.split(maxsplit=1)[0]
                message["entities"] = [
                    {"type": "bot_command", "offset": 0, "length": utf16_len(command)}
                ]
        if thread_id is not None:
            self._place_in_topic(message, chat_id, thread_id)
        if replied is not None:
            message["reply_to_message"] = _without_reply(replied)
        if photo is not None:
            file_id = self._store_upload(photo, "photos", "photo.jpg")
            message["photo"] = [
                {
                    "file_id": file_id,
                    "file_unique_id": f"u{file_id}",
                    "width": 800,
                    "height": 600,
                    "file_size": len(photo),
                }
            ]
        if document is not None:
            name, data = document[0], document[1]
            mime = document[2] if len(document) == 3 else None
            file_id = self._store_upload(data, "documents", name)
            message["document"] = {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_name": name,
                "mime_type": mime or mimetypes.guess_type(name)[0] or "application/octet-stream",
                "file_size": len(data),
            }
        if caption is not None:
            message["caption"] = caption
        self._state.messages[(chat_id, message_id)] = message
        self.queue_update({"message": message})
        return message_id

    def press_button(self, user_id: int, chat_id: int, message_id: int, data: str) -> str:
        """Queue a callback_query for an inline button on a bot message; returns its id."""
        message = self._state.messages.get((chat_id, message_id))
        if message is None:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        query_id = str(next(self._ids) + 7_000_000)
        self._state.callback_ids.add(query_id)
        self.queue_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": self._user(user_id),
                    "message": message,
                    "chat_instance": str(chat_id),
                    "data": data,
                }
            }
        )
        return query_id

    # Helpers for the objects Telegram returns

    def _user(self, user_id: int) -> JSON:
        """A User object for a human."""
        return {
            "id": user_id,
            "is_bot": False,
            "first_name": f"User{user_id}",
            "username": f"user{user_id}",
            "language_code": "en",
        }

    def _chat(self, chat_id: int, chat_type: str | None = None) -> JSON:
        """The Chat object for `chat_id`, created on first use."""
        chat = self._state.chats.get(chat_id)
        if chat is None or (chat_type is not None and chat["type"] != chat_type):
            if chat_type is None:
                chat_type = "private" if chat_id > 0 else "supergroup"
            if chat_type == "private":
                chat = {"id": chat_id, "type": "private", "first_name": f"User{chat_id}"}
            else:
                chat = {"id": chat_id, "type": chat_type, "title": f"Chat {chat_id}"}
            self._state.chats[chat_id] = chat
        return chat

    def _new_message_id(self, chat_id: int) -> int:
        """Next message id in `chat_id` (ids are per chat, shared by bot and users)."""
        self._state.next_message_id[chat_id] += 1
        return self._state.next_message_id[chat_id]

    def _new_topic(
        self, chat_id: int, chat: JSON, creator: JSON, name: str, icon_color: int
    ) -> JSON:
        """Record a topic and its creation message (whose id is the topic's thread id)."""
        thread_id = self._new_message_id(chat_id)
        topic: JSON = {"message_thread_id": thread_id, "name": name, "icon_color": icon_color}
        self._state.topics[chat_id][thread_id] = topic
        self._state.messages[(chat_id, thread_id)] = {
            "message_id": thread_id,
            "from": creator,
            "chat": chat,
            "date": int(time.time()),
            "message_thread_id": thread_id,
            "is_topic_message": True,
            "forum_topic_created": {"name": name, "icon_color": icon_color},
        }
        return topic

    def _place_in_topic(self, message: JSON, chat_id: int, thread_id: int) -> None:
        """Mark `message` as posted in a topic; unless it replies, it replies to the topic."""
        if thread_id not in self._state.topics.get(chat_id, {}):
            raise BotApiError(400, "Bad Request: message thread not found")
        message["message_thread_id"] = thread_id
        message["is_topic_message"] = True
        # Telegram: a message in a topic that replies to nothing carries the topic's
        # forum_topic_created service message as reply_to_message.
        created = self._state.messages.get((chat_id, thread_id))
        if created is not None:
            message.setdefault("reply_to_message", _without_reply(created))

    def _check_chat(self, method: str, params: JSON) -> None:
        """Refuse a call as Telegram does: migrated, forbidden or lost chat, flood, bad topic."""
        try:
            chat_id = _as_int(params.get("chat_id"), "chat_id")
        except BotApiError:
            return  # no (numeric) chat_id: the method decides
        new_id = self._state.migrated.get(chat_id)
        if new_id is not None:
            # PTB turns parameters.migrate_to_chat_id into telegram.error.ChatMigrated.
            raise BotApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": new_id},
            )
        refused = self._state.refused_chats.get(chat_id)
        if refused is not None:
            raise BotApiError(*refused)
        if "message_thread_id" in params:
            thread_id = _as_int(params["message_thread_id"], "message_thread_id")
            if thread_id not in self._state.topics.get(chat_id, {}):
                raise BotApiError(400, "Bad Request: message thread not found")
        if method.lower() in SEND_METHODS:
            self._check_flood(chat_id)

    def _check_flood(self, chat_id: int) -> None:
        """Answer 429 when group `chat_id` had `group_limit` sends in the last window."""
        limit = self.group_limit
        if limit is None or chat_id >= 0:
            return
        now = time.monotonic()
        recent = sorted(
            moment
            for moment in self._state.send_times.get(chat_id, [])
            if moment > now - self.group_window
        )
        if len(recent) < limit:
            return
        # The window frees when the limit-th most recent accepted send leaves it.
        retry_after = max(1, math.ceil(recent[-limit] + self.group_window - now))
        self._state.flood_refusals[chat_id] += 1
        raise BotApiError(
            429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}
        )

    def _store_upload(self, data: bytes, folder: str, name: str) -> str:
        """Register `data` as a file and return its new file_id."""
        file_id = f"BQACAgIAAx{next(self._ids):08d}"
        # Like Telegram, the path keeps only the extension of the user's file name.
        suffix = PurePosixPath(name).suffix if name.isprintable() else ""
        stored = _StoredFile(file_id, f"u{file_id}", f"{folder}/file_{file_id}{suffix}", data)
        self._state.files[file_id] = stored
        self._state.files_by_path[stored.file_path] = stored
        return file_id

    def _wake_pollers(self) -> None:
        """Wake a waiting getUpdates, also when called from another thread."""
        event, loop = self._updates_changed, self._loop
        if event is None or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    @staticmethod
    def _commands_key(scope: Any, language_code: Any) -> str:
        """Key of one setMyCommands list."""
        scope = scope or {"type": "default"}
        return json.dumps([scope, language_code or ""], sort_keys=True)

    # HTTP handlers

    async def _read_params(self, request: web.Request) -> JSON:
        """Decode query, form, multipart or JSON parameters."""
        params: JSON = {k: _decode_param(k, v) for k, v in request.query.items()}
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    params[name] = Upload(value.filename, value.content_type, value.file.read())
                else:
                    params[name] = _decode_param(name, str(value))
        return params

    async def _record(self, call: Call) -> None:
        """Append to the call log and wake next_call()."""
        self._state.calls.append(call)
        assert self._calls_changed is not None
        async with self._calls_changed:
            self._calls_changed.notify_all()

    async def _handle_method(self, request: web.Request) -> web.Response:
        """Answer POST/GET /bot{token}/{method}."""
        arrived = time.monotonic()
        method = request.match_info["method"]
        params = await self._read_params(request)
        if self._down:
            await self._record(Call(method, params, arrived, 502))
            return _nginx_response(502)
        if request.match_info["token"] != self.token:
            await self._record(Call(method, params, arrived, 401))
            return _error_response(401, "Unauthorized")
        fault = self._take_fault(method)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)  # simulates a slow server, not a synchronisation
        if fault is not None and fault.status is not None:
            await self._record(Call(method, params, arrived, fault.status))
            return _fault_response(fault)
        try:
            self._check_chat(method, params)
            result = await self._dispatch(method, params)
        except BotApiError as error:
            await self._record(Call(method, params, arrived, error.status))
            return _error_response(error.status, error.description, error.parameters)
        if method.lower() in SEND_METHODS and "chat_id" in params:
            self._state.send_times[_as_int(params["chat_id"], "chat_id")].append(arrived)
        await self._record(Call(method, params, arrived, 200, result))
        return web.json_response({"ok": True, "result": result})

    async def _handle_file(self, request: web.Request) -> web.Response:
        """Serve GET /file/bot{token}/{file_path}."""
        if self._down:
            return _nginx_response(502)
        if request.match_info["token"] != self.token:
            return _error_response(401, "Unauthorized")
        stored = self._state.files_by_path.get(request.match_info["path"])
        if stored is None:
            return _error_response(404, "Not Found")
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def _dispatch(self, method: str, params: JSON) -> Any:
        """Run one Bot API method and return its `result`."""
        name = method.lower()
        if name == "getme":
            return {
                **self.bot,
                "can_join_groups": True,
                "can_read_all_group_messages": False,
                "supports_inline_queries": False,
            }
        if name == "getupdates":
            return await self._get_updates(params)
        if name == "deletewebhook":
            if params.get("drop_pending_updates"):
                self._state.updates.clear()
            self.webhook = None
            return True
        if name == "setwebhook":
            # Bot API: the URL must be HTTPS; the secret token 1-256 of A-Z a-z 0-9 _ -.
            url = str(params.get("url", ""))
            if not url.startswith("https://"):
                raise BotApiError(400, "Bad Request: bad webhook: HTTPS url must be provided")
            self.webhook = {"url": url, "secret_token": params.get("secret_token")}
            return True
        if name == "getwebhookinfo":
            return {
                "url": "",
                "has_custom_certificate": False,
                "pending_update_count": len(self._state.updates),
            }
        if name == "sendmessage":
            return self._send_message(params)
        if name in ("senddocument", "sendphoto"):
            return self._send_file(name.removeprefix("send"), params)
        if name == "createforumtopic":
            return self._create_topic(params)
        if name == "deleteforumtopic":
            chat_id, _ = self._target(params)
            self.delete_topic(chat_id, _as_int(params.get("message_thread_id"), "thread"))
            return True
        if name == "editmessagetext":
            return self._edit_message(params, text=True)
        if name == "editmessagereplymarkup":
            return self._edit_message(params, text=False)
        if name == "answercallbackquery":
            if params.get("callback_query_id") not in self._state.callback_ids:
                raise BotApiError(
                    400,
                    "Bad Request: query is too old and response timeout expired or "
                    "query ID is invalid",
                )
            return True
        if name == "setmycommands":
            key = self._commands_key(params.get("scope"), params.get("language_code"))
            self._state.commands[key] = list(params.get("commands") or [])
            return True
        if name == "getmycommands":
            return self.commands(params.get("scope"), params.get("language_code") or "")
        if name == "deletemycommands":
            key = self._commands_key(params.get("scope"), params.get("language_code"))
            self._state.commands.pop(key, None)
            return True
        if name == "getfile":
            stored = self._state.files.get(str(params.get("file_id")))
            if stored is None:
                raise BotApiError(400, "Bad Request: invalid file_id")
            return {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "file_size": len(stored.data),
                "file_path": stored.file_path,
            }
        return True  # sendChatAction, logOut, ...: recorded, and fine

    async def _get_updates(self, params: JSON) -> list[JSON]:
        """Long polling: confirm updates below `offset`, wait up to `timeout` for new ones."""
        assert self._updates_changed is not None
        assert self._closing is not None
        updates = self._state.updates
        offset = params.get("offset")
        if isinstance(offset, int):
            if offset < 0:
                while len(updates) > -offset:
                    updates.popleft()
            else:
                while updates and updates[0]["update_id"] < offset:
                    updates.popleft()
        limit = params.get("limit") or 100
        timeout = float(params.get("timeout") or 0)
        # Telegram answers 409 to an older getUpdates when a newer one arrives.
        self._poll_generation += 1
        generation = self._poll_generation
        self._updates_changed.set()
        deadline = time.monotonic() + timeout
        while not updates and not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._updates_changed.clear()
            waiters = [
                asyncio.ensure_future(self._updates_changed.wait()),
                asyncio.ensure_future(self._closing.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when="FIRST_COMPLETED")
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if generation != self._poll_generation:
                raise BotApiError(
                    409,
                    "Conflict: terminated by other getUpdates request; make sure that only "
                    "one bot instance is running",
                )
        return list(itertools.islice(updates, int(limit)))

    def _target(self, params: JSON) -> tuple[int, JSON]:
        """The chat a send/edit addresses."""
        if "chat_id" not in params:
            raise BotApiError(400, "Bad Request: chat_id is empty")
        chat_id = _as_int(params["chat_id"], "chat_id")
        return chat_id, self._chat(chat_id)

    def _visible(self, text: str, parse_mode: Any, limit: int, empty_error: str) -> str:
        """Validate formatting and length; return the text the user will see."""
        visible = html_to_text(text) if str(parse_mode).upper() == "HTML" else text
        if not visible.strip():
            raise BotApiError(400, f"Bad Request: {empty_error}")
        if len(visible) > limit:
            raise BotApiError(400, "Bad Request: message is too long")
        return visible

    def _new_bot_message(self, chat_id: int, chat: JSON, params: JSON) -> JSON:
        """Start a Message object sent by the bot, honouring reply parameters."""
        message: JSON = {
            "message_id": self._new_message_id(chat_id),
            "from": self.bot,
            "chat": chat,
            "date": int(time.time()),
        }
        reply_to = params.get("reply_to_message_id")
        reply_parameters = params.get("reply_parameters")
        if isinstance(reply_parameters, dict):
            reply_to = reply_parameters.get("message_id")
        thread = params.get("message_thread_id")
        if reply_to is not None:
            replied = self._state.messages.get((chat_id, _as_int(reply_to, "message_id")))
            allow = isinstance(reply_parameters, dict) and reply_parameters.get(
                "allow_sending_without_reply"
            )
            if replied is None and not allow:
                raise BotApiError(400, "Bad Request: message to be replied not found")
            if replied is not None:
                message["reply_to_message"] = _without_reply(replied)
                if thread is None and replied.get("is_topic_message"):
                    thread = replied.get("message_thread_id")  # a reply stays in its topic
        if thread is not None:
            self._place_in_topic(message, chat_id, _as_int(thread, "message_thread_id"))
        markup = params.get("reply_markup")
        # Bot API: a Message carries only an inline keyboard; ForceReply and reply keyboards
        # act on the client and are not returned.
        if isinstance(markup, dict) and "inline_keyboard" in markup:
            message["reply_markup"] = markup
        return message

    def _send_message(self, params: JSON) -> JSON:
        """sendMessage."""
        chat_id, chat = self._target(params)
        text = params.get("text")
        if not isinstance(text, str) or not text:
            raise BotApiError(400, "Bad Request: message text is empty")
        visible = self._visible(text, params.get("parse_mode"), MAX_TEXT, "message text is empty")
        message = self._new_bot_message(chat_id, chat, params)
        message["text"] = visible
        self._state.messages[(chat_id, message["message_id"])] = message
        self._state.raw_texts[(chat_id, message["message_id"])] = text
        return message

    def _send_file(self, kind: str, params: JSON) -> JSON:
        """sendDocument / sendPhoto (upload, or an existing file_id)."""
        chat_id, chat = self._target(params)
        media = params.get(kind)
        if isinstance(media, Upload):
            name = media.filename or kind
            file_id = self._store_upload(media.data, f"{kind}s", name)
            size, mime = len(media.data), media.content_type
        elif isinstance(media, str) and media in self._state.files:
            file_id, name = media, self._state.files[media].file_path.rsplit("/", 1)[-1]
            size, mime = len(self._state.files[media].data), "application/octet-stream"
        else:
            raise BotApiError(400, f"Bad Request: there is no {kind} in the request")
        message = self._new_bot_message(chat_id, chat, params)
        if kind == "photo":
            message["photo"] = [
                {
                    "file_id": file_id,
                    "file_unique_id": f"u{file_id}",
                    "width": 800,
                    "height": 600,
                    "file_size": size,
                }
            ]
        else:
            message["document"] = {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_name": name,
                "mime_type": mime,
                "file_size": size,
            }
        caption = params.get("caption")
        if isinstance(caption, str) and caption:
            message["caption"] = self._visible(
                caption, params.get("parse_mode"), MAX_CAPTION, "message caption is empty"
            )
            self._state.raw_texts[(chat_id, message["message_id"])] = caption
        self._state.messages[(chat_id, message["message_id"])] = message
        return message

    def _create_topic(self, params: JSON) -> JSON:
        """createForumTopic: a ForumTopic, and its forum_topic_created service message."""
        chat_id, chat = self._target(params)
        if not chat.get("is_forum"):
            raise BotApiError(400, "Bad Request: the chat is not a forum")
        name = params.get("name")
        if not isinstance(name, str) or not name.strip():
            # MTProto's error code, which the Bot API passes on after "Bad Request: ".
            raise BotApiError(400, "Bad Request: TOPIC_TITLE_EMPTY")
        icon_color = _as_int(params.get("icon_color", TOPIC_COLOR), "icon_color")
        topic = self._new_topic(chat_id, chat, self.bot, name, icon_color)
        if params.get("icon_custom_emoji_id"):
            topic["icon_custom_emoji_id"] = params["icon_custom_emoji_id"]
        return dict(topic)

    def _edit_message(self, params: JSON, *, text: bool) -> JSON | bool:
        """editMessageText / editMessageReplyMarkup."""
        if params.get("inline_message_id"):
            return True
        chat_id, _ = self._target(params)
        message_id = _as_int(params.get("message_id"), "message_id")
        message = self._state.messages.get((chat_id, message_id))
        if message is None:
            raise BotApiError(400, "Bad Request: message to edit not found")
        if message["from"].get("id") != self.bot["id"]:
            raise BotApiError(400, "Bad Request: message can't be edited")
        # Bot API: leaving reply_markup out of an edit removes the inline keyboard.
        markup = params.get("reply_markup")
        new_text = message.get("text")
        if text:
            raw_text = params.get("text")
            if not isinstance(raw_text, str) or not raw_text:
                raise BotApiError(400, "Bad Request: message text is empty")
            new_text = self._visible(
                raw_text, params.get("parse_mode"), MAX_TEXT, "message text is empty"
            )
        if new_text == message.get("text") and markup == message.get("reply_markup"):
            raise BotApiError(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup "
                "of the message",
            )
        edited = {**message, "edit_date": int(time.time())}
        if new_text is not None:
            edited["text"] = new_text
        if markup is None:
            edited.pop("reply_markup", None)
        else:
            edited["reply_markup"] = markup
        self._state.messages[(chat_id, message_id)] = edited
        return edited


def _error_response(status: int, description: str, parameters: JSON | None = None) -> web.Response:
    """A Bot API error body: ok=false, error_code, description (and parameters)."""
    body: JSON = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)


def _fault_response(fault: _Fault) -> web.Response:
    """The answer for an injected fault."""
    status = fault.status
    assert status is not None
    if status == 429:
        retry_after = fault.retry_after or 1
        return _error_response(
            429,
            fault.description or f"Too Many Requests: retry after {retry_after}",
            {"retry_after": retry_after},
        )
    if status in (502, 503, 504) and fault.description is None:
        return _nginx_response(status)
    return _error_response(status, fault.description or _default_description(status))


def _nginx_response(status: int) -> web.Response:
    """The HTML page nginx serves when the Bot API server behind it is unreachable."""
    title = _NGINX_TITLES[status]
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return web.Response(status=status, text=page, content_type="text/html")


def _default_description(status: int) -> str:
    """Telegram-like descriptions for common statuses."""
    return {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden: bot was blocked by the user",
        404: "Not Found",
        409: "Conflict",
        500: "Internal Server Error",
    }.get(status, f"Error {status}")
