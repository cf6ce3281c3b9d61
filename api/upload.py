"""Stream a multipart/form-data request: text fields into a small dict, the one file part straight
into a file in the job's folder, with every limit enforced while the bytes arrive.

Starlette's `request.form()` spools a file part to a temporary file in full before a handler sees
it; here nothing is buffered beyond one network chunk, nothing goes to the temp dir, and an upload
over the limit stops at the first chunk past it (413).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

MAX_FIELD_BYTES = 1024
"""A text field (trigger word, a number) is short; anything longer is a mistake or an attack."""
MAX_PARTS = 32
MAX_PART_HEADER_BYTES = 2048
"""All the headers of one part together (a Content-Disposition with a long file name fits)."""
MAX_PART_HEADERS = 8


class UploadError(Exception):
    """A request the caller must fix; `str()` is safe to show."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    file_bytes: int | None = None
    """Size of the file part written to the destination; None when the request had none."""


class _Receiver:
    """python-multipart callbacks: routes each part's bytes to a field buffer or the file."""

    def __init__(self, file_field: str, dest: Path, max_file_bytes: int, allowed_fields: frozenset[str]) -> None:
        self.file_field, self.dest, self.max_file_bytes, self.allowed = file_field, dest, max_file_bytes, allowed_fields
        self.result = MultipartUpload()
        self.parts = 0
        self._header_bytes = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._name: str | None = None
        self._buf: bytearray | None = None
        self._fh: BinaryIO | None = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadError(f"at most {MAX_PARTS} form fields are accepted")
        self._disposition, self._name, self._buf = None, None, None
        self._header_bytes = 0

    def _count_header_bytes(self, n: int) -> None:
        # Checked as the bytes arrive: a part header is held in memory until its line ends.
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise UploadError(f"the headers of a form part are longer than {MAX_PART_HEADER_BYTES} bytes", 400)

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_value += data[start:end]

    def header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in self.allowed and name != self.file_field:
            raise UploadError(f"unknown form field {name[:40]!r}; accepted: {sorted(self.allowed | {self.file_field})}")
        if name in self.result.fields or (name == self.file_field and self.result.file_bytes is not None):
            raise UploadError(f"form field {name!r} given twice")
        self._name = name
        if name == self.file_field:
            self._fh = self.dest.open("xb")  # x: never write through an existing file or link
            self.result.file_bytes = 0
        else:
            self._buf = bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._fh is not None:
            assert self.result.file_bytes is not None
            self.result.file_bytes += len(chunk)
            if self.result.file_bytes > self.max_file_bytes:
                raise UploadError(f"the upload is larger than {self.max_file_bytes} bytes", 413)
            self._fh.write(chunk)
        elif self._buf is not None:
            self._buf += chunk
            if len(self._buf) > MAX_FIELD_BYTES:
                raise UploadError(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def part_end(self) -> None:
        if self._fh is not None:
            self.close()
        elif self._buf is not None and self._name is not None:
            try:
                self.result.fields[self._name] = self._buf.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(f"form field {self._name!r} is not UTF-8 text") from None
        self._buf = None


async def receive_multipart(
    request: Request, file_field: str, dest: Path, max_file_bytes: int, allowed_fields: frozenset[str]
) -> MultipartUpload:
    """Parse the request body as it streams in. `dest` must not exist; it is created only when the
    request has a `file_field` part. On error the caller removes what was written (UploadError)."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type == b"application/x-www-form-urlencoded":
        return MultipartUpload(fields=await _urlencoded_fields(request, allowed_fields))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadError("the body must be multipart/form-data (a `dataset` zip file and form fields)", 415)
    receiver = _Receiver(file_field, dest, max_file_bytes, allowed_fields)
    try:
        parser = MultipartParser(
            boundary,
            receiver.callbacks(),
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        async for chunk in request.stream():
            # Disk writes of one network chunk (64 KiB) take microseconds: no thread hop needed.
            parser.write(chunk)
        parser.finalize()
    except (MultipartParseError, ValueError) as e:
        raise UploadError(f"malformed multipart body: {str(e)[:100]}", 400) from None
    finally:
        receiver.close()
    return receiver.result


async def _urlencoded_fields(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """Fields of a url-encoded form (a job without a file, e.g. `curl -d kind=classifier`)."""
    limit = MAX_PARTS * (MAX_FIELD_BYTES + 64)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadError(f"a form without a file is at most {limit} bytes", 413)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_PARTS)
    except (UnicodeDecodeError, ValueError):
        raise UploadError("malformed url-encoded form") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise UploadError(f"unknown form field {name[:40]!r}; accepted: {sorted(allowed)}")
        if name in fields:
            raise UploadError(f"form field {name!r} given twice")
        if len(value.encode()) > MAX_FIELD_BYTES:
            raise UploadError(f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes")
        fields[name] = value
    return fields
