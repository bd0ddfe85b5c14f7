"""Who may submit mail: the users file, its format, and the secrets looked up in it.

The users file is the only place passwords live, and never in the clear. It is shared with
the admin tool (``smarthost passwd``) through the file system alone: the tool rewrites it
atomically, the daemon notices the new file on the next login attempt. No restart, no IPC.

File format, one user per line::

    # comments and blank lines are ignored
    alice:$2b$12$....................................................
    bob@example.test:$2b$12$...:scram-sha-256=4096,<salt>,<stored>,<server>:scram-sha-1=...:cram-md5=<hex>

The first field is the user name, the second a bcrypt hash (``$2b$``, ``$2a$`` or ``$2y$``,
so ``htpasswd -B`` files work unchanged); PLAIN and LOGIN check passwords against it. Further
``:``-separated fields are ``key=value`` secrets that ``smarthost passwd`` derives from the
same password for the challenge-response mechanisms, which never see the password itself:

``scram-sha-256=<iterations>,<salt>,<StoredKey>,<ServerKey>`` and ``scram-sha-1=...``
    RFC 5802 section 3 / RFC 7677: the PBKDF2 iteration count (decimal, 4096 by default),
    then the salt, ``StoredKey = H(HMAC(SaltedPassword, "Client Key"))`` and
    ``ServerKey = HMAC(SaltedPassword, "Server Key")``, each standard base64. This is the
    layout of Dovecot's ``{SCRAM-SHA-256}`` scheme.
``cram-md5=<64 hex digits>``
    Dovecot's ``{CRAM-MD5}`` scheme: the MD5 states (four little-endian 32-bit words each)
    after HMAC-MD5 has processed ``key XOR opad`` and then ``key XOR ipad``, outer first.
    Finishing an HMAC from these states needs an MD5 that can resume from a state, which
    hashlib cannot do: :func:`smarthost.auth.md5state.md5_resume` is a small RFC 1321 one.

Unknown keys are kept and ignored, so a newer file still works with an older daemon; a
malformed known field is reported and ignored (the user keeps PLAIN and LOGIN). A name
without a mechanism's secret runs that mechanism's exchange with a decoy
(:mod:`smarthost.auth.decoys`): secrets derived from the name and a server key, so the
exchange looks the same as for a real user. An unknown name then fails like a wrong
password. A user who exists but has no secret for the mechanism (an ``htpasswd -B`` line, a
file from before they existed) fails too, but is marked (:attr:`Secret.user_without_secret`):
nothing was guessed, so the session neither counts nor delays it and the client falls back
to another mechanism at once. The price is that such a name answers sooner than an unknown
one; names with secrets, the rest, stay indistinguishable from unknown ones, and probing for
the former costs a throttled failure per unknown name tried. Bcrypt hashes, base64, hex and
(validated) names never contain ``:``, which keeps the split unambiguous.

Passwords and names are prepared with SASLprep (RFC 4013, :mod:`smarthost.auth.derived`):
``smarthost passwd`` stores the prepared name and the bcrypt hash and SCRAM secrets of the
prepared password; a lookup tries the name as given, then prepared; a PLAIN or LOGIN
password is checked prepared, then as given when that differs (a hash made before passwords
were prepared). So the same password in another Unicode normal form works with PLAIN and
LOGIN as with SCRAM, and every earlier user keeps working.

Everything that runs bcrypt is blocking; the cred checker (:mod:`smarthost.auth.cred`) runs
it through an injected ``run_blocking`` (``deferToThread`` in production) so the reactor
never waits on it. The challenge-response lookups (:meth:`UsersFile.scram`,
:meth:`UsersFile.cram_md5`) only stat the file and re-read it when it changed; the SASL
exchanges call them synchronously.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import stat
import threading
import unicodedata
from collections.abc import Mapping
from typing import Generic, TypeVar

import attrs
import bcrypt

from smarthost.auth.decoys import Decoys
from smarthost.auth.derived import (
    CRAM_MD5_FIELD,
    SCRAM_HASHES,
    SCRAM_ITERATIONS,
    CramMD5Secret,
    ScramSecret,
    derive_secrets,
    prepare_name,
    prepare_password,
    saslprep,
)
from smarthost.core.safeio import atomic_write

_T = TypeVar("_T")

DEFAULT_ROUNDS = 12
MAX_NAME_OCTETS = 255
# bcrypt only ever looks at the first 72 octets of a password (bcrypt >= 5 raises instead of
# truncating). Refusing longer ones when setting a password keeps the tail from being silently
# meaningless; truncating when checking keeps old htpasswd files, which truncated, working.
MAX_PASSWORD_OCTETS = 72


# The modular-crypt form of bcrypt: version, two-digit cost, 22 salt + 31 hash characters.
_BCRYPT = re.compile(rb"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}\Z")


class UserNameError(ValueError):
    """The name cannot be stored in the users file; the message says why."""


class PasswordError(ValueError):
    """The password cannot be stored as a bcrypt hash; the message says why."""


@attrs.frozen
class UserEntry:
    """One user as read from the file. Hashes and derived secrets stay out of ``repr``."""

    name: str
    password_hash: bytes = attrs.field(repr=False)
    # Every extra field as written (``key=value``), unknown ones included.
    extras: tuple[str, ...] = attrs.field(default=(), repr=False)
    # The well-formed challenge-response secrets among them.
    scram: Mapping[str, ScramSecret] = attrs.field(factory=dict, repr=False)  # by mechanism
    cram_md5: CramMD5Secret | None = attrs.field(default=None, repr=False)

    @property
    def cost(self) -> int:
        return int(self.password_hash[4:6])


@attrs.frozen
class ParsedUsers:
    users: dict[str, UserEntry]
    problems: tuple[str, ...]  # "line N: reason" for every line that was skipped


def validate_name(name: str) -> None:
    """Refuse names that would corrupt the file or fool an operator reading logs.

    ``:`` separates fields; whitespace and control/format characters would make lines
    ambiguous or invisible in logs; a leading ``#`` would turn the line into a comment.
    """
    if not name:
        raise UserNameError("user name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_OCTETS:
        raise UserNameError(f"user name is longer than {MAX_NAME_OCTETS} octets")
    if name.startswith("#"):
        raise UserNameError("user name must not start with '#'")
    for char in name:
        if char == ":":
            raise UserNameError("user name must not contain ':'")
        category = unicodedata.category(char)
        if char.isspace() or category[0] in "CZ":
            raise UserNameError(f"user name must not contain {char!a}")


def parse_users(data: bytes) -> ParsedUsers:
    """Parse a users file. Bad lines are skipped and reported, never fatal: one typo must not
    lock every user out of a running server."""
    users: dict[str, UserEntry] = {}
    problems: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"line {number}: not valid UTF-8")
            continue
        name, _, rest = text.partition(":")
        fields = rest.split(":")
        try:
            validate_name(name)
        except UserNameError as e:
            problems.append(f"line {number}: {e}")
            continue
        password_hash = _normalise_hash(fields[0].encode("ascii", "replace"))
        if password_hash is None:
            # Never fall back to treating the field as a plaintext password or another scheme.
            problems.append(f"line {number}: user {name!r} has no bcrypt hash ($2b$, $2y$)")
            continue
        if name in users:
            problems.append(f"line {number}: duplicate user {name!r} ignored")
            continue
        extras = tuple(fields[1:])
        scram, cram_md5, bad = _parse_secrets(extras)
        for key in bad:
            problems.append(f"line {number}: user {name!r} has a malformed {key} field; "
                            "ignored (run smarthost passwd again)")
        users[name] = UserEntry(name, password_hash, extras, scram, cram_md5)
    return ParsedUsers(users, tuple(problems))


def _parse_secrets(
    extras: tuple[str, ...],
) -> tuple[dict[str, ScramSecret], CramMD5Secret | None, list[str]]:
    scram: dict[str, ScramSecret] = {}
    cram_md5: CramMD5Secret | None = None
    bad: list[str] = []
    for extra in extras:
        key, _, value = extra.partition("=")
        mechanism = key.upper()
        if mechanism in SCRAM_HASHES and mechanism not in scram:
            secret = ScramSecret.parse(value, SCRAM_HASHES[mechanism])
            if secret is None:
                bad.append(key)
            else:
                scram[mechanism] = secret
        elif key == CRAM_MD5_FIELD and cram_md5 is None:
            cram_md5 = CramMD5Secret.parse(value)
            if cram_md5 is None:
                bad.append(key)
    return scram, cram_md5, bad


def _normalise_hash(field: bytes) -> bytes | None:
    """Return the hash in the form bcrypt checks, or None when it is not bcrypt.

    ``$2y$`` (PHP, htpasswd -B) is the same algorithm as ``$2b$``; bcrypt 5 accepts both, but
    rewriting the prefix costs nothing and keeps us independent of that library detail.
    """
    match = _BCRYPT.match(field)
    if match is None or not 4 <= int(match.group(1)) <= 31:
        return None
    if field.startswith(b"$2y$"):
        return b"$2b$" + field[4:]
    return field


def _dummy_hash(cost: int) -> bytes:
    # Syntactically valid, matches no password: checking against it costs exactly what
    # checking a real hash of this cost costs.
    return b"$2b$%02d$" % cost + b"." * 53


class UsersFile:
    """The users file, re-read whenever it changes on disk.

    Every method may block (stat, read, bcrypt): :meth:`verify` must go through
    ``run_blocking``; :meth:`scram` and :meth:`cram_md5` only stat (and, after a change,
    re-read) a small local file. A lock makes it safe from several pool threads at once.

    ``decoy_key`` keys the stand-in secrets for names without real ones. The daemon passes
    :func:`smarthost.auth.decoys.decoy_key` of its TLS private key, so decoy salts survive
    restarts as real ones do; the default (random per process) suits tools and tests.
    """

    def __init__(
        self, path: str | os.PathLike[str], decoy_key: bytes | None = None
    ) -> None:
        self._path = os.fspath(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._parsed = ParsedUsers({}, ())
        self._dummy = _dummy_hash(DEFAULT_ROUNDS)
        self._decoys = Decoys(os.urandom(32) if decoy_key is None else decoy_key)
        self._iterations = SCRAM_ITERATIONS

    @property
    def path(self) -> str:
        return self._path

    def reload(self) -> ParsedUsers:
        """Re-read the file if it changed since last time and return its contents.

        A missing file means no users (the default config starts that way). Any other read
        error propagates: the session answers a temporary failure rather than keep serving
        a file that may have had users deleted from it.
        """
        with self._lock:
            try:
                with open(self._path, "rb") as f:
                    st = os.fstat(f.fileno())
                    # The inode changes on every atomic rewrite; mtime, ctime and size catch
                    # edits in place.
                    signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                 st.st_ctime_ns)
                    if signature != self._signature:
                        self._set(parse_users(f.read()), signature)
            except FileNotFoundError:
                if self._signature != ():
                    self._set(ParsedUsers({}, ()), ())
            return self._parsed

    def _set(self, parsed: ParsedUsers, signature: tuple[int, ...]) -> None:
        self._parsed, self._signature = parsed, signature
        costs = collections.Counter(u.cost for u in parsed.users.values())
        # The most common cost: an unknown name then takes as long as a typical known one.
        cost = max(costs, key=lambda c: (costs[c], c)) if costs else DEFAULT_ROUNDS
        self._dummy = _dummy_hash(cost)
        # Likewise a decoy SCRAM salt comes with the most common iteration count.
        counts = collections.Counter(
            s.iterations for u in parsed.users.values() for s in u.scram.values()
        )
        self._iterations = (max(counts, key=lambda i: (counts[i], i)) if counts
                            else SCRAM_ITERATIONS)

    @property
    def problems(self) -> tuple[str, ...]:
        """Lines skipped at the last load, for start-up warnings and ``check-config``."""
        return self._parsed.problems

    def lookup(self, name: str) -> UserEntry | None:
        """The user called ``name``: as given, or else as SASLprep prepares it (RFC 4616 2,
        RFC 5802 5.1), the form ``smarthost passwd`` stores."""
        users = self.reload().users
        entry = users.get(name)
        if entry is None:
            prepared = prepare_name(name)
            if prepared != name:
                entry = users.get(prepared)
        return entry

    def verify(self, name: str, password: bytes) -> str | None:
        """The user's name as stored when ``password`` is theirs, else None; as slow for
        unknown names as for known ones.

        Names compare exactly (after SASLprep), case included: a name is also a key of
        ``[relay.senders]`` and may be an address whose local part is case-sensitive
        (RFC 5321 2.4), so folding case here would let two spellings share one password but
        not one sender policy.
        """
        entry = self.lookup(name)
        # The prepared password first; the one as typed when it differs, for hashes made
        # before passwords were prepared (and for htpasswd's). Both are always tried when
        # the first fails, for unknown names too, so the time taken tells nothing.
        prepared = prepare_password(password, query=True)
        candidates = [prepared] if prepared == password else [prepared, password]
        hashed = self._dummy if entry is None else entry.password_hash
        matched = False
        for candidate in candidates:
            if bcrypt.checkpw(candidate[:MAX_PASSWORD_OCTETS], hashed):
                matched = True
                break
        return entry.name if matched and entry is not None else None

    def scram(self, name: str, mechanism: str) -> Secret[ScramSecret]:
        """The user's secret for ``mechanism`` (``"SCRAM-SHA-256"``), or a decoy."""
        entry = self.lookup(name)
        secret = entry.scram.get(mechanism) if entry is not None else None
        if secret is None:
            # Keyed by the prepared name: two spellings of one unknown name get one salt,
            # as two spellings of a real one do.
            decoy = self._decoys.scram(prepare_name(name), mechanism, self._iterations)
            return Secret(decoy, known=False, user_without_secret=entry is not None)
        return Secret(secret, known=True)

    def cram_md5(self, name: str) -> Secret[CramMD5Secret]:
        """The user's CRAM-MD5 HMAC states, or a decoy."""
        entry = self.lookup(name)
        if entry is None or entry.cram_md5 is None:
            decoy = self._decoys.cram_md5(prepare_name(name))
            return Secret(decoy, known=False, user_without_secret=entry is not None)
        return Secret(entry.cram_md5, known=True)


@attrs.frozen
class Secret(Generic[_T]):
    """A challenge-response secret as the mechanisms see it.

    ``known`` is False for a decoy: the exchange runs exactly as for a real user (same salt
    format, iteration count and arithmetic) and then fails whatever the client sent.
    ``user_without_secret`` says the decoy stands in for a user who exists but has no secret
    for this mechanism: the failure is then no guess (see the module docstring).
    """

    value: _T = attrs.field(repr=False)
    known: bool
    user_without_secret: bool = False


# --- rewriting the file (the admin tool) -------------------------------------------------


def set_password(
    path: str | os.PathLike[str], name: str, password: str | bytes, rounds: int = DEFAULT_ROUNDS,
    iterations: int = SCRAM_ITERATIONS,
) -> None:
    """Store a bcrypt hash of ``password`` for ``name``, with the SCRAM-SHA-256, SCRAM-SHA-1
    and CRAM-MD5 secrets derived from it (see the module docstring), adding the user if
    needed.

    Other lines, comments included, are kept byte for byte. The user's old extra fields are
    dropped: secrets derived from the old password must not outlive it.

    The name and the password are stored prepared with SASLprep (RFC 4013, "stored"
    strings); the CRAM-MD5 states come from the password as typed (``derive_secrets`` says
    why). A line under the name as typed, from before names were prepared, is replaced too.
    """
    stored = _stored_name(name)
    secret = password.encode("utf-8") if isinstance(password, str) else password
    if not secret:
        raise PasswordError("password is empty")
    if b"\0" in secret:
        raise PasswordError("password must not contain NUL (AUTH PLAIN could not send it)")
    prepared = prepare_password(secret)
    if len(prepared) > MAX_PASSWORD_OCTETS:
        raise PasswordError(f"password is longer than {MAX_PASSWORD_OCTETS} octets, "
                            "which bcrypt would silently ignore")
    if not 4 <= rounds <= 31:
        raise PasswordError("bcrypt rounds must be between 4 and 31")
    if iterations < SCRAM_ITERATIONS:
        raise PasswordError(f"SCRAM iterations must be at least {SCRAM_ITERATIONS} (RFC 7677)")
    hashed = bcrypt.hashpw(prepared, bcrypt.gensalt(rounds))
    extras = ":".join(derive_secrets(secret, iterations)).encode("ascii")
    new_line = stored.encode("utf-8") + b":" + hashed + b":" + extras
    _rewrite(path, {stored, name}, new_line)


def delete_user(path: str | os.PathLike[str], name: str) -> bool:
    """Remove ``name`` (as typed, or prepared); False (and the file untouched) when there
    was no such user."""
    validate_name(name)
    try:
        names = {name, _stored_name(name)}
    except UserNameError:
        names = {name}  # an old line SASLprep would refuse can still be deleted
    return _rewrite(path, names, None)


def _stored_name(name: str) -> str:
    """``name`` as ``smarthost passwd`` stores it: SASLprep'd (RFC 4013, a stored string),
    then validated."""
    validate_name(name)
    try:
        stored = saslprep(name)
    except ValueError as e:
        raise UserNameError(f"user name: {e}") from None
    validate_name(stored)
    return stored


def users_file_is_insecure(path: str | os.PathLike[str]) -> bool:
    """True when group or others may read or write the file (a start-up warning).

    Hashes are slow to crack, not impossible; and whoever can write the file can add users.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO) & ~(stat.S_IXGRP | stat.S_IXOTH))


def _line_name(line: bytes) -> bytes | None:
    stripped = line.strip()
    if not stripped or stripped.startswith(b"#"):
        return None
    return stripped.split(b":", 1)[0]


def _rewrite(path: str | os.PathLike[str], names: set[str], new_line: bytes | None) -> bool:
    """Replace (or, with None, remove) every line of any of ``names``; append if none had
    one.

    Returns whether the user existed. The write is :func:`atomic_write` (mode 0600, owner
    kept): a crash leaves either the old file or the new one, never a mix.
    """
    # Rewrite the target of a symlink (an operator's /etc/smarthost/users), not the link.
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    keys = {name.encode("utf-8") for name in names}
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        # Two `smarthost passwd` runs at once must not lose one of the updates.
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            with open(target, "rb") as f:
                lines = f.read().splitlines(keepends=True)
        except FileNotFoundError:
            lines = []
        out: list[bytes] = []
        found = False
        for line in lines:
            if _line_name(line) in keys:
                if not found and new_line is not None:
                    out.append(new_line + b"\n")
                found = True
                continue
            out.append(line)
        if not found:
            if new_line is None:
                return False
            if out and not out[-1].endswith(b"\n"):
                out[-1] += b"\n"
            out.append(new_line + b"\n")
        atomic_write(target, b"".join(out))
        return found
    finally:
        os.close(dir_fd)  # also releases the lock

