"""An append-only, tamper-evident audit log (invariant 7).

Each line of ``DIR/audit.log`` is a JSON record holding the SHA-256 of the
record before it (``prev``) and its own (``hash``), so that editing,
removing or reordering any line *inside* the log breaks the chain. A chain
alone has no key and no end, though: whoever can write the file can cut
records off its end, or rewrite it from the first line with fresh hashes,
and the chain still holds. So the log is **anchored** by a checkpoint,
``DIR/audit.checkpoint``: the number of records and the hash of the last
one, signed with the server's Ed25519 identity key. The server writes one
about a second after records were appended (:data:`CHECKPOINT_DELAY`), when
it stops, and ``fdrtd-server audit checkpoint DIR`` writes one on demand.
Before signing, the log is flushed to disk (``fsync``), so that a crash, even
a power cut, never leaves a checkpoint that covers records the disk lost.

:func:`verify_anchored` (``fdrtd-server audit verify DIR``) then detects:

* any edit, removal, insertion or reordering of a record (the chain);
* removal of records the checkpoint covers, at the end too (truncation);
* a log rewritten from the start (the signed hash no longer matches);
* a forged or edited checkpoint, or a missing one (the signature, the key);
* a line that is not byte for byte what the writer writes: a key twice (JSON
  readers disagree on which value counts), spaces, reordered keys, other
  escapes (:func:`_parse_line`).

It does not detect, and the documentation says so:

* removal of the records written after the newest checkpoint (at most about
  a second's worth while the server runs; more if the server was killed);
* a log and checkpoint both put back to an *older* consistent state, unless
  the verifier holds a newer checkpoint kept elsewhere (``--checkpoint``);
* anything done by someone holding the server's private identity key, who can
  sign a checkpoint for any log.

Records name who did what to which handle and how it ended; they never hold
data values, tokens or result values.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fdrtd_server._files import write_atomic
from fdrtd_server.bus import now_iso

__all__ = [
    "CHECKPOINT_DELAY",
    "JOBS_SUBJECT",
    "AuditError",
    "AuditLog",
    "Checkpoint",
    "Verified",
    "admin_change",
    "audit_admin_change",
    "checkpoint_now",
    "checkpoint_path",
    "read_checkpoint",
    "sign_checkpoint",
    "verify",
    "verify_anchored",
    "write_checkpoint",
]

log = logging.getLogger("fdrtd.audit")

_GENESIS = "0" * 64
CHECKPOINT_FORMAT = "fdrtd-audit-checkpoint/1"
CHECKPOINT_DELAY = 1.0
"""Seconds from the first record after a checkpoint to the next checkpoint."""
JOBS_SUBJECT = "fdrtd.audit.jobs"
"""Core NATS subject on which microservices report how each job ended, for the controller's log."""
UNANCHORED = "audit-unanchored"
"""The action of the record a server writes when it finds records that no checkpoint covers."""
FOREIGN = "audit-foreign"
"""The action of the record a server writes when it finds records it did not write itself."""
FOUND_AT_START = "found after the last checkpoint"
"""The outcome of an ``audit-foreign`` record a server writes at start."""
FOREIGN_SHOWN = 20
"""How many of those records an ``audit-foreign`` record lists one by one."""


class AuditError(ValueError):
    """The audit log or its checkpoint fails verification; the message says how."""


class Signer(Protocol):
    """What signs checkpoints: :class:`fdrtd_server.identity.Identity` is one."""

    @property
    def name(self) -> str: ...

    @property
    def sign_public(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def checkpoint_path(log_path: Path) -> Path:
    """Where the checkpoint of ``log_path`` lives (``audit.log`` -> ``audit.checkpoint``)."""
    return log_path.with_suffix(".checkpoint")


def _canonical(record: dict[str, Any], *, allow_nan: bool = True) -> str:
    """The one JSON form of a record; the verifier allows the bare NaN older writers wrote."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=allow_nan)


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _standard(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

    Standard JSON has none of them, and Python would write them as bare
    ``NaN`` that other JSON readers (``jq``) refuse; as strings the record
    stays standard JSON, and still says what the value was.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE.get(value, "NaN")
    if isinstance(value, dict):
        return {key: _standard(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_standard(item) for item in value]
    return value


def _line(body: str, digest: str) -> bytes:
    """The log line of a record: its canonical ``body`` with ``"hash"`` appended last.

    The writer and the verifier both build lines here, so that the verifier
    can refuse any line that is not byte for byte what the writer would write.
    """
    return f'{body[:-1]},"hash":"{digest}"}}\n'.encode()


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate keys instead of keeping the last."""
    record = dict(pairs)
    if len(record) != len(pairs):
        raise _DuplicateKey
    return record


def _parse_line(path: Path, number: int, line: bytes) -> tuple[dict[str, Any], str]:
    """The record on one complete line of the log and the hash it claims.

    A line is accepted only in the exact form :meth:`AuditLog.write` gives
    it. JSON readers differ on lines that are not: with a key twice, Python
    keeps the last value while a person or ``grep`` sees the first, so a
    forger could put ``"principal":"mallory"`` in front of a genuine record
    and the chain would still hold. Re-serialising the parsed record and
    comparing bytes refuses that and any other edit that leaves the meaning
    to a reader's taste (spaces, key order, escapes).

    Raises:
        AuditError: Naming the line and the rule it breaks.
    """
    broken = f"audit log {path} is broken at line {number}"
    try:
        record = json.loads(line, object_pairs_hook=_unique_keys)
        claimed = record.pop("hash")
    except _DuplicateKey:
        raise AuditError(
            f"{broken}: a key appears twice in one record, which the server never writes; "
            "readers disagree on which value counts, so the line was forged or edited"
        ) from None
    except (ValueError, KeyError, AttributeError, TypeError):
        raise AuditError(f"{broken}: not a record") from None
    expected = _line(_canonical(record), claimed if isinstance(claimed, str) else "")
    if not isinstance(claimed, str) or line != expected:
        differs = next(
            (i for i, (a, b) in enumerate(zip(line, expected, strict=False)) if a != b),
            min(len(line), len(expected)),
        )
        raise AuditError(
            f"{broken}: the record is not in the canonical form the server writes (keys "
            'sorted with "hash" last, no spaces, non-ASCII as lowercase \\u escapes; it '
            f"differs from that form at byte {differs + 1}); the line was edited"
        )
    return record, claimed


# -- reading the chain ---------------------------------------------------------


def _linked(
    path: Path, number: int, line: bytes, head: str, after: datetime | None
) -> tuple[dict[str, Any], str, datetime]:
    """The record on line ``number``, its hash and time, if it follows the record before it.

    That record hashes to ``head`` and was written at ``after`` (None for the
    first). Writers append records in time order (:meth:`AuditLog._append`
    never writes a time before the last record's), so a record dated before
    the one before it was not written by them: backdated.

    Raises:
        AuditError: If the line is not a record, does not continue the chain
            there, has no time with a zone, or goes back in time.
    """
    record, claimed = _parse_line(path, number, line)
    body = _canonical(record)
    broken = f"audit log {path} is broken at line {number}"
    if record.get("prev") != head or hashlib.sha256(body.encode()).hexdigest() != claimed:
        raise AuditError(
            f"{broken}: this record or the one before it was changed, removed or reordered"
        )
    stated = record.get("time")
    try:
        when = datetime.fromisoformat(stated) if isinstance(stated, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise AuditError(f"{broken}: the record has no valid time (ISO 8601 with a time zone)")
    if after is not None and when < after:
        raise AuditError(
            f"{broken}: its time {stated} is before the time of the record before it; "
            "writers append records in time order, so this one was backdated (forged)"
        )
    return record, claimed, when


@dataclass
class _Scan:
    """What one pass over the log found."""

    count: int = 0
    head: str = _GENESIS
    hashes: dict[int, str] = field(default_factory=dict)
    """The hash after record n, for the counts asked for."""
    sizes: dict[int, int] = field(default_factory=dict)
    """The bytes up to the end of record n, for the counts asked for."""
    times: dict[int, datetime | None] = field(default_factory=dict)
    """The time of record n, for the counts asked for."""
    time: datetime | None = None
    """The time of the last record."""
    unanchored: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """(line number, record) of every record written by a server that found no checkpoint."""
    foreign: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """(line number, record) of every record a server wrote about records it did not write."""
    complete_bytes: int = 0
    """Length of the file up to the end of its last complete line."""
    partial: int = 0
    """Bytes after the last newline: a record whose writing was cut off."""


def _scan(path: Path, wanted: frozenset[int] = frozenset()) -> _Scan:
    """Check the chain of every complete line.

    A last line without its newline is not a record yet (it was being
    written, or the writer crashed); it is counted in ``partial``.

    Raises:
        AuditError: Naming the first line that was changed, removed or reordered.
    """
    scan = _Scan()
    if 0 in wanted:
        scan.hashes[0], scan.sizes[0], scan.times[0] = _GENESIS, 0, None
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                scan.partial = len(line)
                break
            scan.complete_bytes += len(line)
            record, claimed, scan.time = _linked(path, number, line, scan.head, scan.time)
            scan.head = claimed
            scan.count += 1
            if scan.count in wanted:
                scan.hashes[scan.count] = claimed
                scan.sizes[scan.count], scan.times[scan.count] = scan.complete_bytes, scan.time
            if record.get("action") == UNANCHORED:
                scan.unanchored.append((number, record))
            elif record.get("action") == FOREIGN:
                scan.foreign.append((number, record))
    return scan


def verify(path: Path) -> int:
    """Check the hash chain alone and return the number of records.

    This proves that no record *inside* the log was changed, removed or
    reordered; it cannot see records cut off the end or a log rewritten from
    the start. :func:`verify_anchored` checks those against the checkpoint.

    Raises:
        AuditError: (a ``ValueError``) naming the first line that was changed,
            removed or reordered.
    """
    return _scan(path).count


# -- checkpoints ---------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: "this log held ``count`` records, the last hashing to ``head``"."""

    server: str
    key: bytes
    count: int
    head: str
    time: str
    signature: bytes

    def _signed_bytes(self) -> bytes:
        return _checkpoint_message(self.server, self.key, self.count, self.head, self.time)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to the checkpoint file."""
        return {
            "format": CHECKPOINT_FORMAT,
            "server": self.server,
            "key": base64.b64encode(self.key).decode(),
            "count": self.count,
            "head": self.head,
            "time": self.time,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Checkpoint:
        """Parse the JSON form; ``source`` names the file in messages.

        Raises:
            AuditError: If it is not a well-formed checkpoint.
        """
        try:
            if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError
            count, head = data["count"], data["head"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError
            if not isinstance(head, str) or len(head) != 64:
                raise ValueError
            key = base64.b64decode(data["key"], validate=True)
            signature = base64.b64decode(data["signature"], validate=True)
            return cls(str(data["server"]), key, count, head, str(data["time"]), signature)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise AuditError(
                f"{source} is not a well-formed audit checkpoint ({CHECKPOINT_FORMAT})"
            ) from None

    def check_signature(self, source: str) -> None:
        """Raise :class:`AuditError` unless the checkpoint's own key signed it."""
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(
                self.signature, self._signed_bytes()
            )
        except (InvalidSignature, ValueError):
            raise AuditError(
                f"{source}: the signature does not match: the checkpoint was forged or edited"
            ) from None


def _checkpoint_message(server: str, key: bytes, count: int, head: str, time: str) -> bytes:
    body = {
        "format": CHECKPOINT_FORMAT,
        "server": server,
        "key": base64.b64encode(key).decode(),
        "count": count,
        "head": head,
        "time": time,
    }
    return (CHECKPOINT_FORMAT + "\n" + _canonical(body)).encode()


def sign_checkpoint(signer: Signer, count: int, head: str) -> Checkpoint:
    """Sign "the log holds ``count`` records, the last hashing to ``head``"."""
    time = now_iso()
    key = signer.sign_public
    signature = signer.sign(_checkpoint_message(signer.name, key, count, head, time))
    return Checkpoint(signer.name, key, count, head, time, signature)


def read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint in ``path``, or None if there is no such file.

    Raises:
        AuditError: If the file is not a well-formed checkpoint.
    """
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return Checkpoint.from_dict(data, str(path))


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> bool:
    """Replace the checkpoint in ``path`` atomically, unless it already covers more records.

    The file is written to a temporary file, flushed and renamed, so that a
    crash leaves the old checkpoint or the new one, never half of one.
    Returns whether the file was replaced.
    """
    current = None
    with contextlib.suppress(AuditError):
        current = read_checkpoint(path)
    if current is not None and current.key == checkpoint.key and current.count > checkpoint.count:
        return False  # a newer one was written meanwhile (e.g. by the running server)
    text = json.dumps(checkpoint.to_dict(), indent=2) + "\n"
    write_atomic(path, text, mode=0o600, sync_dir=True)
    return True


@contextlib.contextmanager
def _checkpoint_lock(log_path: Path) -> Any:
    """Serialise checkpoint writers across processes (server and CLI): a lock file beside the log.

    Appends take another lock (:func:`_append_lock`), so that records are
    written while a checkpoint is being signed and flushed.
    """
    fd = os.open(log_path.with_name(log_path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _append_lock(log_path: Path) -> Any:
    """The log opened for appending under an exclusive ``flock``: one writer at a time.

    Every process that appends (the running server, ``fdrtd-server token``,
    ``grant`` and ``source`` commands) takes it, so that each record chains
    to the one written last by whoever wrote it.
    """
    fd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


# -- verifying against a checkpoint ----------------------------------------------


@dataclass
class Verified:
    """What :func:`verify_anchored` established."""

    records: int
    checkpoint: Checkpoint | None
    """The newest checkpoint that was checked (None for an empty log without one)."""
    after_checkpoint: int
    """Records written after that checkpoint: intact chain, but not yet anchored."""
    partial_bytes: int = 0
    """An incomplete last line (a crash while writing), not counted as a record."""
    foreign: int = 0
    """Records other processes appended while the server ran (``audit-foreign`` records)."""
    foreign_lines: list[str] = field(default_factory=list)
    """The line ranges of those records (``"12-14"``)."""
    found_at_start: int = 0
    """Records a server found after the last checkpoint when it started: written while none ran,
    or by a server that was killed before its checkpoint."""
    found_lines: list[str] = field(default_factory=list)
    """The line ranges of those records."""
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A report for a person, first line ``audit log intact: N records``."""
        out = [f"audit log intact: {self.records} records"]
        if self.checkpoint is not None:
            fingerprint = self.checkpoint.key.hex()[:16]
            out.append(
                f"anchored: the first {self.checkpoint.count} records match the checkpoint "
                f"signed by '{self.checkpoint.server}' (key {fingerprint}) at "
                f"{self.checkpoint.time}"
            )
        if self.after_checkpoint:
            out.append(
                f"not anchored: the last {self.after_checkpoint} records were written after "
                "that checkpoint; their removal could not be detected (the server writes a "
                "checkpoint about a second after each record, and when it stops)"
            )
        if self.foreign:
            out.append(
                f"foreign: {self.foreign} records were appended by other processes than the "
                f"server (lines {', '.join(self.foreign_lines)}): fdrtd-server commands, or "
                "anyone who can write the server's home; the audit-foreign record after them "
                "names who they claim to be from"
            )
        if self.found_at_start:
            out.append(
                f"found at start: {self.found_at_start} records were written after the last "
                f"checkpoint (lines {', '.join(self.found_lines)}), while no server ran (by "
                "fdrtd-server commands, or anyone who can write the server's home) or by a "
                "server killed before its checkpoint; the audit-foreign record after them "
                "names who they claim to be from"
            )
        if self.partial_bytes:
            out.append(
                f"note: the log ends in an incomplete line of {self.partial_bytes} bytes "
                "(a crash while a record was written); it is not counted"
            )
        out.extend(f"note: {note}" for note in self.notes)
        return out


def verify_anchored(
    path: Path,
    checkpoint: Path | None = None,
    *,
    public_key: bytes | None = None,
    server: str | None = None,
    extra: tuple[Path, ...] = (),
) -> Verified:
    """Check the chain, and the log against its checkpoint and any older ones kept elsewhere.

    Args:
        path: The audit log.
        checkpoint: Its checkpoint file (default: :func:`checkpoint_path`).
        public_key: The server's raw Ed25519 public key; every checkpoint must be
            signed by it. Without it, a checkpoint's own key is trusted, which
            only proves that the log matches *a* signed checkpoint.
        server: The server's name, checked against the checkpoint's if given.
        extra: Further checkpoints (e.g. copies kept on another machine);
            each must match the log too, which detects a log and checkpoint
            put back to an older state together.

    Raises:
        AuditError: Saying what is wrong: a broken chain (with its line), a
            missing, forged or foreign checkpoint, records cut off the end, or a
            log rewritten from the start.
    """
    return _verify(path, checkpoint, public_key, server, extra)[0]


def _verify(
    path: Path,
    checkpoint: Path | None,
    public_key: bytes | None,
    server: str | None,
    extra: tuple[Path, ...],
    upto: int = 0,
) -> tuple[Verified, _Scan]:
    own = checkpoint if checkpoint is not None else checkpoint_path(path)
    sources = [own, *extra]
    found: list[tuple[Path, Checkpoint]] = []
    for source in sources:
        loaded = read_checkpoint(source)
        if loaded is None:
            if source == own:
                continue
            raise AuditError(f"checkpoint {source} does not exist")
        found.append((source, loaded))
    for source, point in found:
        point.check_signature(str(source))
        if public_key is not None and point.key != public_key:
            raise AuditError(
                f"{source} is signed by key {point.key.hex()[:16]}, not by this server's "
                f"key {public_key.hex()[:16]}: it is not this server's checkpoint"
            )
        if server is not None and point.server != server:
            raise AuditError(f"{source} is the checkpoint of '{point.server}', not of '{server}'")
    if not path.exists():
        if found:
            source, point = max(found, key=lambda item: item[1].count)
            raise AuditError(
                f"audit log {path} is missing, but {source} records {point.count} records "
                f"as of {point.time}: the log was removed"
            )
        raise AuditError(f"{path} does not exist: nothing was audited on this server yet")
    scan = _scan(path, frozenset({upto, *(point.count for _, point in found)}))
    for source, point in found:
        if scan.count < point.count:
            raise AuditError(
                f"audit log {path} was truncated: the checkpoint {source} of {point.time} "
                f"covers {point.count} records, but the log holds only {scan.count}; records "
                f"{scan.count + 1} to {point.count} were removed"
            )
        if scan.hashes[point.count] != point.head:
            raise AuditError(
                f"audit log {path} was rewritten: record {point.count} does not hash to the "
                f"value the checkpoint {source} of {point.time} signed; the records up to "
                f"{point.count} are not the ones that were written"
            )
    own_point = next((point for source, point in found if source == own), None)
    if own_point is None and scan.count:
        raise AuditError(
            f"audit log {path} holds {scan.count} records but has no checkpoint ({own}): "
            "records cut off its end or a rewritten log cannot be ruled out; was the "
            "checkpoint deleted?"
        )
    newest = max((point for _, point in found), key=lambda p: p.count, default=None)
    verified = Verified(
        records=scan.count,
        checkpoint=newest,
        after_checkpoint=scan.count - (newest.count if newest else 0),
        partial_bytes=scan.partial,
    )
    for number, record in scan.foreign:
        counts = [record.get(key) for key in ("records", "first_line", "last_line")]
        if all(type(value) is int for value in counts):
            found_count, first, last = (int(value) for value in counts)  # type: ignore[arg-type]
            lines = f"{first}-{last}" if first != last else f"{first}"
            if record.get("outcome") == FOUND_AT_START:
                verified.found_at_start += found_count
                verified.found_lines.append(lines)
            else:
                verified.foreign += found_count
                verified.foreign_lines.append(lines)
        else:
            verified.notes.append(f"line {number}: an audit-foreign record without its counts")
    for number, record in scan.unanchored:
        verified.notes.append(
            f"line {number}: at {record.get('time')} the server found {record.get('records')} "
            "records that no checkpoint covered (the checkpoint was missing); it anchored "
            "them as they were, so changes to them before then cannot be ruled out"
        )
    return verified, scan


def checkpoint_now(path: Path, signer: Signer) -> tuple[Verified, Checkpoint]:
    """Verify the log, then sign and write a checkpoint of its records as they are now.

    For ``fdrtd-server audit checkpoint``, while the server runs or not: the
    log is checked against the current checkpoint first, so that a tampered
    log is never signed.

    Raises:
        AuditError: If the log fails verification (see :func:`verify_anchored`).
    """
    verified, scan = _verify(path, None, signer.sign_public, signer.name, ())
    point = sign_checkpoint(signer, scan.count, scan.head)
    _fsync(path)
    with _checkpoint_lock(path):
        write_checkpoint(checkpoint_path(path), point)
    return verified, point


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk (every record written so far, whoever wrote it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing -------------------------------------------------------------------


def _foreign_fields(found: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The facts of an ``audit-foreign`` record about the records ``found`` (line, record)."""

    def short(value: Any) -> str:
        return str(value)[:64]

    shown = [
        {
            "line": number,
            "time": short(record.get("time")),
            "principal": short(record.get("principal")),
            "action": short(record.get("action")),
        }
        for number, record in found[:FOREIGN_SHOWN]
    ]
    fields: dict[str, Any] = {
        "records": len(found),
        "first_line": found[0][0],
        "last_line": found[-1][0],
        "entries": shown,
    }
    if len(found) > len(shown):
        fields["more"] = len(found) - len(shown)
    return fields


class AuditLog:
    """Appends hash-chained records to ``path`` (mode 0600) and anchors them.

    Several processes may append to one log: the running server and the
    ``fdrtd-server`` commands that change tokens, grants, sources or the
    policy while it runs. Each append takes an exclusive ``flock`` on the log
    (:func:`_append_lock`), reads the records others appended since this
    writer's last look (checking that they continue the chain), and chains
    its record to the last of them. The server's checkpoint thread looks at
    the log's size every ``delay`` seconds, so records appended by another
    process are anchored by the running server too; but a server never
    anchors them silently: it first appends an ``audit-foreign`` record
    naming their lines and who they claim to be from (:meth:`_catch_up`),
    and so it does at start for records written after its last checkpoint.

    Args:
        path: The log file; None audits nothing (a worker without a home).
        signer: The server's identity. With one, the log found at start is
            checked against its checkpoint (a log that fails is refused, so
            that the server never signs over a tampered log), and a signed
            checkpoint is written :data:`CHECKPOINT_DELAY` seconds after
            records were appended, by a background thread, and by
            :meth:`close`. Without one, the log is a bare hash chain.
        delay: Seconds from a record to the checkpoint that covers it.

    Raises:
        AuditError: If the log's chain is broken, or ``signer`` is given and
            the log does not match its checkpoint.
    """

    def __init__(
        self, path: Path | None, signer: Signer | None = None, delay: float = CHECKPOINT_DELAY
    ) -> None:
        self.path = path
        self._signer = signer
        self._delay = delay
        self._lock = threading.Lock()
        self._last = _GENESIS
        self._count = 0
        self._time: datetime | None = None
        """The time of the last record."""
        self._size = 0
        """Bytes of the log up to the end of the last record this writer has seen."""
        self._broken = ""
        """Why this writer found the log broken while appending (it then signs nothing more)."""
        self._anchored = -1
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        if path is None:
            return
        if signer is None:
            if path.exists():
                with self._lock, _append_lock(path) as fd:
                    self._catch_up(fd)
            return
        self._open_anchored(path, signer)
        self._thread = threading.Thread(
            target=self._checkpoints, name="fdrtd-audit-checkpoints", daemon=True
        )
        self._thread.start()

    def _open_anchored(self, path: Path, signer: Signer) -> None:
        own = checkpoint_path(path)
        if not path.exists():
            stale = read_checkpoint(own)
            if stale is not None and stale.count:
                raise AuditError(
                    f"audit log {path} is missing, but its checkpoint records {stale.count} "
                    f"records as of {stale.time}: the log was removed. Keep {own.name} as "
                    "evidence, move it away, and start again to begin a new log"
                )
            # a new log starts anchored (0 records), so that a crash before the first
            # checkpoint leaves records "not anchored" rather than a log without one
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
            self.checkpoint()
            return
        if read_checkpoint(own) is None:
            # a log from before checkpoints existed, or one whose checkpoint was
            # deleted: anchor it as found, and say so in the log itself
            with self._lock, _append_lock(path) as fd:
                self._catch_up(fd, mark=False)  # the record below says so
                found = self._count
                if found:
                    log.warning("audit log %s has %d records and no checkpoint", path, found)
                    self._append(
                        fd, "server", UNANCHORED, path.name, "anchored as found", {"records": found}
                    )
            self.checkpoint()
            return
        try:
            verified, scan = _verify(path, None, signer.sign_public, signer.name, ())
        except AuditError as error:
            raise AuditError(
                f"{error}. The server does not append to (and sign) a log that fails "
                f"verification: keep {path.name} and {own.name} as evidence, move both "
                "away, and start again to begin a new log"
            ) from None
        self._anchored = verified.checkpoint.count if verified.checkpoint else 0
        # read again from the checkpoint on: records written after it were written while
        # no server ran (or in the last second of one that was killed), so they are foreign
        known = self._anchored
        self._last, self._count = scan.hashes[known], known
        self._size, self._time = scan.sizes[known], scan.times[known]
        with self._lock, _append_lock(path) as fd:
            self._catch_up(fd, found_at_start=True)  # and a cut-off last line
        if self._count != self._anchored:
            self.checkpoint()

    def _catch_up(self, fd: int, *, mark: bool = True, found_at_start: bool = False) -> None:
        """Read the records appended since this writer's last look; the append lock is held.

        Each must continue the chain, and not go back in time. An incomplete
        last line (a writer that crashed while writing; no one writes now) is
        cut off and the repair recorded, so that the next record starts clean.

        A server (a writer with a signer) did not write these records: before
        it anchors them with its next checkpoint, it appends an
        ``audit-foreign`` record with their number, lines, times, principals
        and actions (unless ``mark`` is false), so that ``audit verify``
        shows them as appended by another process.

        Raises:
            AuditError: If the log shrank or a new record does not continue the chain.
        """
        assert self.path is not None
        size = os.fstat(fd).st_size
        if size == self._size:
            return
        if size < self._size:
            raise AuditError(
                f"audit log {self.path} shrank from {self._size} to {size} bytes while it was "
                "written: records were removed"
            )
        partial = 0
        found: list[tuple[int, dict[str, Any]]] = []
        with open(os.dup(fd), "rb") as handle:
            handle.seek(self._size)
            for line in handle:
                if not line.endswith(b"\n"):
                    partial = len(line)
                    break
                number = self._count + 1
                record, claimed, when = _linked(self.path, number, line, self._last, self._time)
                self._last, self._count, self._size = claimed, number, self._size + len(line)
                self._time = when
                found.append((number, record))
        if partial:
            os.ftruncate(fd, self._size)
            log.warning(
                "audit log %s ended in an incomplete record of %d bytes (a crash while "
                "writing); it was removed",
                self.path,
                partial,
            )
            self._append(
                fd, "server", "audit-repair", self.path.name, "dropped", {"bytes": partial}
            )
        if found and mark and self._signer is not None:
            outcome = FOUND_AT_START if found_at_start else "appended by another process"
            log.info("audit log %s: %d records %s", self.path.name, len(found), outcome)
            self._append(fd, "server", FOREIGN, self.path.name, outcome, _foreign_fields(found))

    def _catch_up_or_mark(self, fd: int) -> None:
        """:meth:`_catch_up` while running: a broken log is reported, not a failed request.

        The records go on after the break, which stays visible to
        ``fdrtd-server audit verify``; no checkpoint is signed over it again.
        """
        try:
            self._catch_up(fd)
        except AuditError as error:
            if not self._broken:
                log.error("%s; no further audit checkpoint is signed", error)
            self._broken = str(error)
            self._size = os.fstat(fd).st_size

    def _append(
        self,
        fd: int,
        principal: str,
        action: str,
        target: str,
        outcome: str,
        extra: dict[str, Any],
    ) -> None:
        """Write one record at the end of the log; the append lock is held.

        Its time is never before the last record's (a clock set back): the
        verifier refuses records that go back in time.
        """
        stamp = now_iso()
        when = datetime.fromisoformat(stamp)
        if self._time is not None and when < self._time:
            when = self._time
            stamp = when.isoformat(timespec="milliseconds")
        record = {
            "time": stamp,
            "principal": principal,
            "action": action,
            "target": target,
            "outcome": outcome,
            **extra,
            "prev": self._last,
        }
        # through JSON and back first, so that the line is a fixed point of the
        # verifier's re-serialisation (a tuple becomes a list, an int key a string)
        # non-finite floats as strings: the line is standard JSON (allow_nan=False)
        body = _canonical(json.loads(_canonical(_standard(record))), allow_nan=False)
        digest = hashlib.sha256(body.encode()).hexdigest()
        line = _line(body, digest)
        os.write(fd, line)
        self._last, self._time = digest, when
        self._count += 1
        self._size += len(line)

    def write(
        self, principal: str, action: str, target: str = "", outcome: str = "ok", **extra: Any
    ) -> None:
        """Append one record; never pass data values, tokens or results in ``extra``."""
        if self.path is None:
            return
        if "hash" in extra:
            raise ValueError("an audit record cannot have a field named 'hash'; rename it")
        with self._lock, _append_lock(self.path) as fd:
            self._catch_up_or_mark(fd)
            self._append(fd, principal, action, target, outcome, extra)
        if self._thread is not None:
            self._wake.set()

    def checkpoint(self) -> Checkpoint | None:
        """Flush the log to disk and sign a checkpoint of it now; None without a signer.

        Records other processes appended are read first, so the checkpoint
        covers them too. A log found broken while running is not signed.
        """
        if self.path is None or self._signer is None or not self.path.exists():
            return None
        with self._lock, _append_lock(self.path) as fd:
            self._catch_up_or_mark(fd)
            count, head = self._count, self._last
        if self._broken or count == self._anchored:
            return None
        _fsync(self.path)  # the records the checkpoint covers reach the disk first
        point = sign_checkpoint(self._signer, count, head)
        with _checkpoint_lock(self.path):
            write_checkpoint(checkpoint_path(self.path), point)
        self._anchored = count
        return point

    def _grown(self) -> bool:
        """Whether another process appended since this writer's last look."""
        assert self.path is not None
        try:
            return self.path.stat().st_size != self._size
        except FileNotFoundError:
            return False

    def _checkpoints(self) -> None:
        while True:
            woken = self._wake.wait(self._delay)
            if self._closing.is_set():
                return
            if woken:
                # let the records of the next second gather under one checkpoint
                self._closing.wait(self._delay)
                self._wake.clear()
                if self._closing.is_set():
                    return
            elif not self._grown():
                continue
            try:
                self.checkpoint()
            except Exception:
                log.exception("writing the audit checkpoint failed; retrying with the next record")

    def close(self) -> None:
        """Stop the background thread and write the final checkpoint."""
        if self._thread is not None:
            self._closing.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        self.checkpoint()


@contextlib.contextmanager
def admin_change(home: Path, actor: str, action: str, target: str) -> Iterator[dict[str, Any]]:
    """Make a change outside the API in the ``with`` block; it is audited, or not made.

    For the ``fdrtd-server`` commands that change tokens, grants, sources or
    the policy, whether the server runs or not. The log's lock is taken and
    its chain checked *before* the block runs, and held until the change's
    record is appended after it: a change is never made that cannot be
    audited, and no other record comes between. The block puts the record's
    further facts in the dict it is given (never secrets: tokens, hashes,
    connection strings); if it raises, nothing is recorded.

    The record is then anchored by a checkpoint signed with the server's
    identity, when this process can read it and every record before this
    one is anchored already; else the running server anchors it (listing it
    as appended by another process) within about a second, a stopped one at
    its next start.

    Args:
        home: The server home (its ``audit.log``).
        actor: Who makes the change (e.g. ``cli:<user>``).
        action: What is done, as the API's records name it (``grant``, ``source-add``, ...).
        target: The name the change is about.

    Raises:
        AuditError: If the log's chain is broken: the block does not run.
    """
    path = home / "audit.log"
    writer = AuditLog(path)
    fields: dict[str, Any] = {}
    with writer._lock, _append_lock(path) as fd:
        writer._catch_up(fd)
        yield fields
        writer._append(fd, actor, action, target, "ok", fields)
        own = writer._count
    _anchor_change(home, path, own)


def audit_admin_change(home: Path, actor: str, action: str, target: str, **fields: Any) -> None:
    """Record a change an admin already made outside the API (see :func:`admin_change`).

    Raises:
        AuditError: If the log's chain is broken before this record (nothing is written).
    """
    with admin_change(home, actor, action, target) as record:
        record.update(fields)


def _anchor_change(home: Path, path: Path, own: int) -> None:
    """Sign a checkpoint up to record ``own`` if this process can, and all before it are anchored.

    Records between the checkpoint and ``own`` were written by others (the
    running server, or someone who can write the log): this process cannot
    tell which, so it leaves them to the server, which lists the ones it did
    not write before it anchors them.
    """
    from fdrtd_server.identity import Identity  # local: keeps `import audit` light

    try:
        identity = Identity.load(home / "identity", _server_name(home))
    except (FileNotFoundError, PermissionError, ValueError):
        return  # the running server (or the next start) anchors the record
    try:
        current = read_checkpoint(checkpoint_path(path))
        if current is None or current.count != own - 1:
            return
        _, scan = _verify(path, None, identity.sign_public, identity.name, (), upto=own)
        point = sign_checkpoint(identity, own, scan.hashes[own])
        _fsync(path)
        with _checkpoint_lock(path):
            write_checkpoint(checkpoint_path(path), point)
    except AuditError as error:
        log.warning("the change was audited, but no checkpoint was signed: %s", error)


def _server_name(home: Path) -> str:
    """The server's name from ``home``'s settings (its identity file carries it too)."""
    from fdrtd_server.config import load_settings  # local: config does not import audit

    return load_settings(home).name
