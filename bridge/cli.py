"""The command line: run, check, migrate, send, export. The only module that prints."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import mimetypes
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from bridge import __version__
from bridge.errors import BridgeError, ConfigError, MailError

if TYPE_CHECKING:
    from bridge.config import AccountSettings, CoreSettings, ImapSettings, Settings
    from bridge.mail.auth import TokenSource
    from bridge.oauth import AccessTokens, Method

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors: one line, exit 2."""
        self.exit(EXIT_USAGE, f"mailbridge: error: {message}\n")


_CONFIG_HELP = "the TOML configuration file (default: BRIDGE_CONFIG_FILE, else ./mailbridge.toml)"
_ACCOUNT_HELP = "the account to use (default: the only one, else the first)"


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every command."""
    parser = _Parser(prog="mailbridge", description="Telegram <-> email bridge.")
    parser.add_argument("--version", action="version", version=f"mailbridge {__version__}")
    parser.add_argument("--config", default=None, metavar="PATH", help=_CONFIG_HELP)
    # Also accepted after the command; there it must not reset a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=_CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("run", parents=[common], help="run the bridge until SIGTERM/SIGINT")
    sub.add_parser("check", parents=[common], help="check the settings and log in to every server")
    sub.add_parser("migrate", parents=[common], help="apply the database migrations and exit")

    send = sub.add_parser("send", parents=[common], help="send one mail through an account's SMTP")
    send.add_argument("--account", default=None, metavar="NAME", help=_ACCOUNT_HELP)
    send.add_argument("--to", action="append", required=True, metavar="ADDR")
    send.add_argument("--cc", action="append", default=[], metavar="ADDR")
    send.add_argument("--bcc", action="append", default=[], metavar="ADDR")
    send.add_argument("--subject", required=True)
    body = send.add_mutually_exclusive_group()
    body.add_argument("--body", default=None)
    body.add_argument("--body-file", default=None, metavar="PATH|-")
    send.add_argument("--attach", action="append", default=[], metavar="FILE")

    export = sub.add_parser(
        "export", parents=[common], help="list the mailbox as JSON (never marks mail as read)"
    )
    export.add_argument("--account", default=None, metavar="NAME", help=_ACCOUNT_HELP)
    export.add_argument("--json", default=None, metavar="PATH", help="write here, not stdout")
    export.add_argument("--limit", type=int, default=None, metavar="N")
    export.add_argument("--mailbox", default=None, metavar="NAME")

    login = sub.add_parser(
        "login", parents=[common], help="sign an OAuth2 account in (tokens stored encrypted)"
    )
    login.add_argument("account", metavar="ACCOUNT", help="the account to sign in")
    how = login.add_mutually_exclusive_group()
    how.add_argument(
        "--device", dest="method", action="store_const", const="device", help="a code to enter"
    )
    how.add_argument(
        "--code", dest="method", action="store_const", const="code", help="a browser redirect"
    )
    login.add_argument(
        "--listen",
        type=int,
        default=None,
        metavar="PORT",
        help="with --code: catch the redirect on 127.0.0.1:PORT (else paste it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mailbridge` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.config is not None:
            _use_config(args.config)
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"mailbridge: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"mailbridge: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _use_config(path: str) -> None:
    """--config PATH: the same as BRIDGE_CONFIG_FILE=PATH, with an error that names the option."""
    from bridge.config import use_config_file

    if not Path(path).is_file():
        raise ConfigError(f"--config: no such file: {path}")
    use_config_file(path)


def _run(args: argparse.Namespace) -> int:
    from bridge import app
    from bridge.config import load_settings, secure_env_file
    from bridge.logs import setup_logging

    settings = load_settings()
    setup_logging(settings.core.log_level, settings.secrets(), settings.core.log_format)
    if secure_env_file():
        logging.getLogger("bridge").warning(".env was readable by others; it is now owner-only")
    asyncio.run(app.run(settings))
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    from bridge.config import load_core
    from bridge.db.engine import make_engine
    from bridge.db.migrate import upgrade_to_head
    from bridge.logs import setup_logging

    core = load_core()
    setup_logging(core.log_level, log_format=core.log_format)
    engine = make_engine(core.database_url)
    try:
        head = upgrade_to_head(engine)
    finally:
        engine.dispose()
    print(f"database at revision {head}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from bridge.config import load_settings
    from bridge.logs import SecretFilter, setup_logging

    settings = load_settings()
    setup_logging("WARNING", settings.secrets())
    mask = SecretFilter(settings.secrets()).mask
    results = asyncio.run(_checks(settings))
    print("ok    configuration")
    for ok, name, detail in results:
        print(mask(f"{'ok   ' if ok else 'FAIL '} {name}: {detail}"))
    return EXIT_OK if all(ok for ok, _, _ in results) else EXIT_FAILURE


async def _checks(settings: Settings) -> list[tuple[bool, str, str]]:
    """Every account's IMAP (each watched folder) and SMTP login, then Telegram, in order."""
    async with _oauth_tokens(settings.accounts, settings.core) as tokens:
        per_account = await asyncio.gather(*(_check_account(a, tokens) for a in settings.accounts))
    results = [result for pair in per_account for result in pair]
    results.append(await _check_telegram(settings))
    return results


async def _check_account(
    account: AccountSettings, tokens: AccessTokens
) -> list[tuple[bool, str, str]]:
    """One line for the account's OAuth2 sign-in (if it has one), one for the IMAP server and
    its folders, one for its SMTP server."""
    from bridge.mail import imap, smtp

    results: list[tuple[bool, str, str]] = []
    source = tokens.source(account.name)
    if source is not None:
        ok, text = await source.describe()
        results.append((ok, f"{account.name} OAuth2 ({source.provider.name})", text))
    im, sm = account.imap, account.smtp
    where = f"{account.name} IMAP {im.username}@{im.host}:{im.port}"
    try:
        results.append((True, where, await imap.check_folders(im, list(account.folders), source)))
    except MailError as exc:
        results.append((False, where, str(exc)))
    where = f"{account.name} SMTP {sm.user}@{sm.host}:{sm.port} ({sm.security})"
    try:
        results.append((True, where, await smtp.check_login(sm, source)))
    except MailError as exc:
        results.append((False, where, str(exc)))
    return results


async def _check_telegram(settings: Settings) -> tuple[bool, str, str]:
    """getMe through the configured Bot API server."""
    from telegram import Bot
    from telegram.error import TelegramError

    api = settings.telegram.api_url
    bot = Bot(
        settings.telegram.token.get_secret_value(),
        base_url=f"{api}/bot",
        base_file_url=f"{api}/file/bot",
    )
    try:
        async with bot:
            me = await bot.get_me()
    except TelegramError as exc:
        return False, f"Telegram {api}", f"getMe failed: {exc}"
    return True, f"Telegram {api}", f"bot @{me.username} (id {me.id})"


def _read_body(args: argparse.Namespace) -> str:
    if args.body is not None:
        return str(args.body)
    if args.body_file is None:
        return ""
    if args.body_file == "-":
        return sys.stdin.read()
    try:
        return Path(args.body_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--body-file: cannot read {args.body_file}: {exc}") from None


def _addresses(option: str, values: list[str]) -> tuple[str, ...]:
    """The addresses given with a repeated option; a bad one is a usage error naming it."""
    from bridge.mail import compose

    if not values:
        return ()
    try:
        return compose.parse_addresses(", ".join(values))
    except compose.InvalidMail as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _send(args: argparse.Namespace) -> int:
    from bridge.config import load_core, load_smtp, setting_name
    from bridge.logs import setup_logging
    from bridge.mail import compose, smtp

    smtp_settings = load_smtp(args.account)
    secrets = [smtp_settings.password.get_secret_value()] if smtp_settings.password else []
    setup_logging(load_core().log_level, secrets)
    attachments = []
    for name in args.attach:
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--attach: cannot read {name}: {exc.strerror}") from None
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        attachments.append(compose.OutgoingAttachment(path.name, content_type, data))
    sender = smtp_settings.sender
    try:
        message_id = compose.make_message_id(sender)
    except compose.InvalidMail as exc:
        # The sender is FROM_ADDRESS, else the SMTP login: name the setting to fix.
        name = setting_name("smtp.from_address", args.account)
        raise ConfigError(f"{name}: the sender {exc}") from None
    try:
        mail = compose.OutgoingMail(
            to=_addresses("--to", args.to),
            cc=_addresses("--cc", args.cc),
            bcc=_addresses("--bcc", args.bcc),
            subject=args.subject,
            body=_read_body(args),
            attachments=tuple(attachments),
        )
        message = compose.build_message(mail, sender, message_id=message_id)
    except compose.InvalidMail as exc:
        raise ConfigError(str(exc)) from None
    recipients = compose.envelope_recipients(mail)
    if smtp_settings.auth == "oauth2":
        answer = asyncio.run(_send_signed_in(message, recipients, args.account))
    else:
        answer = asyncio.run(smtp.send(message, recipients, smtp_settings))
    print(f"sent {message['Message-ID']}: {answer}")
    return EXIT_OK


async def _send_signed_in(message: Any, recipients: Sequence[str], name: str | None) -> str:
    """Send through an account that signs in to SMTP with OAuth2."""
    from bridge.config import load_oauth_account
    from bridge.mail import smtp

    core, account = load_oauth_account(name)
    async with _oauth_tokens([account], core) as tokens:
        source = tokens.source(account.name)
        return await smtp.send(message, recipients, account.smtp, tokens=source)


def _export(args: argparse.Namespace) -> int:
    from bridge.config import load_core, load_imap
    from bridge.logs import setup_logging

    imap_settings = load_imap(args.account)
    if args.mailbox:
        imap_settings = imap_settings.model_copy(update={"mailbox": args.mailbox})
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit: must be 0 or more")
    secrets = [imap_settings.password.get_secret_value()] if imap_settings.password else []
    setup_logging(load_core().log_level, secrets)
    if not args.json:
        asyncio.run(_export_to(sys.stdout, imap_settings, args.limit, args.account))
        return EXIT_OK
    target = Path(args.json)
    partial = target.with_name(target.name + ".part")  # a failed export leaves no half file
    try:
        with partial.open("w", encoding="utf-8") as out:
            count = asyncio.run(_export_to(out, imap_settings, args.limit, args.account))
        partial.replace(target)
    except OSError as exc:
        raise ConfigError(f"--json: cannot write {args.json}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {count} messages to {args.json}", file=sys.stderr)
    return EXIT_OK


async def _export_to(
    out: TextIO, settings: ImapSettings, limit: int | None, name: str | None
) -> int:
    """Write the JSON array batch by batch: memory stays flat for any mailbox size."""
    from bridge.config import load_oauth_account

    if settings.auth != "oauth2":
        return await _export_session(out, settings, limit, None)
    core, account = load_oauth_account(name)
    async with _oauth_tokens([account], core) as tokens:
        return await _export_session(out, settings, limit, tokens.source(account.name))


async def _export_session(
    out: TextIO, settings: ImapSettings, limit: int | None, source: TokenSource | None
) -> int:
    """The export on one session (logged in with the account's OAuth2 tokens, if given)."""
    from bridge.mail.imap import FETCH_BATCH, ImapSession

    session = ImapSession(settings, tokens=source)
    count = 0
    try:
        await session.connect()
        uids = (await session.all_uids())[::-1][:limit]
        out.write("[")  # only once the folder is open: a refused export prints nothing
        for start in range(0, len(uids), FETCH_BATCH):
            for mail in await session.fetch(uids[start : start + FETCH_BATCH]):
                item = json.dumps(_export_item(mail), ensure_ascii=False, indent=2)
                out.write(("\n" if count == 0 else ",\n") + textwrap.indent(item, "  "))
                count += 1
    finally:
        await session.close()
    out.write("\n]\n" if count else "]\n")
    return count


def _export_item(mail: Any) -> dict[str, Any]:
    """One message as INTERFACE.md lists its keys."""
    from bridge.mail.parse import parse_mail

    parsed = parse_mail(mail.raw, structure=mail.structure, text_limit=1_000_000)
    sender = parsed.from_addr
    if parsed.from_name:
        sender = f"{parsed.from_name} <{parsed.from_addr}>" if sender else parsed.from_name
    return {
        "uid": mail.uid,
        "message_id": parsed.message_id,
        "date": parsed.date.isoformat() if parsed.date else None,
        "from": sender,
        "to": parsed.to,
        "subject": parsed.subject,
        "text": parsed.text,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size}
            for a in parsed.attachments
        ],
    }


@contextlib.asynccontextmanager
async def _oauth_tokens(
    accounts: Sequence[AccountSettings], core: CoreSettings
) -> AsyncIterator[AccessTokens]:
    """The OAuth2 accounts' tokens from the database (migrated first); without an OAuth2
    account nothing is opened."""
    from bridge.db.engine import Database, make_engine
    from bridge.db.migrate import upgrade_to_head
    from bridge.oauth import AccessTokens

    if not any(a.uses_oauth2 for a in accounts):
        yield AccessTokens([], [], None)
        return
    engine = make_engine(core.database_url)
    try:
        await asyncio.to_thread(upgrade_to_head, engine)
        tokens = AccessTokens(accounts, core.secret_keys, Database(engine))
        try:
            yield tokens
        finally:
            await tokens.aclose()
    finally:
        engine.dispose()


def _login(args: argparse.Namespace) -> int:
    from bridge.config import load_oauth_account
    from bridge.logs import setup_logging
    from bridge.oauth import provider_of

    try:
        core, account = load_oauth_account(args.account)
    except ConfigError as exc:  # the account is named by the argument, not by --account
        raise ConfigError(str(exc).replace("--account:", "ACCOUNT:", 1)) from None
    setup_logging(core.log_level, [*account.secrets(), *core.secret_keys], core.log_format)
    if account.oauth2 is None:
        raise ConfigError(f"ACCOUNT: the account {account.name!r} has no [accounts.oauth2]")
    provider = provider_of(account.oauth2)
    method: Method = args.method or provider.default_method
    if args.listen is not None and method == "device":
        raise ConfigError("--listen: only with --code (the device flow needs no redirect)")
    if args.listen is not None and not 0 <= args.listen <= 65535:
        raise ConfigError("--listen: a port from 0 to 65535")
    if method == "device" and provider.device_authorization_url is None:
        raise ConfigError(f"--device: {provider.name} offers no device flow for mail; use --code")
    if method == "code" and provider.authorization_url is None:
        raise ConfigError("--code: the account has no authorization_url; use --device")
    asyncio.run(_sign_in(core, account, method, args.listen))
    print(f"signed in: {account.name} (the tokens are stored encrypted in the database)")
    return EXIT_OK


async def _sign_in(
    core: CoreSettings, account: AccountSettings, method: Method, listen: int | None
) -> None:
    """Run one sign-in, talking to the user on stdout (and stdin for a pasted address)."""
    from bridge.oauth import RedirectListener, SignInFailed

    async with _oauth_tokens([account], core) as tokens:
        source = tokens.source(account.name)
        if source is None:
            raise ConfigError(f"ACCOUNT: {account.name!r} does not sign in with OAuth2")
        if method == "device":
            code = await source.start_device()
            print(f"To sign in {account.name}, open {code.verification_uri}", flush=True)
            print(f"and enter the code: {code.user_code}", flush=True)
            print(
                f"Waiting for the sign-in (up to {int(code.expires_in // 60)} min)...", flush=True
            )
            await source.finish_device(code)
        elif listen is not None:
            async with RedirectListener(listen) as listener:
                flow = source.start_code(listener.port)
                print(f"To sign in {account.name}, open this address in a browser:", flush=True)
                print(flow.url, flush=True)
                await source.finish_code(flow, await listener.wait(flow))
        else:
            flow = source.start_code()
            print(f"To sign in {account.name}, open this address in a browser:", flush=True)
            print(flow.url, flush=True)
            print(
                "After the sign-in the browser shows a page that does not load: copy its whole "
                "address (http://...) from the address bar, paste it here and press Enter:",
                flush=True,
            )
            pasted = await asyncio.to_thread(sys.stdin.readline)
            if not pasted.strip():
                raise SignInFailed("no address was pasted")
            await source.finish_code(flow, pasted)


_COMMANDS = {
    "run": _run,
    "check": _check,
    "migrate": _migrate,
    "send": _send,
    "export": _export,
    "login": _login,
}
