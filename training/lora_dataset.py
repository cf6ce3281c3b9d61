"""Validation and safe extraction of an uploaded LoRA training dataset (a zip of images).

A user uploads a zip of PNG/JPEG/WebP images with optional same-name `.txt` captions, plus a
trigger word. Everything here runs BEFORE a job is queued, so a bad upload is refused with a
message the user can act on (`DatasetError`, which the API maps to a 4xx) instead of failing a
worker minutes later.

The archive is untrusted input. The checks below follow that order on purpose:
1. cheap facts about the file (size, is it a zip at all, and from the end-of-central-directory
   record alone: how many entries and how large a directory it declares, so a zip of millions of
   entries is refused before any of its directory is parsed);
2. the central directory only (names, flags, modes, declared sizes, ratios) — nothing is
   decompressed until every entry passes;
3. streaming extraction that counts the bytes it actually gets and stops at the declared size
   or the limit, because declared sizes are attacker-controlled;
4. image decoding with Pillow, restricted to the three accepted formats, judged by content.

Files are written only under `dest`, with flat names this module generates; on any error the
files written so far are removed, so a refused upload leaves nothing half-extracted behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from common.trigger_word import with_trigger
from contract.specs import TRAIN_LIMITS

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

# Pillow format name -> the extension the extracted file gets. The extension in the zip is not
# trusted: a GIF renamed to .png is refused, a PNG named .jpg is stored as .png.
_FORMAT_EXT: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
_CAPTION_EXT = ".txt"
_CHUNK_BYTES = 64 * 1024
# Below this size a high compression ratio is harmless (a short caption of repeated words
# easily compresses 100x), so the ratio rule only applies to entries that could hurt.
_RATIO_MIN_BYTES = 1 * MiB
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SAFE_STEM_RE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_TRIGGER_CHARS = 100


class DatasetError(ValueError):
    """A dataset the user must fix. `str(err)` is safe to show; `http_status` is the 4xx to use."""

    def __init__(self, message: str, http_status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class DatasetLimits:
    """Upper bounds for an uploaded dataset. Defaults suit a single-user LoRA job."""

    max_zip_bytes: int = TRAIN_LIMITS.max_upload_bytes
    """The API passes its setting (JobSettings.max_upload_bytes) here."""
    max_files: int = 500
    """Images + captions (ignored `__MACOSX/` entries and dotfiles are not counted)."""
    max_images: int = 200
    max_image_bytes: int = 25 * MiB
    """Per extracted file (captions included)."""
    max_total_uncompressed_bytes: int = 1 * GiB
    max_compression_ratio: float = 100.0
    max_image_pixels: int = 4096 * 4096
    min_images: int = 1
    max_caption_bytes: int = 64 * 1024
    """Captions end up in a T5 prompt that is truncated anyway; bigger files are mistakes."""
    max_central_directory_bytes: int = 1 * MiB
    """Enough for 4 * max_files entries with long names; parsing it costs milliseconds."""

    @property
    def max_entries(self) -> int:
        # Room for what is ignored but counted by zip tools (__MACOSX doubles a zip, folders).
        return 4 * self.max_files


@dataclass(frozen=True)
class PreparedDataset:
    """An extracted, validated dataset. `images[i]` is described by `captions[i]`."""

    images: list[Path]
    captions: list[str]
    sha256: str
    """Of the uploaded zip, so a job (and its manifest) can name exactly what it trained on."""
    trigger_word: str
    root: Path

    @property
    def count(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------- trigger word


def validate_trigger_word(trigger_word: str) -> str:
    """The trigger word with surrounding whitespace removed; DatasetError when unusable."""
    if not isinstance(trigger_word, str):
        raise DatasetError("trigger_word must be a string")
    word = trigger_word.strip()
    if not word:
        raise DatasetError("trigger_word must not be empty")
    if len(word) > MAX_TRIGGER_CHARS:
        raise DatasetError(f"trigger_word is longer than {MAX_TRIGGER_CHARS} characters")
    # Category C covers control, format (zero-width, bidi overrides), surrogate and unassigned
    # characters: invisible in a UI, so a prompt that "contains the trigger" would not match.
    if any(unicodedata.category(c).startswith("C") for c in word):
        raise DatasetError("trigger_word contains control or invisible characters")
    return word


def caption_text(caption: str, trigger_word: str) -> str:
    """What an image is trained on: its caption with whitespace runs collapsed, led by the trigger
    word unless it already has it (common.trigger_word, the rule the facade applies to prompts)."""
    return with_trigger(" ".join(caption.split()), trigger_word)


# ----------------------------------------------------------------------------- zip checks


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def _display(name: str) -> str:
    """An entry name safe to echo in an error message (bounded, printable)."""
    clean = "".join(c if c.isprintable() else "?" for c in name)
    return clean if len(clean) <= 80 else clean[:77] + "..."


def _check_name(name: str) -> PurePosixPath:
    """The entry's path with `\\` read as a separator; refuses anything that could escape."""
    # Windows tools write backslashes, and a name like "..\\..\\x" is a traversal on a
    # system that honours them; read them as separators so the checks below see the parts.
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _DRIVE_RE.match(normalized):
        raise DatasetError(f"{_display(name)}: absolute paths are not allowed in the zip")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise DatasetError(f"{_display(name)}: '..' is not allowed in zip paths")
    if any(_DRIVE_RE.match(p) or "\x00" in p for p in parts):
        raise DatasetError(f"{_display(name)}: unsafe path in the zip")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _is_ignored(path: PurePosixPath) -> bool:
    # macOS Finder adds __MACOSX/ resource forks and .DS_Store files; they are not user data.
    return path.parts[:1] == ("__MACOSX",) or any(p.startswith(".") for p in path.parts)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return stat.S_ISLNK(mode)


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    path: PurePosixPath
    is_caption: bool

    @property
    def key(self) -> str:
        """Pairs an image with its caption: the path without extension, case-insensitive."""
        return str(self.path.with_suffix("")).casefold()


def _plan(zf: zipfile.ZipFile, limits: DatasetLimits) -> list[_Entry]:
    """Every check that needs only the central directory. Nothing is decompressed here."""
    infos = zf.infolist()
    # The end record was checked already (_check_directory); this counts what was really parsed.
    if len(infos) > limits.max_entries:
        raise DatasetError(f"the zip has {len(infos)} entries; at most {limits.max_files} files are allowed")
    seen: set[str] = set()
    entries: list[_Entry] = []
    total = 0
    for info in infos:
        path = _check_name(info.filename)
        key = str(path).casefold()
        # Same name twice (or differing only in case, which collides on macOS/Windows): which
        # one the user meant is ambiguous, and some unzip tools silently keep the last.
        if key in seen:
            raise DatasetError(f"{_display(info.filename)}: duplicate file name in the zip")
        seen.add(key)
        if _is_symlink(info):
            raise DatasetError(f"{_display(info.filename)}: symbolic links are not allowed in the zip")
        if info.flag_bits & 0x1:
            raise DatasetError(f"{_display(info.filename)}: encrypted zip entries are not supported")
        if info.is_dir() or _is_ignored(path):
            continue
        if info.file_size >= _RATIO_MIN_BYTES and info.file_size > limits.max_compression_ratio * max(
            info.compress_size, 1
        ):
            raise DatasetError(
                f"{_display(info.filename)}: compression ratio is suspiciously high "
                f"(over {limits.max_compression_ratio:g}:1); the zip looks like a zip bomb"
            )
        is_caption = path.suffix.lower() == _CAPTION_EXT
        per_file = limits.max_caption_bytes if is_caption else limits.max_image_bytes
        if info.file_size > per_file:
            raise DatasetError(
                f"{_display(info.filename)}: {info.file_size} bytes; the limit per file is {per_file}", 413
            )
        total += info.file_size
        entries.append(_Entry(info, path, is_caption))
    if len(entries) > limits.max_files:
        raise DatasetError(f"the zip has {len(entries)} files; at most {limits.max_files} are allowed")
    if total > limits.max_total_uncompressed_bytes:
        raise DatasetError(
            f"the zip unpacks to {total} bytes; at most {limits.max_total_uncompressed_bytes} are allowed", 413
        )
    images = [e for e in entries if not e.is_caption]
    if len(images) < limits.min_images:
        raise DatasetError(
            "the zip contains no images"
            if not images
            else f"the zip has {len(images)} images; at least {limits.min_images} are needed"
        )
    if len(images) > limits.max_images:
        raise DatasetError(f"the zip has {len(images)} images; at most {limits.max_images} are allowed")
    return entries


_EOCD = struct.Struct("<4sHHHHIIH")  # signature, disks, entries (disk, total), dir size, dir offset, comment
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, offset of the zip64 end record, disks
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # ..., entries (disk, total), dir size, dir offset
_MAX_COMMENT = 0xFFFF


def _directory_facts(zip_path: Path, size: int) -> tuple[int, int]:
    """(entries, central directory bytes) as the end record declares them, from at most 64 KiB
    read at the end of the file and nothing else: flat memory and time whatever the zip holds."""
    with zip_path.open("rb") as fh:
        tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
        fh.seek(tail_start)
        tail = fh.read()
        # Without a comment the record is the last 22 bytes; else search back (as zipfile does).
        pos = len(tail) - _EOCD.size if tail[-_EOCD.size :][:4] == _EOCD_SIG else tail.rfind(_EOCD_SIG)
        if pos < 0 or len(tail) - pos < _EOCD.size:
            raise DatasetError("the upload is not a zip archive", 415)
        _, _, _, _, entries, dir_bytes, dir_offset, _ = _EOCD.unpack_from(tail, pos)
        if entries != 0xFFFF and dir_bytes != 0xFFFFFFFF and dir_offset != 0xFFFFFFFF:
            return entries, dir_bytes
        # ZIP64: the real figures are in the zip64 end record the locator (just before) points to.
        locator_at = tail_start + pos - _ZIP64_LOCATOR.size
        if locator_at < 0:
            raise DatasetError("the zip archive is corrupt")
        fh.seek(locator_at)
        sig, _, record_at, _ = _ZIP64_LOCATOR.unpack(fh.read(_ZIP64_LOCATOR.size))
        if sig != b"PK\x06\x07" or record_at + _ZIP64_EOCD.size > size:
            raise DatasetError("the zip archive is corrupt")
        fh.seek(record_at)
        record = _ZIP64_EOCD.unpack(fh.read(_ZIP64_EOCD.size))
        if record[0] != b"PK\x06\x06":
            raise DatasetError("the zip archive is corrupt")
        return record[7], record[8]


def _check_directory(zip_path: Path, size: int, limits: DatasetLimits) -> None:
    entries, dir_bytes = _directory_facts(zip_path, size)
    if entries > limits.max_entries:
        raise DatasetError(f"the zip has {entries} entries; at most {limits.max_files} files are allowed")
    if dir_bytes > limits.max_central_directory_bytes:
        raise DatasetError(
            f"the zip's directory is {dir_bytes} bytes; at most {limits.max_central_directory_bytes} are allowed", 413
        )


def _read_entry(zf: zipfile.ZipFile, entry: _Entry, limit: int) -> bytes:
    """The entry's bytes, reading no more than its declared size (and `limit`) plus one chunk."""
    cap = min(entry.info.file_size, limit)
    buf = bytearray()
    with zf.open(entry.info) as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            buf += chunk
            # zipfile already truncates at the central directory's size and then fails the
            # CRC; this check does not rely on that, and stops as soon as the stream runs over.
            if len(buf) > cap:
                raise DatasetError(
                    f"{_display(entry.info.filename)}: the entry holds more data than its header declares"
                )
    return bytes(buf)


def _check_image(path: Path, name: str, limits: DatasetLimits) -> str:
    """The Pillow format of the image at `path`; DatasetError unless it decodes cleanly."""
    formats = list(_FORMAT_EXT)
    try:
        # `formats=` restricts Pillow to these decoders, so the content decides, not the name.
        with Image.open(path, formats=formats) as im:
            fmt = im.format
            im.verify()
        with Image.open(path, formats=formats) as im:
            width, height = im.size
            # Checked before load(): the header alone says how much memory decoding would take.
            if width * height > limits.max_image_pixels:
                raise DatasetError(
                    f"{_display(name)}: {width}x{height} pixels; at most {limits.max_image_pixels} are allowed"
                )
            im.load()
    except DatasetError:
        raise
    except UnidentifiedImageError:
        raise DatasetError(f"{_display(name)}: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise DatasetError(f"{_display(name)}: the image has too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt data with all of these; the detail is not for users.
        logger.info("image %r failed to decode: %s", name, e)
        raise DatasetError(f"{_display(name)}: the image is corrupt or truncated") from None
    if fmt not in _FORMAT_EXT:  # defensive: `formats=` should already guarantee this
        raise DatasetError(f"{_display(name)}: not a PNG, JPEG or WebP image")
    return fmt


def _decode_caption(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{_display(name)}: captions must be UTF-8 text") from None
    # Newlines and tabs become spaces; other control characters would only confuse a tokenizer.
    return "".join(c for c in " ".join(text.split()) if not unicodedata.category(c).startswith("C"))


def _safe_stem(path: PurePosixPath) -> str:
    stem = _SAFE_STEM_RE.sub("_", path.stem).strip("_")[:40]
    return stem or "image"


def _prepare_dest(dest: Path) -> bool:
    """Creates `dest`; True when this call created it (and so may remove it on failure)."""
    if dest.exists():
        if not dest.is_dir() or dest.is_symlink():
            raise ValueError(f"{dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise ValueError(f"{dest} is not empty")
        return False
    # No parents=True: creating missing parents would write outside dest, and leave them behind.
    dest.mkdir()
    return True


def _cleanup(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- entry point


def validate_and_extract(
    zip_path: Path, dest: Path, trigger_word: str, limits: DatasetLimits = DatasetLimits()
) -> PreparedDataset:
    """Validates the uploaded zip and extracts its images (flat, renamed) into `dest`.

    `dest` must not exist (its parent must) or be an empty directory; it is the only place
    anything is written.
    Raises DatasetError (user-facing message, `http_status` 413/415/422) for a bad upload, in
    which case `dest` is removed (or emptied when it existed before the call). Raises ValueError
    for a `dest` that is unusable (a caller bug, not the user's).
    """
    zip_path = Path(zip_path)
    dest = Path(dest)
    trigger = validate_trigger_word(trigger_word)

    size = zip_path.stat().st_size
    if size > limits.max_zip_bytes:
        raise DatasetError(f"the zip is {size} bytes; at most {limits.max_zip_bytes} are allowed", 413)
    _check_directory(zip_path, size, limits)
    if not zipfile.is_zipfile(zip_path):
        raise DatasetError("the upload is not a zip archive", 415)
    digest = _sha256(zip_path)

    created = _prepare_dest(dest)
    try:
        prepared = _extract(zip_path, dest, trigger, digest, limits)
    except BaseException:
        _cleanup(dest, created)
        raise
    logger.info("dataset %s: %d images extracted to %s", digest[:12], prepared.count, dest)
    return prepared


def _open_zip(zip_path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, struct.error) as e:
        # is_zipfile only looks for the end record; a mangled central directory fails here.
        logger.info("unreadable zip %s: %s", zip_path.name, e)
        raise DatasetError("the zip archive is corrupt") from None


def _extract(zip_path: Path, dest: Path, trigger: str, digest: str, limits: DatasetLimits) -> PreparedDataset:
    try:
        with _open_zip(zip_path) as zf:
            entries = _plan(zf, limits)
            captions: dict[str, str] = {}
            for e in entries:
                if e.is_caption:
                    captions[e.key] = _decode_caption(_read_entry(zf, e, limits.max_caption_bytes), e.info.filename)

            # Sorted by original name so the order (and so training) does not depend on how
            # the zip tool happened to order its entries.
            images = sorted((e for e in entries if not e.is_caption), key=lambda e: str(e.path))
            paths: list[Path] = []
            texts: list[str] = []
            for i, e in enumerate(images):
                data = _read_entry(zf, e, limits.max_image_bytes)
                # Written under a neutral name first; the extension is chosen by content below.
                tmp = dest / f"{i:04d}.partial"
                tmp.write_bytes(data)
                fmt = _check_image(tmp, e.info.filename, limits)
                final = dest / f"{i:04d}_{_safe_stem(e.path)}{_FORMAT_EXT[fmt]}"
                tmp.rename(final)
                paths.append(final)
                texts.append(caption_text(captions.pop(e.key, ""), trigger))
            for key in captions:
                logger.info("caption %r has no matching image; ignored", key)
    except (zipfile.BadZipFile, zlib.error, EOFError, struct.error) as e:
        # Includes CRC mismatches, which is how a header that lies about sizes usually shows.
        logger.info("bad zip %s: %s", zip_path.name, e)
        raise DatasetError("the zip archive is corrupt") from None
    except NotImplementedError:
        raise DatasetError("the zip uses an unsupported compression method") from None
    return PreparedDataset(images=paths, captions=texts, sha256=digest, trigger_word=trigger, root=dest)


# ----------------------------------------------------------------------------- hand-off to the worker

PREPARED_INDEX = "dataset.json"


def save_prepared(dataset: PreparedDataset) -> Path:
    """Record a validated dataset in its root, so the worker process can load it by folder."""
    index = dataset.root / PREPARED_INDEX
    index.write_text(
        json.dumps(
            {
                "images": [str(p.relative_to(dataset.root)) for p in dataset.images],
                "captions": dataset.captions,
                "sha256": dataset.sha256,
                "trigger_word": dataset.trigger_word,
            },
            indent=2,
        )
    )
    return index


def load_prepared(root: Path) -> PreparedDataset:
    data = json.loads((root / PREPARED_INDEX).read_text())
    return PreparedDataset(
        images=[root / p for p in data["images"]],
        captions=list(data["captions"]),
        sha256=data["sha256"],
        trigger_word=data["trigger_word"],
        root=root,
    )
