"""The strict zip parse of a `.pt2` archive: one reading of its structure that no other zip reader sees.

torch's miniz and Python's zipfile locate the central directory differently, so an archive could show each a
different program; `read_zip` parses the structure itself and refuses every layout two readers could read
differently (pt2_archive.py lists what). Stored entries only, CRCs checked, at most MAX_ENTRIES entries.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from training.runtime.checkpoint import CheckpointError

MAX_ENTRIES = 8192  # zip entries (glow_mnist: 249)
MAX_TENSOR_BYTES = 2**30  # all tensor records of one archive together: 1 GiB (MNIST models here: < 5 MB)
MAX_ARCHIVE_BYTES = MAX_TENSOR_BYTES + 2**28  # the tensors, the JSON, the sample inputs and the zip structure


_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes
_END = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory, 56 bytes
_LOCATOR = struct.Struct("<IIQI")  # zip64 end of central directory locator, 20 bytes
_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor with its signature, 16 bytes
_ALLOWED_FLAGS = 0x0808  # bit 3: sizes in a data descriptor (torch writes them); bit 11: UTF-8 names
_ZIP64_EXTRA = 0x0001


@dataclass(frozen=True)
class _Entry:
    name: str
    header: int  # offset of its local header
    size: int
    crc: int
    flags: int
    name_bytes: bytes


def read_zip(payload: bytes | bytearray | memoryview, source: str) -> dict[str, memoryview]:
    """The stored entries of a zip archive, name -> bytes (views into payload), read strictly: any layout two
    zip readers could read differently, or that disagrees with itself, is refused (see the module docstring)."""
    view = memoryview(payload).cast("B")
    size = len(view)
    if size > MAX_ARCHIVE_BYTES:
        raise CheckpointError(f"{source}: {size:,} bytes; an archive may hold at most {MAX_ARCHIVE_BYTES:,}")
    if size < _END.size or bytes(view[size - _END.size : size - _END.size + 4]) != b"PK\x05\x06":
        raise CheckpointError(
            f"{source}: not a torch.export archive (the end record is not at the end of the file: not a zip, "
            "or data or a comment after it)"
        )
    _, disk, directory_disk, disk_count, count, directory_size, directory_offset, _ = _END.unpack_from(
        view, size - _END.size
    )
    directory_end = size - _END.size
    locator = directory_end - _LOCATOR.size
    if locator >= 0 and bytes(view[locator : locator + 4]) == b"PK\x06\x07":
        disk_count, count, directory_size, directory_offset, directory_end = _read_zip64_end(
            view, locator, (disk_count, count, directory_size, directory_offset), source
        )
    elif 0xFFFF in (disk_count, count) or 0xFFFFFFFF in (directory_size, directory_offset):
        raise CheckpointError(f"{source}: the end record defers to a zip64 end record the archive does not have")
    if disk or directory_disk or disk_count != count:
        raise CheckpointError(f"{source}: the archive claims to span several disks")
    if count > MAX_ENTRIES:
        raise CheckpointError(f"{source}: the archive has {count:,} entries; at most {MAX_ENTRIES:,}")
    if directory_offset + directory_size != directory_end:
        raise CheckpointError(
            f"{source}: the end record says the central directory starts at byte {directory_offset:,} and "
            f"holds {directory_size:,} bytes, but it lies at {directory_end - directory_size:,} (zip readers "
            "would read different archives from this file)"
        )
    entries = _read_directory(view, directory_offset, directory_end, count, source)
    return _read_entries(view, entries, directory_offset, source)


def _read_zip64_end(
    view: memoryview, locator: int, stated: tuple[int, int, int, int], source: str
) -> tuple[int, int, int, int, int]:
    """(entries on this disk, entries, directory size, directory offset, where the directory must end) from
    the zip64 records torch
    writes before the end record; each 32-bit value of the end record must agree or be the zip64 escape."""
    _, locator_disk, end64_offset, disks = _LOCATOR.unpack_from(view, locator)
    end64 = locator - _END64.size
    if (
        locator_disk
        or disks != 1
        or end64 < 0
        or end64_offset != end64
        or bytes(view[end64 : end64 + 4]) != b"PK\x06\x06"
    ):
        raise CheckpointError(f"{source}: the zip64 locator does not point at a zip64 end record just before it")
    _, record_size, _, _, disk, directory_disk, disk_count, count, directory_size, directory_offset = (
        _END64.unpack_from(view, end64)
    )
    if record_size != _END64.size - 12 or disk or directory_disk or disk_count != count:
        raise CheckpointError(f"{source}: the zip64 end record is not a single-disk record of {_END64.size} bytes")
    escapes = (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    for value, value64, escape in zip(stated, (count, count, directory_size, directory_offset), escapes, strict=True):
        if value not in (value64, escape):
            raise CheckpointError(f"{source}: the end record and the zip64 end record disagree ({value} != {value64})")
    return disk_count, count, directory_size, directory_offset, end64


def _read_directory(view: memoryview, start: int, end: int, count: int, source: str) -> list[_Entry]:
    """The central directory's entries: exactly `count` of them, filling it exactly."""
    entries: list[_Entry] = []
    names: set[str] = set()
    position = start
    for _ in range(count):
        if position + _CENTRAL.size > end or bytes(view[position : position + 4]) != b"PK\x01\x02":
            raise CheckpointError(
                f"{source}: the end record counts {count} entries; the central directory holds {len(entries)}"
            )
        (
            _,
            _,
            _,
            flags,
            method,
            _,
            _,
            crc,
            stored,
            size,
            name_length,
            extra_length,
            comment_length,
            disk,
            _,
            _,
            header,
        ) = _CENTRAL.unpack_from(view, position)
        name_end = position + _CENTRAL.size + name_length
        entry_end = name_end + extra_length + comment_length
        if entry_end > end:
            raise CheckpointError(f"{source}: a central directory entry runs past the directory")
        name_bytes = bytes(view[position + _CENTRAL.size : name_end])
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{source}: an entry name is not UTF-8 ({name_bytes[:40]!r})") from error
        if flags & ~_ALLOWED_FLAGS:
            raise CheckpointError(
                f"{source}: entry {name[:80]!r} is encrypted or uses zip features (flags {flags:#06x})"
            )
        if method != 0 or stored != size:
            raise CheckpointError(
                f"{source}: entry {name[:80]!r} is compressed (method {method}); a program's records are stored "
                "uncompressed, as torch.export.save writes them"
            )
        if 0xFFFFFFFF in (size, header) or disk:
            raise CheckpointError(f"{source}: entry {name[:80]!r} uses zip64 or multi-disk fields")
        _check_extra(view[name_end : name_end + extra_length], name, source)
        if name in names:
            raise CheckpointError(f"{source}: the archive names {name[:80]!r} twice")
        names.add(name)
        entries.append(_Entry(name, header, size, crc, flags, name_bytes))
        position = entry_end
    if position != end:
        raise CheckpointError(
            f"{source}: the end record counts {count} entries; the central directory holds more "
            f"({end - position:,} bytes after them)"
        )
    return entries


def _check_extra(extra: memoryview, name: str, source: str) -> None:
    """Extra fields are (id, size, data) records that fill the field exactly; zip64 sizes are refused (no
    record of a bounded archive needs them, and readers disagree on their precedence)."""
    position = 0
    while position < len(extra):
        if position + 4 > len(extra):
            raise CheckpointError(f"{source}: entry {name[:80]!r} has a damaged extra field")
        field_id, field_size = struct.unpack_from("<HH", extra, position)
        position += 4 + field_size
        if position > len(extra):
            raise CheckpointError(f"{source}: entry {name[:80]!r} has a damaged extra field")
        if field_id == _ZIP64_EXTRA:
            raise CheckpointError(f"{source}: entry {name[:80]!r} carries zip64 sizes")


def _read_entries(view: memoryview, entries: list[_Entry], directory: int, source: str) -> dict[str, memoryview]:
    """Each entry's bytes, from its local header: the entries tile the file from byte 0 to the directory
    with nothing before, between or overlapping, and every local record agrees with the directory."""
    records: dict[str, memoryview] = {}
    expected = 0
    previous = None
    for entry in sorted(entries, key=lambda entry: entry.header):
        if entry.header != expected:
            if entry.header < expected:
                raise CheckpointError(f"{source}: entries {previous!r} and {entry.name[:80]!r} overlap")
            where = "before the first entry" if previous is None else f"between entries ({previous!r})"
            raise CheckpointError(f"{source}: {entry.header - expected:,} bytes {where} that no entry accounts for")
        if entry.header + _LOCAL.size > directory or bytes(view[entry.header : entry.header + 4]) != b"PK\x03\x04":
            raise CheckpointError(f"{source}: entry {entry.name[:80]!r} has no local header where the directory says")
        _, _, flags, method, _, _, crc, stored, size, name_length, extra_length = _LOCAL.unpack_from(view, entry.header)
        name_end = entry.header + _LOCAL.size + name_length
        data_start = name_end + extra_length
        data_end = data_start + entry.size
        sizes_here = (crc, stored, size)
        stated = (entry.crc, entry.size, entry.size)
        deferred = entry.flags & 0x08 and sizes_here in ((0, 0, 0), stated)
        if (
            flags != entry.flags
            or method != 0
            or bytes(view[entry.header + _LOCAL.size : name_end]) != entry.name_bytes
            or not (deferred or sizes_here == stated)
        ):
            raise CheckpointError(f"{source}: the local header of {entry.name[:80]!r} disagrees with the directory")
        _check_extra(view[name_end:data_start], entry.name, source)
        end = data_end
        if entry.flags & 0x08:
            end += _DESCRIPTOR.size
            if end > directory or _DESCRIPTOR.unpack_from(view, data_end) != (0x08074B50, *stated):
                raise CheckpointError(
                    f"{source}: the data descriptor of {entry.name[:80]!r} disagrees with the directory"
                )
        if end > directory:
            raise CheckpointError(f"{source}: entry {entry.name[:80]!r} runs into the central directory")
        data = view[data_start:data_end]
        if zlib.crc32(data) != entry.crc:
            raise CheckpointError(f"{source}: entry {entry.name[:80]!r} is damaged (its CRC does not match)")
        records[entry.name] = data
        expected = end
        previous = entry.name[:80]
    if expected != directory:
        raise CheckpointError(
            f"{source}: {directory - expected:,} bytes before the central directory that no entry accounts for"
        )
    return records


# --- what the archive may hold -----------------------------------------------------------------------
