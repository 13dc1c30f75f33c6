"""/search on a 20,000-mail folder: IMAP SEARCH through bridge.actions.search, and in the chat.

Run from the repository root:  .venv/bin/python bench/search.py [--mails 20000] [--runs 5]

One Dovecot user's INBOX is filled with --mails plain-text mails by writing maildir files
directly (DovecotServer.fill), then a few files are rewritten in place with words of the same
length (the maildir file name carries the size): every 100th subject says "kangaroo" instead
of "ordinary" (1%), every 10th mail is from bob@example.net instead of ann@example.org (10%).
Each file's mtime, which Dovecot takes as the INTERNALDATE, is set 30 minutes after the one
before, so that the folder spans about 400 days and `since:` matches only the newest ones.
Every subject holds "report", which matches every mail.

Phase 1 times `bridge.actions.search(imap, ["INBOX"], query, limit=10)` for each query, --runs
times, each on its own fresh connection as the bridge does (TLS, LOGIN, EXAMINE, SORT or SEARCH,
FETCH INTERNALDATE, EXAMINE, FETCH of the hits' summary sources, FETCH headers, LOGOUT). The cost
of the connection alone (with_connection doing nothing) is printed for comparison. Dovecot's
first SELECT of the new files (it indexes them) is timed separately, before any search.

Phase 2 runs `bridge.app.run` in this process (bench/latency.py's pattern, the integration
tests' settings) and types `/search QUERY` into the chat as the owner: the time from queuing
the message at the fake Bot API to the results message arriving there (`Call.time`). The
search job's parts are timed by wrapping bridge.actions.search and
bridge.actions.fetch_summary_source from this script (timestamps and call counts only; the
bridge's code is not changed): each fetch_summary_source call is one more IMAP connection.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402

from bench.machine import machine  # noqa: E402
from bridge import actions  # noqa: E402
from bridge.config import ImapSettings  # noqa: E402
from bridge.mail.imap import with_connection  # noqa: E402
from tests.integration.conftest import OWNER, make_settings, running  # noqa: E402
from tests.servers.botapi import Call, FakeBotApi  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer, MailUser  # noqa: E402

STEP = 1800  # seconds between two mails' INTERNALDATEs
SINCE_DAYS = 30
BODY = "".join(
    f"Line {n}: the figures for this week are in the usual place; nothing unusual to note.\n"
    for n in range(18)
)
TEMPLATE = (
    "From: Ann Example <ann@example.org>\n"
    "To: me@example.org\n"
    "Subject: Weekly ordinary report {i}\n"
    "Message-ID: <bench-{i}@example.org>\n"
    "Date: Mon, 03 Jun 2024 10:00:00 +0000\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    f"Hello,\n\n{BODY}\nAnn\n"
).encode()
# Same-length swaps (maildir names carry S=<size>).
RARE = (b"Subject: Weekly ordinary", b"Subject: Weekly kangaroo")
OTHER_SENDER = (b"From: Ann Example <ann@example.org>", b"From: Bob Example <bob@example.net>")
_NUMBER = re.compile(r"\.M(\d+)P")


def queries(now: float) -> list[tuple[str, str]]:
    """(label, /search argument) of the measured queries."""
    since = dt.datetime.fromtimestamp(now, dt.UTC).date() - dt.timedelta(days=SINCE_DAYS)
    return [
        ("word in 1% (TEXT)", "kangaroo"),
        ("word in every mail (TEXT)", "report"),
        ("from: 10%", "from:bob@example.net"),
        (f"since: last {SINCE_DAYS} days", f"since:{since.isoformat()}"),
    ]


def fill(dovecot: DovecotServer, user: MailUser, n: int, now: float) -> float:
    """Write n mails into the user's INBOX; returns seconds taken."""
    started = time.monotonic()
    dovecot.fill(user.name, n, TEMPLATE)
    cur = dovecot.user_maildir(user.name) / "cur"
    for path in cur.iterdir():
        found = _NUMBER.search(path.name)
        if found is None:
            continue
        i = int(found.group(1))
        if i % 100 == 0 or i % 10 == 3:
            data = path.read_bytes()
            if i % 100 == 0:
                data = data.replace(*RARE, 1)
            if i % 10 == 3:
                data = data.replace(*OTHER_SENDER, 1)
            path.write_bytes(data)
        stamp = now - (n - i) * STEP
        os.utime(path, (stamp, stamp))
    return time.monotonic() - started


def first_select(
    dovecot: DovecotServer, user: MailUser, texts: list[str]
) -> tuple[float, dict[str, int]]:
    """Seconds for Dovecot's first SELECT (indexing), and each query's number of matches."""
    client = dovecot.connect(user.name, user.password, timeout=300)
    try:
        started = time.monotonic()
        info = client.select_folder("INBOX", readonly=True)
        took = time.monotonic() - started
        counts: dict[str, int] = {"EXISTS": int(info[b"EXISTS"])}
        for text in texts:
            query, _, _ = actions.parse_query(text)
            criteria, charset = actions._criteria(query, gmail=False)
            started = time.monotonic()
            counts[text] = len(client.search(criteria, charset))
            counts[f"{text} ms"] = round((time.monotonic() - started) * 1000)
    finally:
        client.logout()
    return took, counts


def newest_subject(hits: list[actions.SearchHit]) -> str:
    if not hits:
        return ""
    found = re.search(rb"(?im)^Subject: *(.*?)\r?$", hits[0].header)
    return found.group(1).decode() if found else ""


def fmt(values: list[float]) -> str:
    return " ".join(f"{v * 1000:7.0f}" for v in values)


async def direct_phase(
    args: argparse.Namespace, imap: ImapSettings, measured: list[tuple[str, str]]
) -> None:
    print()
    print(f"bridge.actions.search(imap, ['INBOX'], query, limit=10), ms; {args.runs} runs each")
    print(f"{'query':<28}{'argument':<24}{'p50':>7}   runs")
    connects = []
    for _ in range(args.runs):
        started = time.monotonic()
        await with_connection(imap, lambda conn: None)
        connects.append(time.monotonic() - started)
    print(f"{'(connection alone)':<52}{statistics.median(connects) * 1000:7.0f}   {fmt(connects)}")
    for label, text in measured:
        query, _, _ = actions.parse_query(text)
        times: list[float] = []
        hits: list[actions.SearchHit] = []
        for _ in range(args.runs):
            started = time.monotonic()
            hits = await actions.search(imap, ["INBOX"], query, limit=10)
            times.append(time.monotonic() - started)
        print(f"{label:<28}{text:<24}{statistics.median(times) * 1000:7.0f}   {fmt(times)}")
        print(f"{'':<28}{len(hits)} hits; newest: {newest_subject(hits)!r}")


# --- phase 2: /search in the chat ---------------------------------------------------------

SPANS: list[tuple[str, float, float]] = []  # (what, start, end), monotonic


def instrument() -> None:
    """Time the search job's IMAP parts (wrappers only; the bridge's code is unchanged)."""

    def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(*args: Any, **kw: Any) -> Any:
            started = time.monotonic()
            try:
                return await original(*args, **kw)
            finally:
                SPANS.append((name, started, time.monotonic()))

        return wrapper

    actions.search = timed("search", actions.search)
    actions.fetch_summary_source = timed("fetch_summary_source", actions.fetch_summary_source)


def replied_to(call: Call) -> int:
    params = call.params.get("reply_parameters") or {}
    return int(params.get("message_id") or call.params.get("reply_to_message_id") or 0)


async def answer_to(botapi: FakeBotApi, message_id: int, within: float) -> Call:
    """The sendMessage that answers the user's message `message_id` (bounded wait)."""
    async with asyncio.timeout(within):
        while True:
            for call in botapi.calls("sendMessage"):
                if replied_to(call) == message_id:
                    return call
            await botapi.next_call("sendMessage", timeout=within)


async def chat_phase(
    args: argparse.Namespace,
    dovecot: DovecotServer,
    user: MailUser,
    ca: CA,
    workdir: Path,
    measured: list[tuple[str, str]],
) -> None:
    instrument()
    async with FakeBotApi() as botapi:
        settings = make_settings(
            workdir, dovecot=dovecot, user=user, botapi=botapi, ca_file=Path(ca.ca_file)
        )
        async with running(settings) as bridge:
            await bridge.ready(timeout=120)
            print()
            print(
                f"/search in the chat: user message queued -> results at the Bot API, ms;"
                f" {args.runs} runs each"
            )
            print(
                f"{'query':<28}{'p50':>7}   runs;  inside the job (p50): search, "
                f"N x fetch_summary_source (sum), rest"
            )
            for label, text in measured:
                totals: list[float] = []
                parts: list[tuple[float, float, float]] = []
                buttons = calls = 0
                for _ in range(args.runs):
                    SPANS.clear()
                    started = time.monotonic()
                    message_id = botapi.send_user_message(OWNER, OWNER, f"/search {text}")
                    call = await answer_to(botapi, message_id, within=args.timeout)
                    if not call.ok or "matches" not in str(call.params.get("text")):
                        raise RuntimeError(f"unexpected answer to /search {text}: {call}")
                    total = call.time - started
                    totals.append(total)
                    search = sum(e - s for n, s, e in SPANS if n == "search")
                    fetches = sum(e - s for n, s, e in SPANS if n == "fetch_summary_source")
                    calls = sum(n == "fetch_summary_source" for n, _, _ in SPANS)
                    parts.append((search, fetches, total - search - fetches))
                    markup = call.params.get("reply_markup") or {}
                    buttons = sum(len(row) for row in markup.get("inline_keyboard", []))
                medians = [statistics.median(p[k] for p in parts) * 1000 for k in range(3)]
                print(
                    f"{label:<28}{statistics.median(totals) * 1000:7.0f}   {fmt(totals)};"
                    f"  {medians[0]:.0f} / {calls} x = {medians[1]:.0f} / {medians[2]:.0f}"
                    f"  ({buttons} buttons)"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=20_000, help="mails in the folder (20000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per query (5)")
    parser.add_argument("--timeout", type=float, default=120, help="bound for one /search, s")
    parser.add_argument("--skip-chat", action="store_true", help="skip the /search-in-chat phase")
    args = parser.parse_args(argv)
    if not 100 <= args.mails <= 999_999 or args.runs < 1:
        parser.error("need 100 <= --mails <= 999999 and --runs >= 1")
    return args


async def main(args: argparse.Namespace) -> None:
    ca = CA()
    dovecot = DovecotServer(ca)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    try:
        dovecot.start()
        user = MailUser(f"search{secrets.token_hex(3)}", secrets.token_urlsafe(12))
        dovecot.add_user(user.name, user.password)
        now = time.time()
        measured = queries(now)
        filled = await asyncio.to_thread(fill, dovecot, user, args.mails, now)
        indexed, counts = await asyncio.to_thread(
            first_select, dovecot, user, [text for _, text in measured]
        )
        print()
        print(f"/search on a {args.mails:,}-mail folder")
        print(machine())
        print(
            f"Dovecot {'.'.join(map(str, dovecot.version))} (maildir, no FTS plugin); "
            f"fill {filled:.1f} s; first SELECT (Dovecot lists the new files) "
            f"{indexed * 1000:.0f} ms"
        )
        print(
            f"matches (of {counts['EXISTS']:,}) and the first, uncached SEARCH of each, "
            "plain imapclient on one connection:"
        )
        for _, text in measured:
            print(f"  {text:<24}{counts[text]:>7,} matches {counts[f'{text} ms']:>7} ms")
        imap = ImapSettings(
            host="127.0.0.1",
            port=dovecot.port,
            username=user.name,
            password=SecretStr(user.password),
            ca_file=ca.ca_file,
        )
        await direct_phase(args, imap, measured)
        if not args.skip_chat:
            await chat_phase(args, dovecot, user, ca, workdir, measured)
    finally:
        dovecot.cleanup()
        ca.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
