"""Local delivery into Maildirs, and the list of local recipients the session checks at RCPT.

Each recipient of a local domain has its own Maildir at ``ROOT/<domain>/<local-part>/``. Both
names come from the network, so they are mapped to file names that cannot leave
``ROOT/<domain>/`` whatever the address says (see :func:`mailbox_path`).

A message is committed the Maildir way: written to ``tmp/``, fsynced, renamed into ``new/``
and ``new/`` fsynced. A reader (an IMAP server) never sees half a message and a crash never
loses one that was reported delivered.

Like ``outbound``, this module never writes the spool: it returns one :class:`Outcome` per
recipient and the scheduler records it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, NoReturn, ParamSpec, TypeVar

from twisted.internet.interfaces import IReactorTime

from smarthost.core.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Address,
    Envelope,
    Outcome,
    Recipient,
)
from smarthost.core.safeio import fsync_dir
from smarthost.core.types import RunBlocking

_P = ParamSpec("_P")
_T = TypeVar("_T")

REMOTE = "maildir"  # Outcome.remote for local delivery: logs show it, bounces omit Remote-MTA


class MailboxError(ValueError):
    """The address cannot name a mailbox at all (no domain, empty local part): retrying
    cannot help, so the recipient bounces."""


# Characters kept as they are in a mailbox directory name; everything else is %XX-escaped
# (per UTF-8 byte). "%" itself is escaped, so the mapping is one-to-one: two different
# addresses never share a Maildir. Non-ASCII letters and digits (RFC 6531 local parts) are kept.
_SAFE_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.+=")
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_CHUNK = 64 * 1024


def normalize_local_part(local: str) -> str:
    """The local part as mailbox lookups compare it.

    Local parts of our own domains are case-insensitive (as with Postfix's default), so
    ``Bob`` and ``bob`` share a mailbox. A quoted local part whose content is the same as an
    unquoted one is the same mailbox (RFC 5321 4.1.2), so the quotes are removed. NFC makes
    the two Unicode spellings of the same UTF-8 local part (RFC 6531) one mailbox.
    """
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if inner:
            local = inner
    return unicodedata.normalize("NFC", local).lower()


def recipient_key(address: str) -> str:
    """``local@domain`` normalized as mailbox lookups compare it (see normalize_local_part)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return normalize_local_part(address)
    return f"{normalize_local_part(local)}@{_normalize_domain(domain)}"


def _normalize_domain(domain: str) -> str:
    return unicodedata.normalize("NFC", domain).lower().rstrip(".")


def safe_name(text: str) -> str:
    """``text`` as one path component that is always inside its parent directory.

    "/", NUL, control characters, quotes, backslashes and "%" are escaped as %XX, and so is
    a leading "." (no ".", "..", or hidden names), so no address can climb out of
    ``ROOT/<domain>/`` or hide a mailbox.
    """
    out = []
    for i, ch in enumerate(text):
        if (ch in _SAFE_ASCII and not (i == 0 and ch == ".")) or (
            not ch.isascii() and ch.isalnum()
        ):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(out)
    # Belt and braces: the escaping above already makes these impossible.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise MailboxError(f"unsafe mailbox name: {text!r}")
    return name


def mailbox_path(root: Path, address: str) -> Path:
    """``root/<domain>/<local-part>``, both parts normalized and escaped."""
    local, at, domain = address.rpartition("@")
    domain = _normalize_domain(domain)
    if not at or not domain:
        raise MailboxError("address has no domain")
    local = normalize_local_part(local)
    if not local:
        raise MailboxError("address has an empty local part")
    return root / safe_name(domain) / safe_name(local)


class MaildirDelivery:
    """Delivers a queued message into the Maildir of each local recipient.

    ``deliver`` never raises: a failure is a DEFERRED outcome carrying the OS error (disk
    full, permissions), so the message stays queued and an operator can fix the cause.
    """

    def __init__(
        self, root: Path, run_blocking: RunBlocking, clock: IReactorTime, hostname: str
    ) -> None:
        self._root = root
        self._run_blocking = run_blocking
        self._clock = clock
        # Maildir names may not hold "/" or ":" (":" starts the info suffix): escape the
        # hostname as the Maildir convention does (\057, \072).
        self._host = _HOST_UNSAFE.sub(lambda m: f"\\{ord(m.group()):03o}", hostname) or "localhost"

    def mailbox(self, address: str) -> Path:
        return mailbox_path(self._root, address)

    async def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        open_body: Callable[[], BinaryIO],
    ) -> list[Outcome]:
        """One Outcome per recipient, in order; each gets its own copy of the message.

        ``open_body`` is called (in the blocking thread) once per recipient and must return a
        fresh reader of the message bytes as the spool holds them (CRLF line endings).
        """
        outcomes = []
        for rcpt in recipients:
            try:
                outcome = await self._run_blocking(
                    self._deliver_one, envelope, rcpt, open_body, self._clock.seconds()
                )
            except Exception as e:
                # A crash in delivery is a temporary failure: the message stays queued.
                outcome = Outcome(
                    rcpt, DEFERRED, f"maildir delivery failed: {e!r}", REMOTE, "4.3.0"
                )
            outcomes.append(outcome)
        return outcomes

    def _deliver_one(
        self,
        envelope: Envelope,
        rcpt: Recipient,
        open_body: Callable[[], BinaryIO],
        now: float,
    ) -> Outcome:
        try:
            mailbox = self.mailbox(rcpt.address)
        except MailboxError as e:
            # RFC 3463 5.1.3: bad destination mailbox address syntax.
            return Outcome(rcpt, BOUNCED, f"cannot deliver to maildir: {e}", REMOTE, "5.1.3")
        where = mailbox.relative_to(self._root).as_posix()
        header = (
            f"Return-Path: <{_header_text(envelope.sender)}>\n"
            f"Delivered-To: {_header_text(rcpt.address)}\n"
        ).encode()
        try:
            name = self._write(mailbox, header, open_body, now)
        except OSError as e:
            reason = e.strerror or repr(e)
            return Outcome(
                rcpt,
                DEFERRED,
                f"maildir delivery to {where}/ failed: {reason}",
                REMOTE,
                _os_error_status(e),
            )
        return Outcome(rcpt, DELIVERED, f"delivered to maildir {where}/new/{name}", REMOTE, "2.0.0")

    def _write(
        self, mailbox: Path, header: bytes, open_body: Callable[[], BinaryIO], now: float
    ) -> str:
        """Commit one copy; returns its file name in ``new/``."""
        _ensure_dirs(self._root, [mailbox.parent, mailbox])
        _ensure_dirs(mailbox, [mailbox / "tmp", mailbox / "new", mailbox / "cur"])
        name = self._unique_name(now)
        tmp, new = mailbox / "tmp" / name, mailbox / "new" / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=_CHUNK) as out:
                out.write(header)
                with open_body() as body:
                    out.writelines(_lf_lines(body))
                out.flush()
                os.fsync(out.fileno())
            # The unique name (time, pid, 64 random bits) makes the rename a plain move,
            # never a replacement of another message.
            os.rename(tmp, new)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The commit point: until new/ is on disk, a crash could lose the rename.
        fsync_dir(mailbox / "new")
        return name

    def _unique_name(self, now: float) -> str:
        """``sec.MusecPpidRrandom.host``: the Maildir name form Dovecot and Courier use."""
        seconds, usec = divmod(int(now * 1_000_000), 1_000_000)
        return f"{seconds}.M{usec}P{os.getpid()}R{secrets.token_hex(8)}.{self._host}"


def _lf_lines(body: BinaryIO) -> Iterable[bytes]:
    """The spool's CRLF lines with LF endings: Maildir files use the local newline
    convention (as qmail, Postfix local and Dovecot write them)."""
    for line in body:
        if line.endswith(b"\r\n"):
            yield line[:-2] + b"\n"
        else:
            yield line


def _header_text(text: str) -> str:
    """No control character from an address can end the header and start another."""
    return "".join(ch for ch in text if ch.isprintable())


def _ensure_dirs(base: Path, dirs: Sequence[Path]) -> None:
    """Create missing directories (mode 0700: mail is private) and fsync the parent of each
    one created, so a crash cannot forget the directory holding a delivered message."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        _not_a_directory(base)
    for path in dirs:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not path.is_dir():
                _not_a_directory(path)
            continue
        fsync_dir(path.parent)


def _not_a_directory(path: Path) -> NoReturn:
    # "File exists" would send the operator looking for the wrong problem.
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))



def _os_error_status(error: OSError) -> str:
    """RFC 3463 codes for the errors an operator must act on: 4.3.1 mail system full,
    4.2.2 mailbox full (quota); anything else is 4.3.0."""
    if error.errno == errno.ENOSPC:
        return "4.3.1"
    if error.errno == getattr(errno, "EDQUOT", None):
        return "4.2.2"
    return "4.3.0"


class LocalRecipients:
    """The ``[relay] local_recipients`` file: which addresses of the local domains exist.

    One entry a line; lines starting with ``#`` are comments. An entry is ``local@domain``,
    ``@domain`` (every local part of that domain) or a bare ``local`` (that local part in
    every local domain). Only the first word of a line counts, so Postfix-style
    ``address  value`` lookup tables work as they are. Matching is case-insensitive and uses
    the same normalization as the Maildir names, so "accepted" and "delivered to" agree.

    The file is checked for changes at every lookup (one ``stat``) and reread when it changed,
    so editing it needs no restart. If it vanishes or cannot be read later, the last good
    list stays in force: a half-written edit must not turn every recipient away (or let
    every one in). A file missing at start-up raises, as a configuration error should.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._addresses: frozenset[str] = frozenset()
        self._domains: frozenset[str] = frozenset()
        self._locals: frozenset[str] = frozenset()
        self._load(self._stat())

    def __contains__(self, address: object) -> bool:
        if isinstance(address, Address):
            address = str(address)
        if not isinstance(address, str):
            return False
        self._refresh()
        key = recipient_key(address)
        local, at, domain = key.rpartition("@")
        if not at:
            return key in self._locals
        return key in self._addresses or domain in self._domains or local in self._locals

    def _stat(self) -> tuple[int, int, int, int]:
        st = os.stat(self._path)
        # Inode and device too: an editor that saves by renaming a new file into place can
        # leave mtime and size equal within the timestamp resolution.
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def _refresh(self) -> None:
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._load(stamp)
        except (OSError, UnicodeDecodeError):
            pass  # keep the last good list (see the class docstring)

    def _load(self, stamp: tuple[int, int, int, int]) -> None:
        text = self._path.read_text(encoding="utf-8")
        addresses, domains, locals_ = set(), set(), set()
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            entry = line.split()[0]
            if entry.startswith("@"):
                domains.add(_normalize_domain(entry[1:]))
            elif "@" in entry:
                addresses.add(recipient_key(entry))
            else:
                locals_.add(normalize_local_part(entry))
        self._addresses = frozenset(addresses)
        self._domains = frozenset(domains)
        self._locals = frozenset(locals_)
        self._stamp = stamp
