"""Tests for unembed.data.images: argument expansion and safe decoding of hostile files.

Every input is built in tmp_path by the test that uses it.
"""
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unembed.data.images import display_path, expand_inputs, load_image
from unembed.errors import BadInputError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(path, image=None, **params):
    (image or Image.new("RGB", (4, 4), RED)).save(path, **params)
    return str(path)


def load_error(path, **kwargs) -> str:
    with pytest.raises(BadInputError) as caught:
        load_image(path, **kwargs)
    message = str(caught.value)
    assert os.path.basename(display_path(path)) in message
    message.encode("utf-8")  # printable, even for odd names
    return message


def png_claiming_size(path, width, height):
    """A small valid PNG whose IHDR claims width x height: a header-only decompression bomb."""
    data = bytearray(open(save(path, Image.new("1", (8, 8)), format="PNG"), "rb").read())
    data[16:24] = struct.pack(">II", width, height)  # IHDR body starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of type + body
    path.write_bytes(bytes(data))
    return str(path)


# --- load_image: hostile and broken files ---


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in load_error(tmp_path / "empty.png")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    assert "not an image file (unrecognised format)" in load_error(tmp_path / "notes.jpg")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut.{fmt.lower()}"
    data = open(save(path, Image.fromarray(noise), format=fmt), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt image data" in load_error(path)


def test_missing_file_and_directory(tmp_path):
    assert "no such file or directory" in load_error(tmp_path / "gone.png")
    (tmp_path / "folder.png").mkdir()
    assert "is a directory" in load_error(tmp_path / "folder.png")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_unreadable_file():
    import shutil
    import tempfile

    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        path = save(Path(folder) / "locked.png")
        os.chmod(path, 0)
        if os.geteuid() != 0:
            assert "permission denied" in load_error(path)
            return
        # Root reads anything (and CI runs as root): read as an unprivileged user, as most users are.
        os.seteuid(65534)
        try:
            message = load_error(path)
        finally:
            os.seteuid(0)
        assert message == f"{path}: permission denied"
    finally:
        shutil.rmtree(folder)


def test_decompression_bomb_refused_from_header(tmp_path):
    path = png_claiming_size(tmp_path / "bomb.png", 50_000, 50_000)
    assert os.path.getsize(path) < 1000
    message = load_error(path)  # refused from the header: decoding 2.5 gigapixels would need gigabytes
    assert "2.5 gigapixels, over the 64-megapixel limit" in message


def test_pixel_limit_checked_before_decoding(tmp_path):
    # Under Pillow's own threshold, over ours; its data would not decode, so a size error
    # proves the header was checked first.
    message = load_error(png_claiming_size(tmp_path / "big.png", 9000, 9000))
    assert "image is 9000x9000 = 81 megapixels, over the 64-megapixel limit" in message
    message = load_error(save(tmp_path / "small.png"), max_pixels=10)
    assert "image is 4x4 = 16 pixels, over the 10-pixel limit" in message


# --- load_image: unusual but valid images ---


def test_cmyk_jpeg(tmp_path):
    path = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    path = save(tmp_path / "deep.png", Image.fromarray(ramp))
    pixels = np.asarray(load_image(path))
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, *RED])
    image.putpixel((0, 0), 0)
    path = save(tmp_path / "palette.png", image, transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == WHITE and loaded.getpixel((1, 1)) == RED


@pytest.mark.parametrize("mode, clear, solid", [("RGBA", (0, 0, 0, 0), RED + (255,)), ("LA", (0, 0), (0, 255))])
def test_alpha_composited_over_white(tmp_path, mode, clear, solid):
    image = Image.new(mode, (2, 1), clear)
    image.putpixel((1, 0), solid)
    loaded = load_image(save(tmp_path / f"{mode}.png", image))
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == (RED if mode == "RGBA" else (0, 0, 0))


def test_animated_gif_gives_first_frame(tmp_path):
    red, blue = Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)
    path = save(tmp_path / "anim.gif", red, save_all=True, append_images=[blue])
    assert Image.open(path).n_frames == 2
    assert load_image(path).getpixel((0, 0)) == RED


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path / "rotated.jpg", Image.new("RGB", (40, 20), RED), exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("size", [(1, 1), (10000, 1)])
def test_tiny_and_very_wide(tmp_path, size):
    image = load_image(save(tmp_path / "thin.png", Image.new("RGB", size, BLUE)))
    assert image.size == size and image.getpixel((0, 0)) == BLUE


def test_non_utf8_file_name(tmp_path):
    path = os.path.join(tmp_path, os.fsdecode(b"bad\xff.png"))
    save(path)
    assert load_image(path).getpixel((0, 0)) == RED
    assert display_path(path).endswith("bad\\xff.png")
    display_path(path).encode("utf-8")
    assert expand_inputs([str(tmp_path)]) == ([path], [])
    load_error(path + ".missing")


# --- expand_inputs ---


def test_folder_walk_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.webp", ".hidden.png", ".cache/d.png", "notes.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    paths, errors = expand_inputs([str(tmp_path)])
    assert paths == [str(tmp_path / name) for name in ["a.JPG", "b.png", "sub/c.webp"]]
    assert errors == []


def test_user_order_kept_and_repeats_dropped(tmp_path):
    first, second = save(tmp_path / "z.png"), save(tmp_path / "a.png")
    paths, errors = expand_inputs([first, second, first, str(tmp_path / "*.png"), str(tmp_path)])
    assert paths == [first, second] and errors == []


def test_glob_keeps_images_and_walks_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    inner, outer = save(tmp_path / "sub" / "x.png"), save(tmp_path / "y.gif")
    (tmp_path / "readme.md").write_text("hi")
    paths, errors = expand_inputs([str(tmp_path / "**")])
    assert paths == [inner, outer] and errors == []


def test_explicit_file_kept_whatever_its_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    assert expand_inputs([str(tmp_path / "notes.txt")]) == ([str(tmp_path / "notes.txt")], [])


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    inside = save(tmp_path / "dir.jpg" / "photo.png")
    (tmp_path / "empty.jpg").mkdir()
    paths, errors = expand_inputs([str(tmp_path / "dir.jpg"), str(tmp_path / "empty.jpg")])
    assert paths == [inside]
    assert [str(err) for err in errors] == [f"{tmp_path / 'empty.jpg'}: is a directory with no images"]


def test_missing_path_and_unmatched_glob(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    args = [str(tmp_path / "gone.png"), str(tmp_path / "*.nothing"), str(tmp_path / "*.md")]
    paths, errors = expand_inputs(args)
    assert paths == []
    assert [err.reason for err in errors] == [
        "no such file or directory",
        "pattern matched no files",
        "pattern matched no image files",
    ]
    assert [err.item for err in errors] == args
