"""Reading the benchmark's input files within limits: regular files only, capped sizes, confined images.

Annotation sets come from elsewhere: a ``file_name`` may point outside the image folder (``../x``, an
absolute path, a symlink), at a device that never ends (``/dev/zero``) or at a pipe that never opens,
and any file may be larger than a real one. Every read here refuses those with an ``AnnotationError``
that names the file, before reading more than its cap.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from attribution.evaluation.grounding.errors import AnnotationError

MAX_JSON_BYTES = 1 << 30  # COCO's largest file (instances_train2017.json) is about 450 MB
MAX_SENTENCES_BYTES = 1 << 20  # a Flickr30k Entities sentence file is about 1 KB (five captions)
MAX_XML_BYTES = 1 << 20  # a Flickr30k Entities annotation file is a few KB
MAX_IMAGE_BYTES = 64 << 20  # far above a dataset photo; decoding has its own pixel cap


def _open_regular(path: Path, what: str, *, follow_symlinks: bool) -> tuple[int, os.stat_result]:
    """A descriptor of ``path`` and its status, refusing anything but a regular file.

    ``O_NONBLOCK`` keeps the open of a pipe from waiting for a writer; the type is then read from the
    descriptor itself, so a file swapped after a check cannot slip through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as e:
        raise AnnotationError(f"cannot read {what} {path}: {e}") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise AnnotationError(f"cannot read {what} {path}: not a regular file")
    return fd, info


def read_limited(path: str | Path, limit: int, what: str, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path``, or an error if it has more than ``limit`` bytes."""
    fd, info = _open_regular(Path(path), what, follow_symlinks=follow_symlinks)
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise AnnotationError(
                f"cannot read {what} {path}: {info.st_size} bytes, more than the {limit} allowed"
            )
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise AnnotationError(f"cannot read {what} {path}: {e}") from e
    if len(data) > limit:  # grew while being read
        raise AnnotationError(f"cannot read {what} {path}: more than the {limit} bytes allowed")
    return data


def decode_utf8(data: bytes, path: str | Path, what: str) -> str:
    """``data`` as UTF-8 text, or an error naming the file, line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise AnnotationError(
            f"cannot read {what} {path}, line {line}, column {column}: not UTF-8 (byte {data[e.start]:#04x})"
        ) from e


def read_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file within ``limit``; syntax, encoding and nesting errors name the file and line."""
    text = decode_utf8(read_limited(path, limit, what), path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"cannot read {what} {path}, line {e.lineno}, column {e.colno}: not JSON ({e.msg})"
        ) from e
    except RecursionError as e:
        raise AnnotationError(f"cannot read {what} {path}: nested too deeply for an annotation file") from e


def confined_image(root: str | Path, name: str) -> Path:
    """The real path of image ``name`` inside the folder ``root``, symlinks resolved; else an error.

    ``name`` must be relative; after resolving every symlink (of the folder and of the file) it must
    still lie inside the folder's own real path.
    """
    if not name or "\x00" in name:
        raise AnnotationError(f"image file name {name!r} is empty or holds a NUL character")
    if Path(name).is_absolute():
        raise AnnotationError(
            f"image file name {name!r} is absolute; it must be relative to the image folder"
        )
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / name))
    if not real.is_relative_to(real_root) or real == real_root:
        raise AnnotationError(f"image file name {name!r} leads outside the image folder {root}")
    return real


def check_image_file(path: Path, root: Path | None) -> None:
    """Fail now, cheaply, if ``load_image`` would: outside ``root``, missing, not a regular file, too big."""
    real = confined_image(root, os.path.relpath(path, root)) if root is not None else path
    try:
        info = os.stat(real)
    except (OSError, ValueError) as e:
        raise AnnotationError(f"cannot read image {path}: {e}") from e
    if not stat.S_ISREG(info.st_mode):
        raise AnnotationError(f"cannot read image {path}: not a regular file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise AnnotationError(
            f"cannot read image {path}: {info.st_size} bytes, more than the {MAX_IMAGE_BYTES} allowed"
        )


def read_image_bytes(path: Path, root: Path | None) -> bytes:
    """The bytes of an image file; inside ``root`` (checked again at reading time) when one is given."""
    if root is None:
        return read_limited(path, MAX_IMAGE_BYTES, "image")
    real = confined_image(root, os.path.relpath(path, root))
    # The real path has no symlink left; one swapped in since is refused, not followed.
    return read_limited(real, MAX_IMAGE_BYTES, "image", follow_symlinks=False)
