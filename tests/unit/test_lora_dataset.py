"""Uploaded LoRA datasets: every refusal carries a user-facing message and the right 4xx, and
nothing is ever written outside `dest` (nor left half-written inside it)."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from training.lora_dataset import DatasetError, DatasetLimits, caption_text, validate_and_extract

TRIGGER = "zxq"


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (255, 0, 0), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def noisy_png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(
    path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    """A folder holding only the upload and `dest`, so 'nothing outside dest' is checkable."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def refuse(
    work: Path, zip_path: Path, status: int, match: str, limits: DatasetLimits = DatasetLimits(), trigger: str = TRIGGER
) -> DatasetError:
    before = tree(work)
    dest = work / "dest"
    with pytest.raises(DatasetError, match=match) as info:
        validate_and_extract(zip_path, dest, trigger, limits)
    assert info.value.http_status == status
    assert not dest.exists(), "a refused dataset must not leave dest behind"
    assert tree(work) == before, "nothing may be written outside dest"
    # Nothing leaked above the work folder either (e.g. a traversal to tmp_path).
    assert tree(work.parent) == {str(Path("work") / p) for p in before} | {"work"}
    return info.value


# ----------------------------------------------------------------------------- happy path


def test_valid_dataset_png_jpeg_webp_with_captions(work: Path) -> None:
    z = make_zip(
        work / "ds.zip",
        [
            ("a.png", image_bytes("PNG")),
            ("a.txt", b"a red square\n"),
            ("photos/b.jpg", image_bytes("JPEG", (0, 255, 0))),
            ("photos/b.txt", "\ufeffphoto of ZXQ on a table".encode()),
            ("c.webp", image_bytes("WEBP", (0, 0, 255))),
            ("c.txt", b"zxqish thing"),  # contains "zxq" only inside a longer word: still prefixed
            ("d.png", image_bytes("PNG", (9, 9, 9))),  # no caption
            ("misnamed.jpg", image_bytes("PNG", (1, 2, 3))),  # a PNG named .jpg: stored as .png
            ("orphan.txt", b"caption without an image"),
            ("__MACOSX/._a.png", b"\x00\x05\x16\x07 resource fork junk"),
            (".DS_Store", b"junk"),
            ("photos/", b""),
        ],
    )
    dest = work / "dest"
    ds = validate_and_extract(z, dest, "  zxq ")
    assert ds.count == 5 == len(ds.images) == len(ds.captions)
    assert ds.trigger_word == "zxq"
    assert ds.sha256 == hashlib.sha256(z.read_bytes()).hexdigest()
    by_stem = {p.name.split("_", 1)[1]: c for p, c in zip(ds.images, ds.captions)}
    assert by_stem == {
        "a.png": "zxq, a red square",
        "c.webp": "zxq, zxqish thing",
        "d.png": "zxq",
        "misnamed.png": "zxq",
        "b.jpg": "photo of ZXQ on a table",
    }
    # Flat, generated names inside dest only; every file decodes; nothing else was written.
    assert all(p.parent == dest for p in ds.images)
    assert tree(dest) == {p.name for p in ds.images}
    assert tree(work) == {"ds.zip", "dest"} | {f"dest/{p.name}" for p in ds.images}
    for p in ds.images:
        with Image.open(p) as im:
            im.load()


def test_caption_text_rules() -> None:
    """Captions: whitespace collapsed, then the trigger rule (tests/unit/test_trigger_word.py)."""
    assert caption_text("", "zxq") == "zxq"
    assert caption_text(" \n ", "zxq") == "zxq"
    assert caption_text("  a\n dog ", "zxq") == "zxq, a dog"
    assert caption_text("a ZXQ dog", "zxq") == "a ZXQ dog"
    assert caption_text("a  zxq-style\tdog", "zxq") == "a zxq-style dog"
    assert caption_text("azxq dog", "zxq") == "zxq, azxq dog"


def test_dest_must_be_empty(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes())])
    dest = work / "dest"
    dest.mkdir()
    (dest / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        validate_and_extract(z, dest, TRIGGER)


def test_existing_empty_dest_is_left_empty_on_error(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("b.png", b"\x89PNG\r\n\x1a\nbroken")])
    dest = work / "dest"
    dest.mkdir()
    with pytest.raises(DatasetError):
        validate_and_extract(z, dest, TRIGGER)
    assert dest.is_dir() and not any(dest.iterdir())


# ----------------------------------------------------------------------------- not a zip / size


def test_not_a_zip(work: Path) -> None:
    p = work / "ds.zip"
    p.write_bytes(image_bytes())
    refuse(work, p, 415, "not a zip")


def test_zip_too_large(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", noisy_png())])
    refuse(work, z, 413, "at most 1000 are allowed", DatasetLimits(max_zip_bytes=1000))


def test_file_too_large(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", noisy_png())])
    refuse(work, z, 413, "limit per file", DatasetLimits(max_image_bytes=5000))


def test_caption_too_large(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("a.txt", os.urandom(80_000).hex().encode())])
    refuse(work, z, 413, "limit per file")


def test_total_uncompressed_too_large(work: Path) -> None:
    z = make_zip(work / "ds.zip", [(f"{i}.png", noisy_png()) for i in range(3)])
    refuse(work, z, 413, "unpacks to", DatasetLimits(max_total_uncompressed_bytes=30_000))


def test_too_many_files(work: Path) -> None:
    z = make_zip(work / "ds.zip", [(f"{i}.png", image_bytes()) for i in range(4)])
    refuse(work, z, 422, "at most 3 are allowed", DatasetLimits(max_files=3))


def test_too_many_images(work: Path) -> None:
    z = make_zip(work / "ds.zip", [(f"{i}.png", image_bytes()) for i in range(3)])
    refuse(work, z, 422, "at most 2 are allowed", DatasetLimits(max_images=2))


def test_too_many_pixels(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes(size=64))])
    refuse(work, z, 422, "64x64 pixels", DatasetLimits(max_image_pixels=32 * 32))


# ----------------------------------------------------------------------------- zip bombs / lies


def test_zip_bomb_by_ratio(work: Path) -> None:
    # 50 MB of zeros deflates to ~50 KB: a ratio near 1000:1. Refused from the central directory,
    # before anything is decompressed.
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("bomb.png", bytes(50 * 1024 * 1024))])
    assert z.stat().st_size < 200_000
    refuse(work, z, 422, "zip bomb")


def _patch_sizes(data: bytearray, name: bytes, declared: int) -> None:
    """Rewrites the uncompressed size of `name` in both the local and the central header."""
    local = data.find(b"PK\x03\x04")
    while local != -1:
        n = struct.unpack_from("<H", data, local + 26)[0]
        if bytes(data[local + 30 : local + 30 + n]) == name:
            struct.pack_into("<I", data, local + 22, declared)
        local = data.find(b"PK\x03\x04", local + 4)
    central = data.find(b"PK\x01\x02")
    while central != -1:
        n = struct.unpack_from("<H", data, central + 28)[0]
        if bytes(data[central + 46 : central + 46 + n]) == name:
            struct.pack_into("<I", data, central + 24, declared)
        central = data.find(b"PK\x01\x02", central + 4)


def test_header_lying_about_size_is_caught_while_streaming(work: Path) -> None:
    # 8 MB of zeros that claims to be 1 KB: the declared ratio looks harmless, so only counting
    # the bytes actually decompressed can catch it.
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("liar.png", bytes(8 * 1024 * 1024))])
    data = bytearray(z.read_bytes())
    _patch_sizes(data, b"liar.png", 1024)
    z.write_bytes(bytes(data))
    with zipfile.ZipFile(z) as zf:
        assert zf.getinfo("liar.png").file_size == 1024
    refuse(work, z, 422, "corrupt|more data than")


def test_corrupt_deflate_stream(work: Path) -> None:
    payload = noisy_png(128)
    z = make_zip(work / "ds.zip", [("a.png", payload)])
    data = bytearray(z.read_bytes())
    start = 30 + len("a.png")
    for i in range(start + 100, start + 400):
        data[i] ^= 0xFF
    z.write_bytes(bytes(data))
    refuse(work, z, 422, "corrupt")


# ----------------------------------------------------------------------------- content


def test_empty_zip(work: Path) -> None:
    refuse(work, make_zip(work / "ds.zip", []), 422, "no images")


def test_only_captions_and_ignored_files(work: Path) -> None:
    z = make_zip(
        work / "ds.zip", [("a.txt", b"hi"), ("__MACOSX/._a.png", image_bytes()), (".hidden.png", image_bytes())]
    )
    refuse(work, z, 422, "no images")


def test_corrupt_image(work: Path) -> None:
    good = image_bytes(size=64)
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("b.png", good[: len(good) // 2])])
    refuse(work, z, 422, "b.png: the image is corrupt")


def test_gif_named_png_is_refused_by_content(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes("GIF"))])
    refuse(work, z, 422, "not a PNG, JPEG or WebP")


def test_text_named_jpg(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.jpg", b"hello, I am not an image")])
    refuse(work, z, 422, "not a PNG, JPEG or WebP")


def test_caption_not_utf8(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("a.txt", b"\xff\xfe\xfa bad")])
    refuse(work, z, 422, "UTF-8")


# ----------------------------------------------------------------------------- paths & entries


@pytest.mark.parametrize(
    "name",
    [
        "/etc/evil.png",
        "../evil.png",
        "a/../../evil.png",
        "C:/evil.png",
        "C:evil.png",
        "..\\..\\evil.png",
        "a\\..\\..\\evil.png",
        "\\\\server\\share\\evil.png",
    ],
)
def test_unsafe_paths(work: Path, name: str) -> None:
    info = zipfile.ZipInfo(name)  # ZipInfo keeps the name verbatim (writestr(str) would not)
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), (info, image_bytes())])
    with zipfile.ZipFile(z) as zf:
        assert name in zf.namelist()
    refuse(work, z, 422, "absolute paths|'\\.\\.'|unsafe path")


def test_symlink_entry(work: Path) -> None:
    info = zipfile.ZipInfo("link.png")
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    z = make_zip(work / "ds.zip", [("a.png", image_bytes()), (info, b"/etc/passwd")])
    refuse(work, z, 422, "symbolic link")


def test_duplicate_names(work: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        z = make_zip(work / "ds.zip", [("a.png", image_bytes()), ("a.png", image_bytes("PNG", (0, 0, 0)))])
    refuse(work, z, 422, "duplicate file name")


def test_names_differing_only_in_case_are_duplicates(work: Path) -> None:
    z = make_zip(work / "ds.zip", [("A.png", image_bytes()), ("a.png", image_bytes())])
    refuse(work, z, 422, "duplicate file name")


def test_encrypted_entry(work: Path) -> None:
    # zipfile cannot write encrypted entries; set the "encrypted" flag bit in both headers.
    z = make_zip(work / "ds.zip", [("a.png", image_bytes())], compression=zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    data[6] |= 0x1
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 0x1
    z.write_bytes(bytes(data))
    refuse(work, z, 422, "encrypted")


# ----------------------------------------------------------------------------- trigger word


@pytest.mark.parametrize(
    ("trigger", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 101, "longer than 100"),
        ("zx\x07q", "control"),
        ("zx\u200bq", "control"),
        ("zxq\n", None),
    ],
)
def test_trigger_word(work: Path, trigger: str, match: str | None) -> None:
    z = make_zip(work / "ds.zip", [("a.png", image_bytes())])
    if match is None:  # surrounding whitespace (a trailing newline from a form) is trimmed
        assert validate_and_extract(z, work / "dest", trigger).captions == ["zxq"]
        return
    refuse(work, z, 422, match, trigger=trigger)
