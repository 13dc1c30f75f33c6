"""A private Dovecot IMAPS server on loopback for the integration tests (amt's pattern)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from imapclient import IMAPClient

from tests.servers.certs import CA

NOT_FOUND_MESSAGE = (
    "dovecot not found: scripts/test.sh installs it (apt-get install dovecot-imapd)"
)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
# RFC 6154 SPECIAL-USE folders, the same in 2.3 and 2.4 syntax. `auto = no` (the default): a
# folder is only marked once it exists, so a test decides which ones a user has
# (create_folders) and the other tests' mailboxes stay as they were.
_SPECIAL_USE = """\
  mailbox Archive {
    special_use = \\Archive
  }
  mailbox Trash {
    special_use = \\Trash
  }
  mailbox Junk {
    special_use = \\Junk
  }
"""
PROBE_USER = "capability-probe"

# Dovecot 2.3 syntax: https://doc.dovecot.org/2.3/ (the Debian 12 package).
_CONFIG_23 = """\
# Written by tests/servers/dovecot.py for one test run (Dovecot 2.3 syntax).
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
protocols = imap
listen = {host}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = 1
first_valid_gid = 1
login_trusted_networks = 127.0.0.0/8
auth_failure_delay = 0
auth_mechanisms = {auth_mechanisms}
auth_verbose = yes
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = 100
mailbox_idle_check_interval = 1 secs
namespace inbox {{
  inbox = yes
{special_use}}}
{capability}passdb {{
  driver = passwd-file
  args = {users}/%u
{passwd_mechanisms}}}
{oauth2}userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
"""

# Dovecot 2.4 syntax (doc.dovecot.org "Upgrading Dovecot CE from 2.3 to 2.4"): the version
# settings come first; ssl_cert/ssl_key became ssl_server_{cert,key}_file (paths, no "<");
# mail_location split into mail_driver/mail_path; passdb/userdb blocks are named and take
# driver-specific settings (passwd_file_path, fields {}); %u became %{user}.
_CONFIG_24 = """\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
# Written by tests/servers/dovecot.py for one test run (Dovecot 2.4 syntax).
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
protocols = imap
listen = {host}
ssl = required
ssl_server_cert_file = {cert}
ssl_server_key_file = {key}
ssl_min_protocol = TLSv1.2
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
first_valid_uid = 1
first_valid_gid = 1
login_trusted_networks = 127.0.0.0/8
auth_failure_delay = 0
auth_mechanisms = {auth_mechanisms}
auth_verbose = yes
mail_driver = maildir
mail_path = ~/Maildir
mail_fsync = never
mail_max_userip_connections = 100
mailbox_idle_check_interval = 1 secs
namespace inbox {{
  inbox = yes
{special_use}}}
{capability}passdb passwd-file {{
  passwd_file_path = {users}/%{{user}}
}}
{oauth2}userdb static {{
  fields {{
    uid = {uid}
    gid = {gid}
    home = {home}/%{{user}}
  }}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
"""


# OAuth2 bearer logins (SASL XOAUTH2 / OAUTHBEARER) checked by POSTing the token to an
# introspection URL (RFC 7662; Dovecot "Open Authentication v2.0 database"). In 2.3 the
# oauth2 passdb takes those mechanisms and passwd-file keeps PLAIN and LOGIN.
_OAUTH2_PASSDB_23 = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_conf}
}}
"""
_OAUTH2_CONF_23 = """\
introspection_mode = post
introspection_url = {url}
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
"""
# 2.4: token mechanisms no longer go through a passdb; an `oauth2` block configures them
# (doc.dovecot.org 2.4 "oauth2"). Written as documented; the test machines run 2.3.
_OAUTH2_24 = """\
oauth2 {{
  introspection_mode = post
  introspection_url = {url}
  force_introspection = yes
  username_attribute = username
  active_attribute = active
  active_value = true
}}
"""


class DovecotError(RuntimeError):
    """Dovecot is missing, failed to start, or did something the tests did not expect."""


@dataclass(frozen=True)
class MailUser:
    """A mailbox account on the test Dovecot."""

    name: str
    password: str


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def dovecot_version() -> tuple[int, ...]:
    """Return the installed Dovecot's version, e.g. (2, 3, 19); DovecotError if not installed."""
    binary = shutil.which("dovecot")
    if binary is None:
        raise DovecotError(NOT_FOUND_MESSAGE)
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = _VERSION_RE.match(out.strip())
    if match is None:
        raise DovecotError(f"cannot parse `dovecot --version` output: {out!r}")
    return tuple(int(part) for part in match.groups(default="0"))


class DovecotServer:
    """Dovecot serving IMAPS only, with its own config, users and maildirs in a temp dir."""

    def __init__(
        self,
        ca: CA,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        without_capabilities: Iterable[str] = (),
        oauth2_introspection_url: str | None = None,
    ) -> None:
        """Prepare (but do not start) a server using `ca`'s localhost certificate.

        `without_capabilities` (e.g. ("MOVE",)) are left out of the CAPABILITY list announced
        after login (Dovecot's imap_capability), for testing clients against older servers.
        `oauth2_introspection_url` also accepts bearer tokens (XOAUTH2, OAUTHBEARER), valid
        when that URL answers {"active": true, "username": USER}; passwords work as before.
        """
        self.oauth2_introspection_url = oauth2_introspection_url
        self.ca = ca
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.version = dovecot_version()
        self.config_format = "2.4" if self.version[:2] >= (2, 4) else "2.3"
        self.without_capabilities = tuple(c.upper() for c in without_capabilities)
        # 2.3 can only replace the whole list: start() learns the default one first.
        self._capability_list: tuple[str, ...] | None = None
        # Not pytest's tmp_path: that is 0700, and Dovecot's unprivileged processes must enter.
        self.directory = Path(tempfile.mkdtemp(prefix="mailbridge-dovecot."))
        self.directory.chmod(0o755)
        self.config_file = self.directory / "dovecot.conf"
        self.log_file = self.directory / "dovecot.log"
        self.stderr_file = self.directory / "dovecot.stderr"
        # One passwd-file per user: Dovecot rereads a passwd-file at most once a second
        # (db-passwd-file.c: last_sync_time), so users appended to a shared file within a
        # second of a login would stay unknown; a new user's file is read on first lookup.
        self.users_dir = self.directory / "users"
        self.home_root = self.directory / "home"
        self._base_dir = self.directory / "run"
        self._process: subprocess.Popen[bytes] | None = None
        self._fill_batch = 0
        self._setup_identity()
        self._write_files()

    def _setup_identity(self) -> None:
        """Choose the system users Dovecot's processes and the mail files run as."""
        if os.geteuid() == 0:
            # Dovecot refuses mail access as uid 0 ("userdb returned 0 as uid"), so as root the
            # maildirs belong to nobody; login/internal users are the Debian package's own.
            nobody = pwd.getpwnam("nobody")
            self.mail_uid, self.mail_gid = nobody.pw_uid, nobody.pw_gid
            self._login_user, self._internal_user = "dovenull", "dovecot"
            self._internal_group = "dovecot"
        else:
            # Without root Dovecot cannot switch users: every process runs as us.
            me = pwd.getpwuid(os.getuid())
            self.mail_uid, self.mail_gid = me.pw_uid, me.pw_gid
            self._login_user = self._internal_user = me.pw_name
            self._internal_group = grp.getgrgid(me.pw_gid).gr_name

    def _write_files(self) -> None:
        """Write the config, the certificate copies and the users and homes directories."""
        ssl_dir = self.directory / "ssl"
        ssl_dir.mkdir(mode=0o755)
        cert = ssl_dir / "cert.pem"
        key = ssl_dir / "key.pem"
        shutil.copyfile(self.ca.cert_file, cert)
        shutil.copyfile(self.ca.key_file, key)
        # A throwaway key; readable so that whichever Dovecot process loads it (2.3: config
        # as root, 2.4 may differ) can read it.
        key.chmod(0o644)
        (self.directory / "state").mkdir(mode=0o755)
        self.users_dir.mkdir(mode=0o755)
        self.home_root.mkdir(mode=0o755)
        self._chown(self.home_root)
        self._write_config()

    def _capability_setting(self) -> str:
        """The imap_capability line(s) that leave out without_capabilities ("" for none)."""
        if not self.without_capabilities:
            return ""
        if self.config_format == "2.4":
            # 2.4: imap_capability is a boollist; "NAME = no" removes one from the default.
            lines = "".join(f"  {name} = no\n" for name in self.without_capabilities)
            return f"imap_capability {{\n{lines}}}\n"
        if self._capability_list is None:
            return ""  # the first start learns the default list (see start())
        kept = [c for c in self._capability_list if c.upper() not in self.without_capabilities]
        return f"imap_capability = {' '.join(kept)}\n"

    def _write_config(self) -> None:
        """Write dovecot.conf from the template for the installed version."""
        ssl_dir = self.directory / "ssl"
        cert = ssl_dir / "cert.pem"
        key = ssl_dir / "key.pem"
        template = _CONFIG_24 if self.config_format == "2.4" else _CONFIG_23
        mechanisms, passwd_mechanisms, oauth2 = "plain login", "", ""
        url = self.oauth2_introspection_url
        if url is not None:
            mechanisms = "plain login xoauth2 oauthbearer"
            if self.config_format == "2.4":
                oauth2 = _OAUTH2_24.format(url=url)
            else:
                conf = self.directory / "dovecot-oauth2.conf.ext"
                conf.write_text(_OAUTH2_CONF_23.format(url=url))
                conf.chmod(0o644)
                passwd_mechanisms = "  mechanisms = plain login\n"
                oauth2 = _OAUTH2_PASSDB_23.format(oauth2_conf=conf)
        self.config_file.write_text(
            template.format(
                instance=f"mailbridge-test-{self.port}",
                base_dir=self._base_dir,
                state_dir=self.directory / "state",
                log=self.log_file,
                host=self.host,
                cert=cert,
                key=key,
                login_user=self._login_user,
                internal_user=self._internal_user,
                internal_group=self._internal_group,
                users=self.users_dir,
                uid=self.mail_uid,
                gid=self.mail_gid,
                home=self.home_root,
                port=self.port,
                special_use=_SPECIAL_USE,
                capability=self._capability_setting(),
                auth_mechanisms=mechanisms,
                passwd_mechanisms=passwd_mechanisms,
                oauth2=oauth2,
            )
        )

    def _chown(self, path: Path) -> None:
        """Give `path` to the mail user (only possible, and only needed, as root)."""
        if os.geteuid() == 0:
            os.chown(path, self.mail_uid, self.mail_gid)

    # Lifecycle

    @property
    def running(self) -> bool:
        """Whether the Dovecot master process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start Dovecot and return once the IMAPS port answers with a TLS greeting."""
        if self.running:
            return
        binary = shutil.which("dovecot")
        if binary is None:
            raise DovecotError(NOT_FOUND_MESSAGE)
        with self.stderr_file.open("ab") as stderr:
            self._process = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        self._wait_for_master(deadline)
        self._disable_auth_penalty()
        self._wait_for_greeting(deadline)
        if self.without_capabilities and self.config_format == "2.3":
            self._limit_capabilities_23(timeout)

    def _limit_capabilities_23(self, timeout: float) -> None:
        """Learn 2.3's default post-login CAPABILITY list once, then restart without some."""
        if self._capability_list is not None:
            return
        if not (self.users_dir / PROBE_USER).exists():
            self.add_user(PROBE_USER, "probe-password")
        client = self.connect(PROBE_USER, "probe-password")
        try:
            self._capability_list = tuple(c.decode() for c in client.capabilities())
        finally:
            client.logout()
        self.stop()
        self._write_config()
        self.start(timeout)

    def _check_alive(self) -> None:
        """Raise DovecotError with the log if the master process has exited."""
        if self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            self._process = None
            raise DovecotError(f"dovecot exited with status {code}:\n{self.log_text()}")

    def _wait_for_master(self, deadline: float) -> None:
        """Poll (bounded) until the master has created its listeners and pid file."""
        pid_file = self._base_dir / "master.pid"
        while not pid_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise DovecotError(f"dovecot did not start in time:\n{self.log_text()}")
            time.sleep(0.02)

    def _disable_auth_penalty(self) -> None:
        """Remove anvil's auth-penalty socket so failed logins don't slow later ones.

        Dovecot delays logins from an IP after failed ones (2 s, then up to 15 s; the
        `auth-penalty` docs). 2.3.19 applies it even to login_trusted_networks, and the
        documented `mode = 0` switch stalls the auth process 5 s on its first connect. With
        the socket gone before auth starts, auth skips penalties silently (ENOENT is hidden).
        """
        (self._base_dir / "anvil-auth-penalty").unlink(missing_ok=True)

    def _wait_for_greeting(self, deadline: float) -> None:
        """Poll (bounded) until an IMAPS connection gets Dovecot's `* OK` greeting."""
        context = self.ca.client_ssl_context()
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with (
                    socket.create_connection((self.host, self.port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    if tls.recv(64).startswith(b"* OK"):
                        return
            except OSError as error:
                last_error = error
            time.sleep(0.05)
        self.stop()
        raise DovecotError(
            f"dovecot did not answer on {self.host}:{self.port} ({last_error!r}):\n"
            f"{self.log_text()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Dovecot (SIGTERM, then SIGKILL after `timeout`); users and mail are kept."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port with the same users and mail."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and remove its files."""
        self.cleanup()

    # Users and mail

    def add_user(self, name: str, password: str) -> None:
        """Add a user (its own passwd-file, read at its first login); works while running."""
        if not _NAME_RE.match(name):
            raise ValueError(f"user name must match {_NAME_RE.pattern}: {name!r}")
        if any(c in password for c in ":\n\r") or not password:
            raise ValueError("password must be non-empty without ':' or line breaks")
        path = self.users_dir / name
        if path.exists():
            raise ValueError(f"user {name!r} exists")
        # Written whole, then renamed: the auth process never sees a partial line.
        partial = self.users_dir / f".{name}.tmp"
        partial.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        partial.chmod(0o644)
        partial.rename(path)

    def create_folders(self, user: str, password: str, *names: str) -> None:
        """Create folders for `user` (Archive, Trash and Junk get their SPECIAL-USE flag)."""
        client = self.connect(user, password)
        try:
            for name in names:
                client.create_folder(name)
        finally:
            client.logout()

    def folders(self, user: str, password: str) -> dict[str, set[bytes]]:
        """Every folder of `user` with its LIST attributes (RFC 6154 SPECIAL-USE included)."""
        client = self.connect(user, password)
        try:
            return {str(name): set(flags) for flags, _, name in client.list_folders()}
        finally:
            client.logout()

    def capabilities(self, user: str, password: str) -> set[str]:
        """The CAPABILITY list a logged-in client sees."""
        client = self.connect(user, password)
        try:
            return {c.decode().upper() for c in client.capabilities()}
        finally:
            client.logout()

    def user_home(self, name: str) -> Path:
        """Return the user's home directory (the userdb `home`)."""
        return self.home_root / name

    def user_maildir(self, name: str) -> Path:
        """Return the user's Maildir (INBOX is its cur/new/tmp; folders are `.Name`)."""
        return self.user_home(name) / "Maildir"

    def connect(self, user: str, password: str, *, timeout: float = 10.0) -> IMAPClient:
        """Return an IMAPClient logged in over verified TLS (caller logs out)."""
        client = IMAPClient(
            self.host,
            self.port,
            ssl=True,
            ssl_context=self.ca.client_ssl_context(),
            timeout=timeout,
        )
        try:
            client.login(user, password)
        except Exception:
            client.shutdown()
            raise
        return client

    def append(
        self,
        user: str,
        password: str,
        raw: bytes,
        mailbox: str = "INBOX",
        flags: Iterable[bytes | str] = (),
        msg_time: datetime | None = None,
    ) -> int:
        """Deliver `raw` with IMAP APPEND (waking other sessions' IDLE) and return its UID.

        `msg_time` sets the INTERNALDATE (arrival time), as a mail imported later has.
        """
        client = self.connect(user, password)
        try:
            if mailbox.upper() != "INBOX" and not client.folder_exists(mailbox):
                client.create_folder(mailbox)
            response = client.append(mailbox, raw, flags=tuple(flags), msg_time=msg_time)
        finally:
            client.logout()
        match = _APPENDUID_RE.search(response)
        if match is None:
            raise DovecotError(f"APPEND answered without APPENDUID: {response!r}")
        return int(match.group(2))

    def fill(self, user: str, n: int, template: bytes, mailbox: str = "INBOX") -> None:
        """Create `n` unseen messages by writing maildir files directly (fast, for benchmarks).

        Each `{i}` in `template` becomes the message's number (1..n). Dovecot sorts new
        maildir files by the time and `M<usecs>` parts of their names before giving them
        UIDs, so message i gets a higher UID than message i-1.
        """
        if not 0 <= n <= 999_999:
            raise ValueError("n must be within 0..999999 (it is encoded as microseconds)")
        maildir = self.user_maildir(user)
        folder = maildir if mailbox.upper() == "INBOX" else maildir / f".{mailbox}"
        self._make_maildir(folder, is_subfolder=folder != maildir)
        self._fill_batch += 1
        seconds = int(time.time())
        pid = os.getpid()
        cur = folder / "cur"
        is_root = os.geteuid() == 0
        for i in range(1, n + 1):
            data = template.replace(b"{i}", str(i).encode())
            # maildir name: <secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>:2,<flags>; no flags
            # in cur/ means unseen without being "new" (no rename on first sync).
            name = f"{seconds}.M{i}P{pid}Q{self._fill_batch}.mailbridge,S={len(data)}:2,"
            path = cur / name
            path.write_bytes(data)
            if is_root:
                os.chown(path, self.mail_uid, self.mail_gid)

    def _make_maildir(self, folder: Path, *, is_subfolder: bool) -> None:
        """Create the home, Maildir and `folder` with cur/new/tmp, owned by the mail user."""
        maildir = folder.parent if is_subfolder else folder
        home = maildir.parent
        for directory in (home, maildir, folder, folder / "cur", folder / "new", folder / "tmp"):
            if not directory.exists():
                directory.mkdir(mode=0o700)
                self._chown(directory)
        if is_subfolder and not (folder / "maildirfolder").exists():
            (folder / "maildirfolder").touch(mode=0o600)
            self._chown(folder / "maildirfolder")

    def flags(self, user: str, password: str, uid: int, mailbox: str = "INBOX") -> set[bytes]:
        """Return a message's flags, read after EXAMINE so that nothing is changed."""
        client = self.connect(user, password)
        try:
            client.select_folder(mailbox, readonly=True)
            data = client.fetch([uid], ["FLAGS"])
        finally:
            client.logout()
        if uid not in data:
            raise DovecotError(f"no message with UID {uid} in {user}'s {mailbox}")
        return set(data[uid][b"FLAGS"])

    def uids(self, user: str, password: str, mailbox: str = "INBOX") -> list[int]:
        """UIDs of the messages in a folder not marked \\Deleted, ascending (read-only)."""
        client = self.connect(user, password)
        try:
            client.select_folder(mailbox, readonly=True)
            return sorted(client.search(["NOT", "DELETED"]))
        finally:
            client.logout()

    def expunge(self, user: str, password: str, uid: int, mailbox: str = "INBOX") -> None:
        """Delete one message for good, as another mail client would."""
        client = self.connect(user, password)
        try:
            client.select_folder(mailbox)
            client.add_flags([uid], [b"\\Deleted"])
            client.uid_expunge([uid])
        finally:
            client.logout()

    def log_text(self) -> str:
        """Return Dovecot's log file plus anything it wrote to stdout/stderr."""
        parts = [
            path.read_text(errors="replace")
            for path in (self.stderr_file, self.log_file)
            if path.exists()
        ]
        return "".join(parts)
