"""Durable copy of the replay queue: admitted groups in Arrow IPC stream files plus a consumed-id ledger.

Layout of a spill directory:
- ``groups-000000.arrows``, ``groups-000001.arrows``, ...: Arrow IPC *stream* files (readable with
  ``pyarrow.ipc.open_stream``), one RecordBatch per admitted group in admission order, each carrying a
  ``crc32`` of its serialized message in the batch's custom metadata. Arrow has no checksums of its own,
  so the CRC is what tells a flipped byte from data. A new file is started when one exceeds
  ``spill_file_bytes`` and on every queue start (so a crashed writer's tail is never appended to).
- ``consumed.ledger``: one group id per line, appended and fsync'd before ``get`` returns the groups.
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from common.schema import SCHEMA, SCHEMA_VERSION, VERSION_KEY, validate_group

log = logging.getLogger(__name__)
LEDGER = "consumed.ledger"
_CRC_KEY = b"crc32"


class SpillCorruptError(ValueError):
    """A spill file holds a record that is truncated or whose checksum does not match."""


def _crc(rb: pa.RecordBatch) -> int:
    return zlib.crc32(rb.serialize())


@dataclass
class Recovered:
    """What a spill directory held: unconsumed groups in admission order, and the counts behind it."""

    groups: list[pa.RecordBatch] = field(default_factory=list)
    admitted: int = 0  # every distinct group ever admitted (consumed or not)
    consumed: int = 0
    corrupt: int = 0  # records (or file tails) skipped as corrupted/truncated
    next_file_index: int = 0


def _spill_files(spill_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for path in spill_dir.glob("groups-*.arrows"):
        out.append((int(path.stem.split("-")[1]), path))
    return sorted(out)


def _read_ledger(path: Path) -> set[str]:
    """Consumed ids; a last line without its newline was cut by a crash mid-write and is dropped (its
    ``get`` never returned), and cut off the file so the next append starts on a fresh line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        log.warning("spill ledger %s ends in a partial line; ignoring it", path)
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return set(complete.decode().splitlines())


def _corrupt(message: str, on_corrupt: str, rec: Recovered) -> None:
    if on_corrupt == "raise":
        raise SpillCorruptError(message + "; move the file away or set queue.on_corrupt_spill=skip")
    log.warning("%s; skipping it", message)
    rec.corrupt += 1


def recover(spill_dir: Path, on_corrupt: str, keep_consumed: bool = False) -> Recovered:
    """Read every spill file in order; return the admitted-but-unconsumed groups, each once.

    ``keep_consumed`` returns consumed groups too (offline analysis of a finished run).
    """
    consumed_ids = _read_ledger(spill_dir / LEDGER)
    rec = Recovered()
    seen: set[str] = set()
    for index, path in _spill_files(spill_dir):
        rec.next_file_index = index + 1
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except (pa.ArrowException, OSError) as err:
            if path.stat().st_size == 0:  # created, crashed before the schema was written
                continue
            _corrupt(f"spill file {path} has an unreadable header ({err})", on_corrupt, rec)
            continue
        found = (reader.schema.metadata or {}).get(VERSION_KEY, b"").decode(errors="replace")
        if found.isdigit() and found != str(SCHEMA_VERSION):  # another layout, not corruption: say so in one line
            raise ValueError(f"spill file {path}: trajectory schema version {found} but this code reads version "
                             f"{SCHEMA_VERSION}; convert the data or run the matching code version")
        position = 0
        while True:
            try:
                rb, meta = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as err:
                # Stream framing is lost: nothing after this point of the file can be trusted.
                _corrupt(f"spill file {path} is truncated or corrupted after record {position} ({err})", on_corrupt, rec)
                break
            position += 1
            try:
                rb.validate(full=True)  # bounds-check offsets first: touching corrupt buffers can abort
            except pa.ArrowException as err:
                _corrupt(f"spill file {path} record {position - 1} is malformed ({err})", on_corrupt, rec)
                continue
            crc = meta[_CRC_KEY] if meta is not None and _CRC_KEY in meta else b""
            if not crc.isdigit() or int(crc) != _crc(rb):  # a flipped byte can land in the crc digits too
                _corrupt(f"spill file {path} record {position - 1} fails its crc32 check", on_corrupt, rec)
                continue
            try:
                validate_group(rb)
            except ValueError as err:
                _corrupt(f"spill file {path} record {position - 1} is not a valid group ({err})", on_corrupt, rec)
                continue
            group_id = rb.column("group_id")[0].as_py()
            if group_id in seen:
                continue
            seen.add(group_id)
            rb = pa.ipc.read_record_batch(rb.serialize(), SCHEMA)  # own the memory, not the file mapping
            if group_id in consumed_ids:
                rec.consumed += 1
            if keep_consumed or group_id not in consumed_ids:
                rec.groups.append(rb)
    rec.admitted = len(seen)
    return rec


class SpillWriter:
    """Appends admitted groups to rotating IPC stream files and consumed ids to the ledger."""

    def __init__(self, spill_dir: Path, first_file_index: int, file_bytes: int):
        self.dir, self.index, self.file_bytes = spill_dir, first_file_index, file_bytes
        self.bytes_written, self.files = 0, 0
        self._file = self._writer = None
        self._ledger = open(spill_dir / LEDGER, "ab", buffering=0)

    def _open(self) -> None:
        path = self.dir / f"groups-{self.index:06d}.arrows"
        self._file = open(path, "xb", buffering=0)  # "x": never append to a file a crashed run left
        self._writer = pa.ipc.new_stream(self._file, SCHEMA)
        self.index += 1
        self.files += 1

    def _rotate(self) -> None:
        self._writer.close()  # writes the end-of-stream marker
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = self._writer = None

    def append(self, rb: pa.RecordBatch) -> None:
        """Write one group; it reaches the OS before this returns, so it survives the process dying.

        Not fsync'd per group (that would bound throughput by disk latency); files are fsync'd on rotation
        and close, the ledger on every write.
        """
        if self._writer is None:
            self._open()
        before = self._file.tell()
        self._writer.write_batch(rb, custom_metadata={_CRC_KEY: str(_crc(rb))})
        self.bytes_written += self._file.tell() - before
        if self._file.tell() >= self.file_bytes:
            self._rotate()

    def mark_consumed(self, group_ids: list[str]) -> None:
        """Append and fsync the ids, so a restart never hands them out again."""
        self._ledger.write("".join(f"{g}\n" for g in group_ids).encode())
        os.fsync(self._ledger.fileno())

    def close(self) -> None:
        if self._writer is not None:
            self._rotate()
        if not self._ledger.closed:
            self._ledger.close()
