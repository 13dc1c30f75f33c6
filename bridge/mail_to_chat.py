"""Mail to chat, the mail side: one watcher per folder: IMAP -> parse -> route -> delivery.

A FolderWatcher owns one folder's cursor (UIDVALIDITY, UID). It fetches what lies above the
cursor, summarises and routes each mail, and writes the delivery rows together with the new
cursor in one transaction; posting is delivery.py's job. Folders within the account's
connection budget keep their own IDLE connection; the rest share one FolderPoller, which looks
at them with STATUS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses

from bridge import metrics
from bridge.config import AccountSettings, RouteSettings
from bridge.db import store
from bridge.db.engine import UNAVAILABLE, Database, unavailable_reason
from bridge.delivery import Delivery, topic_key
from bridge.errors import LeaseLost, MailError, PermanentMailError
from bridge.leases import Held
from bridge.mail.auth import TokenSource
from bridge.mail.imap import FETCH_BATCH, FetchedMail, FolderState, ImapSession
from bridge.mail.parse import ParsedMail, parse_mail
from bridge.mail.summary import render_summary, render_unparseable, with_origin
from bridge.retry import Backoff, Stopped, wait_or_stop
from bridge.routing import MailFacts, route

logger = logging.getLogger(__name__)
DATABASE_RETRY_CAP = 10.0  # seconds: a database back after an outage is noticed this soon


@dataclass
class FolderStatus:
    """What /status and /healthz show of one watched folder."""

    account: str
    folder: str
    # standby: not watched here (another instance holds its lease, or not started yet)
    state: str = "standby"
    mode: str = ""
    last_check: datetime | None = None
    last_uid: int = 0
    posted: int = 0
    muted: int = 0
    errors: int = 0
    last_error: str = ""
    since: datetime = field(default_factory=lambda: datetime.now(UTC))


def record_of(uid: int, mail: ParsedMail | None, summary: str) -> store.MailRecord:
    """The facts a later reply, digest line or re-post needs."""
    if mail is None:
        return store.MailRecord(uid, "", "", "", "", (), summary=summary)
    return store.MailRecord(
        uid=uid,
        message_id=mail.message_id,
        subject=mail.subject,
        sender=mail.from_addr,
        reply_to=", ".join(mail.reply_to),
        references=tuple(mail.references),
        sender_name=mail.from_name,
        summary=summary,
        attachments=len(mail.attachments),
    )


def facts_of(account: str, folder: str, mail: ParsedMail | None) -> MailFacts:
    """What routing looks at."""
    if mail is None:
        return MailFacts(account, folder, (), (), "")
    senders = ((mail.from_name, mail.from_addr),) if mail.from_name or mail.from_addr else ()
    return MailFacts(
        account=account,
        folder=folder,
        senders=senders,
        recipients=tuple(getaddresses([*mail.to, *mail.cc])),
        subject=mail.subject,
    )


def summarise(fetched: FetchedMail, preview_chars: int) -> tuple[str, ParsedMail | None]:
    """The summary text and the parsed mail (None when even parsing failed)."""
    try:
        mail = parse_mail(fetched.raw, structure=fetched.structure)
        return render_summary(mail, preview_chars=preview_chars), mail
    except Exception as exc:  # a mail must never stop the watcher
        logger.exception("could not parse mail uid %s", fetched.uid)
        return render_unparseable(fetched.uid, fetched.size, type(exc).__name__), None


class FolderWatcher:
    """One watched folder: its cursor, its checks, and (within the budget) its connection."""

    def __init__(
        self,
        account: AccountSettings,
        folder: str,
        *,
        db: Database,
        delivery: Delivery,
        routes: Sequence[RouteSettings],
        default_chats: Sequence[int],
        preview_chars: int,
        digest_threshold: int,
        origin: str = "",
        checked: asyncio.Event | None = None,
        executor: Executor | None = None,
        tokens: TokenSource | None = None,
    ) -> None:
        self.account, self.folder = account, folder
        self.tokens = tokens  # the account's OAuth2 tokens, for imap.auth = "oauth2"
        self.db, self.delivery = db, delivery
        self.routes, self.default_chats = routes, default_chats
        self.preview_chars, self.digest_threshold = preview_chars, digest_threshold
        self.origin = origin
        self.status = FolderStatus(account.name, folder)
        self.checked = checked or asyncio.Event()  # set after every check (tests, benchmarks)
        self.executor = executor
        self.mailbox: store.MailboxState | None = None
        self.fence: Held | None = None  # the lease this watcher works under
        self._outage = False
        self._database_down = False

    @property
    def name(self) -> str:
        """account/folder, for logs."""
        return f"{self.account.name}/{self.folder}"

    @property
    def context(self) -> dict[str, str]:
        """The account and folder, as extra= of a log call (JSON logs carry them)."""
        return {"account": self.account.name, "folder": self.folder}

    async def run(self, stop: asyncio.Event, held: Held | None = None) -> None:
        """Watch on an own connection until stop is set; connection errors never end it.

        Under a lease (`held`), every write checks it: after a takeover nothing is written.
        A database that cannot be used leaves the connection alone: the check is repeated on
        it, with backoff, until the database answers again.
        """
        self.fence = held
        self.status.state = "starting"
        backoff = Backoff()
        while not stop.is_set():
            session = ImapSession(self.account.imap, self.folder, self.executor, self.tokens)
            try:
                folder = await session.connect()
                self.recovered()
                backoff.reset()
                self.status.mode = "IDLE" if session.can_idle else "polling"
                self.mailbox = None  # read again: another instance may have moved the cursor
                waits = Backoff(first=0.5, cap=DATABASE_RETRY_CAP)
                while not stop.is_set():
                    try:
                        if self.mailbox is None:
                            await self.sync(session, folder, stop)
                        else:
                            await self.check(session, stop)
                    except UNAVAILABLE as exc:
                        self.database_down(exc)
                        await wait_or_stop(stop, waits.next())
                        continue  # the same connection: what is above the cursor, again
                    self.database_back()
                    waits.reset()
                    if session.can_idle:
                        await session.idle_wait(stop)
                    elif await wait_or_stop(stop, self.account.imap.poll_interval):
                        break
                    else:
                        await session.noop()
            except Stopped:
                break
            except LeaseLost as exc:
                logger.warning("%s: %s", self.name, exc)
                break
            except MailError as exc:
                if stop.is_set():
                    break  # stopping shuts the socket under a pending IDLE: no failure
                self.failed(exc)
                metrics.IMAP_RECONNECTS.labels(account=self.account.name).inc()
                await wait_or_stop(stop, backoff.next())
            finally:
                await session.close()
        self.status.state = "standby"

    def recovered(self) -> None:
        """The folder is reachable (again)."""
        if self._outage:
            self._outage = False
            logger.info("%s: IMAP connection restored", self.name, extra=self.context)
        self.status.state, self.status.last_error = "connected", ""

    def failed(self, exc: Exception) -> None:
        """Record a failure; logged once per outage, not once per retry."""
        self.status.state, self.status.errors = "disconnected", self.status.errors + 1
        self.status.last_error = str(exc)
        if not self._outage:
            self._outage = True
            level = logging.ERROR if isinstance(exc, PermanentMailError) else logging.WARNING
            logger.log(level, "%s: %s; retrying with backoff", self.name, exc, extra=self.context)

    def database_down(self, exc: Exception) -> None:
        """The database could not be used for this folder's check; logged once per outage."""
        if not self._database_down:
            self._database_down = True
            logger.warning(
                "%s: database unusable (%s); keeping the IMAP connection, checking again",
                self.name,
                unavailable_reason(exc),
                extra=self.context,
            )
        self.status.last_error = f"database unusable: {unavailable_reason(exc)}"

    def database_back(self) -> None:
        """A check went through the database (again)."""
        if self._database_down:
            self._database_down = False
            self.status.last_error = ""
            logger.info("%s: database usable again", self.name, extra=self.context)

    def unchanged(self, folder: FolderState) -> bool:
        """True when a STATUS answer shows nothing new since the last check."""
        return (
            self.mailbox is not None
            and folder.uidvalidity == self.mailbox.uidvalidity
            and 0 < folder.uidnext <= self.mailbox.last_uid + 1
        )

    async def sync(self, session: ImapSession, folder: FolderState, stop: asyncio.Event) -> None:
        """After a SELECT: load or start the cursor, then check."""
        self.mailbox = await self._mailbox_state(session, folder)
        await self.check(session, stop)

    async def _mailbox_state(
        self, session: ImapSession, folder: FolderState
    ) -> store.MailboxState:
        """The stored cursor; on first contact or a new UIDVALIDITY keep only BACKFILL as new."""
        account_id = await self.db.run(store.ensure_account, self.account.name)
        state = await self.db.run(store.get_mailbox, account_id, self.folder)
        if state is not None and state.uidvalidity == folder.uidvalidity:
            return state
        backfill = self.account.imap.backfill
        if backfill == 0 and folder.uidnext > 0:
            last = folder.uidnext - 1
        else:
            uids = await session.all_uids()
            last = uids[-backfill - 1] if len(uids) > backfill else 0
        if state is None:
            logger.info(
                "first contact with %s: UIDs up to %d count as seen",
                self.name,
                last,
                extra=self.context,
            )
        else:
            logger.warning(
                "UIDVALIDITY of %s changed; UIDs up to %d count as seen",
                self.name,
                last,
                extra=self.context,
            )
        return await self.db.run(
            store.reset_mailbox, account_id, self.folder, folder.uidvalidity, last
        )

    async def check(self, session: ImapSession, stop: asyncio.Event) -> None:
        """Hand every mail above the cursor to delivery, in UID order."""
        mailbox = self.mailbox
        if mailbox is None:
            raise PermanentMailError(f"{self.name}: checked before it was opened")
        uids = await session.uids_after(mailbox.last_uid)
        self.status.last_check = datetime.now(UTC)
        if uids:
            muted = await self.db.run(store.muted_addresses)
            if len(uids) >= self.digest_threshold:
                # A burst: headers only, never hundreds of full fetches, and recorded in one
                # transaction, so that delivery sees it whole and sends one combined message.
                mails = [(uid, parse_mail(raw)) for uid, raw in await session.headers(uids)]
                items: list[tuple[int, str, ParsedMail | None]] = [
                    (uid, render_summary(m, preview_chars=0), m) for uid, m in mails
                ]
                await self._record(mailbox, items, muted, uids[-1])
            else:
                await self._fetch_and_record(session, mailbox, uids, muted, stop)
        self.status.last_uid = self.mailbox.last_uid if self.mailbox else 0
        self.checked.set()

    async def _fetch_and_record(
        self,
        session: ImapSession,
        mailbox: store.MailboxState,
        uids: list[int],
        muted: set[str],
        stop: asyncio.Event,
    ) -> None:
        """Fetch and record batch by batch: the cursor moves with every batch."""
        for start in range(0, len(uids), FETCH_BATCH):
            if stop.is_set():
                raise Stopped
            batch = uids[start : start + FETCH_BATCH]
            items: list[tuple[int, str, ParsedMail | None]] = [
                (f.uid, *summarise(f, self.preview_chars)) for f in await session.fetch(batch)
            ]
            await self._record(mailbox, items, muted, batch[-1])

    async def _record(
        self,
        mailbox: store.MailboxState,
        items: list[tuple[int, str, ParsedMail | None]],
        muted: set[str],
        up_to: int,
    ) -> None:
        """Route a batch and write its delivery rows with the cursor, in one transaction."""
        entries: list[tuple[store.MailRecord, list[tuple[int, str]]]] = []
        muted_count = 0
        for uid, summary, mail in items:
            facts = facts_of(self.account.name, self.folder, mail)
            decision = route(facts, self.routes, self.default_chats, muted)
            destinations = [
                (self.delivery.current_chat(d.chat_id), topic_key(d.topic))
                for d in decision.destinations
            ]
            if decision.muted:
                self.status.muted += 1
                muted_count += 1
                logger.info(
                    "%s: mail uid %d not posted (%s)",
                    self.name,
                    uid,
                    decision.reason,
                    extra={**self.context, "uid": uid},
                )
            else:
                self.status.posted += 1
            entries.append((record_of(uid, mail, with_origin(summary, self.origin)), destinations))
        # A UID expunged between SEARCH and FETCH has nothing to post; don't ask again.
        await self.db.persist(
            store.record_mails_fenced, self.fence, mailbox.id, mailbox.uidvalidity, entries, up_to
        )
        self.mailbox = store.MailboxState(mailbox.id, mailbox.uidvalidity, up_to)
        self.delivery.wake()
        metrics.MAILS_SEEN.labels(account=self.account.name).inc(len(items))
        metrics.MAILS_MUTED.labels(account=self.account.name).inc(muted_count)


class FolderPoller:
    """Folders beyond the account's connection budget: one connection, STATUS each in turn."""

    def __init__(
        self, account: AccountSettings, watchers: list[FolderWatcher], executor: Executor | None
    ) -> None:
        self.account, self.watchers, self.executor = account, watchers, executor

    async def run(self, stop: asyncio.Event, held: Held | None = None) -> None:
        """Poll every POLL_INTERVAL until stop is set; reconnect with backoff."""
        for watcher in self.watchers:
            watcher.fence = held
            watcher.status.state = "starting"
        backoff = Backoff()
        while not stop.is_set():
            first = self.watchers[0]
            session = ImapSession(self.account.imap, first.folder, self.executor, first.tokens)
            try:
                await session.connect()
                backoff.reset()
                waits = Backoff(first=0.5, cap=DATABASE_RETRY_CAP)
                while not stop.is_set():
                    try:
                        for watcher in self.watchers:
                            await self._visit(session, watcher, stop)
                    except UNAVAILABLE as exc:
                        for watcher in self.watchers:
                            watcher.database_down(exc)
                        await wait_or_stop(stop, waits.next())
                        continue  # the same connection, the same round again
                    for watcher in self.watchers:
                        watcher.database_back()
                    waits.reset()
                    if await wait_or_stop(stop, self.account.imap.poll_interval):
                        break
            except (Stopped, LeaseLost):
                break
            except MailError as exc:
                for watcher in self.watchers:
                    watcher.failed(exc)
                metrics.IMAP_RECONNECTS.labels(account=self.account.name).inc()
                await wait_or_stop(stop, backoff.next())
            finally:
                await session.close()
        for watcher in self.watchers:
            watcher.status.state = "standby"

    async def _visit(
        self, session: ImapSession, watcher: FolderWatcher, stop: asyncio.Event
    ) -> None:
        """STATUS; SELECT and check only when the folder changed. A missing folder is that
        folder's problem, not the others'."""
        watcher.status.mode = "polled (STATUS)"
        try:
            folder = await session.folder_status(watcher.folder)
            if watcher.unchanged(folder):
                watcher.recovered()
                watcher.status.last_check = datetime.now(UTC)
                watcher.checked.set()
                return
            selected = await session.select(watcher.folder)
            watcher.recovered()
            await watcher.sync(session, selected, stop)
        except PermanentMailError as exc:
            watcher.failed(exc)
