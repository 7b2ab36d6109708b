"""What a client uploads to enroll a person, read in memory within limits: a tar (plain or gzip) of
labels.csv and the clips it names, or the clips and labels of a multipart form.

Nothing touches the disk, so no member name can reach outside a folder, and a name that a file system would
refuse is only a name. Every limit is checked while reading, before the next byte: members (count; regular
files and folders only, no links, devices or sparse files), each member's size, their total, and the bytes
read out of a gzip stream (a small compressed body may unpack to gigabytes). Paths in labels.csv are
resolved inside the archive; a clip it names that the archive lacks is an error naming the line.
"""

import csv
import gzip
import io
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from distmeta.profiles.store import csv_rows


@dataclass(frozen=True)
class UploadLimits:
    max_members: int = 512          # an archive's members (folders included)
    max_member_bytes: int = 32 << 20  # one member
    max_total_bytes: int = 64 << 20   # all members, and what may be read out of a compressed stream


class _Capped(io.RawIOBase):
    """A stream that refuses to yield more than `limit` bytes (the decompressed side of a gzip body)."""

    def __init__(self, inner, limit: int):
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(min(len(buffer), self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise ValueError("the archive unpacks to more than the limit of bytes an enrollment may hold")
        buffer[:len(data)] = data
        return len(data)


def member_name(name: str) -> str:
    """A member's name as a normalised relative POSIX path; absolute paths and `..` are refused."""
    normal = posixpath.normpath(name)
    if not name or len(name) > 512 or normal.startswith(("/", "../")) or normal in ("..", ".") or "\x00" in name:
        raise ValueError(f"archive member {name[:80]!r}: not a relative path inside the archive")
    return normal


def tar_members(body: bytes, limits: UploadLimits = UploadLimits()) -> dict[str, bytes]:
    """{name: content} of a tar's regular files, read within `limits` (ValueError naming what broke them)."""
    stream = io.BytesIO(body)
    if body[:2] == b"\x1f\x8b":
        stream = io.BufferedReader(_Capped(gzip.GzipFile(fileobj=stream), limits.max_total_bytes + (1 << 20)))
    members, count, total = {}, 0, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # a stream: one header at a time, never a list of all
            for member in tar:
                count += 1
                if count > limits.max_members:
                    raise ValueError(f"the archive holds more than {limits.max_members} members")
                if member.isdir():
                    continue
                name = member_name(member.name)
                if not member.isreg() or member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
                    raise ValueError(f"archive member {name!r}: only regular files and folders are accepted")
                if member.size > limits.max_member_bytes:
                    raise ValueError(f"archive member {name!r}: {member.size} bytes; at most {limits.max_member_bytes}")
                total += member.size
                if total > limits.max_total_bytes:
                    raise ValueError(f"the archive's files hold more than {limits.max_total_bytes} bytes")
                if name in members:
                    raise ValueError(f"archive member {name!r} appears twice")
                source, chunks, size = tar.extractfile(member), [], 0
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > member.size:
                        raise ValueError(f"archive member {name!r} holds more than it declares")
                    chunks.append(chunk)
                members[name] = b"".join(chunks)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"the body is not a tar archive, plain or gzip ({type(err).__name__})") from None
    return members


def archive_enrollment(body: bytes, limits: UploadLimits = UploadLimits()):
    """(clips as bytes, labels, names) from a tar holding labels.csv (columns path and labels for a listener
    model, or path and label for a speaker model; paths relative to it) and the clips; names are
    `labels.csv, line N (path)` for errors."""
    members = tar_members(body, limits)
    tables = sorted((n for n in members if posixpath.basename(n) == "labels.csv"), key=lambda n: n.count("/"))
    if not tables:
        raise ValueError("the archive holds no labels.csv (columns path,labels or path,label; paths relative to it)")
    try:
        text = members[tables[0]].decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("labels.csv is not UTF-8 text") from None
    column = "labels" if "labels" in next(csv.reader(io.StringIO(text)), []) else "label"
    folder, clips, labels, names = posixpath.dirname(tables[0]), [], [], []
    for line, row, path in csv_rows(io.StringIO(text, newline=""), ("path", column), name="labels.csv"):
        where = f"labels.csv, line {line} ({path[:80]})"
        try:
            name = member_name(posixpath.join(folder, path))
        except ValueError:
            raise ValueError(f"{where}: the path leaves the archive") from None
        if name not in members:
            raise ValueError(f"{where}: no such file in the archive")
        clips.append(members[name])
        labels.append(row[column])
        names.append(where)
    if not clips:
        raise ValueError("labels.csv names no clips")
    return clips, labels, names


def enrollment_archive(clips: list[tuple[str, str]], column: str = "labels") -> bytes:
    """An enrollment body from (clip path, label text) pairs: a tar of labels.csv (`column`: labels for a
    listener model, label for a speaker model) and the clips, as `tar -C folder -cf - .` makes one."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        rows = [f"path,{column}"]
        for i, (path, labels) in enumerate(clips):
            name = f"clips/{i}{Path(path).suffix}"
            tar.add(path, arcname=name)
            rows.append(f"{name},{labels}")
        table = ("\n".join(rows) + "\n").encode()
        info = tarfile.TarInfo("labels.csv")
        info.size = len(table)
        tar.addfile(info, io.BytesIO(table))
    return out.getvalue()
