"""The COCO and Flickr30k Entities readers and the benchmark's command line on hostile or broken input.

Each class of input gets an error naming the file (and line) or the sample, in time and memory bounded
by the caps, never a traceback; ``--skip-invalid`` runs the good samples and lists the rest.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attribution.evaluation.grounding.cli import main
from attribution.evaluation.grounding.coco import read_coco
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.files import MAX_IMAGE_BYTES, MAX_SENTENCES_BYTES
from attribution.evaluation.grounding.flickr30k import parse_sentence, read_flickr30k
from attribution.evaluation.grounding.samples import InvalidSample
from attribution.text import MAX_CAPTION_CHARS

TINY = ["--model", "exclip-tiny", "--pretrained", "none", "--methods", "random"]
# The grammar the markup parser implements, as the regular expression it replaced (for comparison only:
# on a hostile line this pattern takes time quadratic or worse in the line's length).
MARKUP = re.compile(r"\[/EN#(\d+)((?:/[^\s\]/]+)+) ([^\]]*)\]")
BOX = (
    "<object><name>{e}</name>"
    "<bndbox><xmin>{x0}</xmin><ymin>2</ymin><xmax>{x1}</xmax><ymax>9</ymax></bndbox></object>"
)


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (200, 30, 30)).save(path)


def coco_files(tmp_path: Path, file_names: list[str], captions: list[str] | None = None) -> list[str]:
    """A COCO pair with one image per file name, each captioned "a dog" (or ``captions``) with a dog box."""
    texts = captions or ["a dog"] * len(file_names)
    images = [{"id": i, "file_name": name} for i, name in enumerate(file_names)]
    anns = [{"id": 100 + i, "image_id": i, "caption": text} for i, text in enumerate(texts)]
    boxes = [{"image_id": i, "category_id": 18, "bbox": [1, 1, 5, 5]} for i in range(len(file_names))]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    instances = {"categories": [{"id": 18, "name": "dog"}], "annotations": boxes}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "images").mkdir(exist_ok=True)
    return [str(tmp_path / "captions.json"), str(tmp_path / "instances.json"), str(tmp_path / "images")]


def flickr_files(tmp_path: Path, lines: list[str], boxes: str) -> tuple[Path, Path]:
    for folder in ("Sentences", "Annotations"):
        (tmp_path / "flickr" / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / "flickr" / "Sentences" / "7.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "flickr" / "Annotations" / "7.xml").write_text(f"<annotation>{boxes}</annotation>")
    write_image(tmp_path / "images" / "7.jpg")
    return tmp_path / "flickr", tmp_path / "images"


# --- markup parsing in linear time ---


def test_hostile_markup_line_parses_in_linear_time():
    # Every position opens a marker whose types never end: the regular expression rescanned the rest
    # of the line from each one (about 18 s for these 64 KB on a 2-core CPU); a linear scan takes ms.
    line = ("[/EN#1/" * 10_000)[: 64 * 1024]
    start = time.perf_counter()
    caption, phrases = parse_sentence(line)
    assert time.perf_counter() - start < 2.0
    assert (caption, phrases) == (line, [])


def _regex_parse(line: str) -> tuple[str, list[tuple[tuple[int, int], str, tuple[str, ...]]]]:
    parts, phrases, length, pos = [], [], 0, 0
    for m in MARKUP.finditer(line):
        parts.append(line[pos : m.start()])
        length += m.start() - pos
        phrases.append(((length, length + len(m.group(3))), m.group(1), tuple(m.group(2)[1:].split("/"))))
        parts.append(m.group(3))
        length += len(m.group(3))
        pos = m.end()
    parts.append(line[pos:])
    return "".join(parts), phrases


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(["[/EN#", "1", "٣", "/", "a", "people", " ", "\t", "]", "[", "x y"]), max_size=30
    )
)
def test_markup_parser_reads_what_the_grammar_says(pieces):
    line = "".join(pieces)
    assert parse_sentence(line) == _regex_parse(line)


# --- image paths confined to the image folder, regular files only, size caps ---


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "/dev/zero", "{abs}"])
def test_coco_image_names_outside_the_folder_are_refused(tmp_path, name):
    write_image(tmp_path / "outside.jpg")
    name = name.format(abs=tmp_path / "outside.jpg")
    args = coco_files(tmp_path, [name])
    with pytest.raises(AnnotationError, match=r"invalid sample coco-0-100: .*(outside|absolute)"):
        read_coco(*args)


def test_coco_symlinks_are_resolved_before_the_check(tmp_path):
    write_image(tmp_path / "outside.jpg")
    args = coco_files(tmp_path, ["link.jpg", "dirlink/outside.jpg", "inside.jpg"])
    images = Path(args[2])
    (images / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    (images / "dirlink").symlink_to(tmp_path)
    write_image(images / "real.jpg")
    (images / "inside.jpg").symlink_to(images / "real.jpg")  # a link that stays inside is fine
    skipped: list[InvalidSample] = []
    samples = read_coco(*args, skipped=skipped)
    assert [s.id for s in samples] == ["coco-2-102"]
    assert samples[0].load_image().size == (20, 12)
    assert [s.id for s in skipped] == ["coco-0-100", "coco-1-101"]
    assert all("outside the image folder" in s.reason for s in skipped)


def test_a_link_swapped_in_after_reading_is_refused_when_loading(tmp_path):
    write_image(tmp_path / "outside.jpg")
    args = coco_files(tmp_path, ["late.jpg"])
    write_image(Path(args[2]) / "late.jpg")
    sample = read_coco(*args)[0]
    (Path(args[2]) / "late.jpg").unlink()
    (Path(args[2]) / "late.jpg").symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(AnnotationError, match="coco-0-100.*outside the image folder"):
        sample.load_image()


def test_images_that_are_not_regular_files_or_too_big_are_refused(tmp_path):
    args = coco_files(tmp_path, ["fifo.jpg", "huge.jpg", "folder.jpg"])
    images = Path(args[2])
    os.mkfifo(images / "fifo.jpg")  # opening it for reading would wait for a writer forever
    with open(images / "huge.jpg", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: costs no disk
    (images / "folder.jpg").mkdir()
    samples = read_coco(*args)
    for sample, reason in zip(
        samples, ["not a regular file", "more than", "not a regular file"], strict=True
    ):
        with pytest.raises(AnnotationError, match=f"{sample.id}: .*{reason}"):
            sample.check_image()
        with pytest.raises(AnnotationError, match=f"{sample.id}: .*{reason}"):
            sample.load_image()


def test_annotation_files_that_are_devices_or_too_big_are_refused(tmp_path, flickr_ok):
    args = coco_files(tmp_path, ["a.jpg"])
    with pytest.raises(AnnotationError, match="/dev/zero.*not a regular file"):
        read_coco("/dev/zero", args[1], args[2])
    root, images = flickr_ok
    with open(root / "Sentences" / "7.txt", "wb") as f:
        f.truncate(MAX_SENTENCES_BYTES + 1)
    with pytest.raises(AnnotationError, match=r"7\.txt.*more than"):
        read_flickr30k(root, images)
    (root / "Sentences" / "7.txt").unlink()
    (root / "Sentences" / "7.txt").symlink_to("/dev/zero")
    with pytest.raises(AnnotationError, match=r"7\.txt.*not a regular file"):
        read_flickr30k(root, images)


# --- malformed files: errors naming file and line ---


def test_deeply_nested_json_is_an_annotation_error(tmp_path):
    args = coco_files(tmp_path, ["a.jpg"])
    Path(args[0]).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AnnotationError, match="captions.json.*nested too deeply"):
        read_coco(*args)


def test_json_syntax_and_encoding_errors_name_the_line(tmp_path):
    args = coco_files(tmp_path, ["a.jpg"])
    Path(args[1]).write_bytes(b'{\n"annotations": [\n  1,,\n]}')
    with pytest.raises(AnnotationError, match="instances.json, line 3, column 5"):
        read_coco(*args)
    Path(args[1]).write_bytes(b'{\n"annotations": ["\xff"]}')
    with pytest.raises(AnnotationError, match="instances.json, line 2, column 18: not UTF-8"):
        read_coco(*args)


@pytest.fixture
def flickr_ok(tmp_path):
    good = "[/EN#1/people A man] walks ."
    return flickr_files(tmp_path, [good, good], BOX.format(e=1, x0=1, x1=9))


def test_non_utf8_sentence_file_names_file_and_line(flickr_ok):
    root, images = flickr_ok
    (root / "Sentences" / "7.txt").write_bytes(b"[/EN#1/people A man] walks .\nA caf\xe9 .\n")
    with pytest.raises(AnnotationError, match=r"7\.txt, line 2, column 6: not UTF-8 \(byte 0xe9\)"):
        read_flickr30k(root, images)


# --- one bad sample: a clear error naming it, or skipped with --skip-invalid ---

BAD_LINES = {
    "empty phrase": "[/EN#1/people ] walks .",
    "zero-area box": "[/EN#2/people A man] walks .",
    "NaN box": "[/EN#3/people A man] walks .",
    "over-long caption": "[/EN#1/people A man] " + "walks " * (MAX_CAPTION_CHARS // 6 + 1),
    "hostile line": "[/EN#1/" * 10_000,
}


@pytest.fixture
def flickr_bad(tmp_path):
    boxes = BOX.format(e=1, x0=1, x1=9) + BOX.format(e=2, x0=5, x1=4) + BOX.format(e=3, x0="nan", x1=9)
    lines = ["[/EN#1/people A man] walks .", *BAD_LINES.values(), "[/EN#1/people A man] sits ."]
    return flickr_files(tmp_path, lines, boxes)


def test_each_bad_flickr_sample_is_named_or_skipped(flickr_bad):
    root, images = flickr_bad
    with pytest.raises(AnnotationError, match=r"invalid sample flickr-7-1 \(7\.txt, line 2\): .*empty"):
        read_flickr30k(root, images)
    skipped: list[InvalidSample] = []
    start = time.perf_counter()
    samples = read_flickr30k(root, images, skipped=skipped)
    assert time.perf_counter() - start < 2.0
    assert [s.id for s in samples] == ["flickr-7-0", "flickr-7-6"]
    assert [s.id.split()[0] for s in skipped] == [f"flickr-7-{n}" for n in range(1, 6)]
    reasons = [s.reason for s in skipped]
    assert "empty" in reasons[0] and "empty" in reasons[1] and "finite" in reasons[2]
    assert "characters, more than" in reasons[3] and "characters, more than" in reasons[4]


def test_cli_stops_at_a_bad_sample_by_default_and_skips_with_the_option(tmp_path, capsys):
    write_image(tmp_path / "images" / "good.jpg")
    long_caption = "a dog " * (MAX_CAPTION_CHARS // 6 + 1)
    args = coco_files(
        tmp_path, ["good.jpg", "missing.jpg", "../x.jpg", "good.jpg"], ["a dog"] * 3 + [long_caption]
    )
    command = [*TINY, "--dataset", "coco", "--captions", args[0], "--instances", args[1], "--images", args[2]]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert (
        "invalid sample coco-2-102" in err and "outside the image folder" in err and "--skip-invalid" in err
    )
    assert "Traceback" not in err
    out = tmp_path / "out.json"
    assert main([*command, "--skip-invalid", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped 3 invalid sample(s)" in captured.err
    for sample_id in ("coco-1-101", "coco-2-102", "coco-3-103"):
        assert sample_id in captured.err
    config = json.loads(out.read_text())["config"]
    assert config["samples"] == 1
    assert [s["id"] for s in config["skipped"]] == ["coco-2-102", "coco-3-103", "coco-1-101"]


# --- any file: results or a clean error, never a traceback, in bounded time ---

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
COCO_KEYS = [
    "images",
    "annotations",
    "categories",
    "id",
    "file_name",
    "image_id",
    "caption",
    "bbox",
    "category_id",
    "name",
]
COCO_LIKE = st.recursive(
    st.none() | st.integers(-3, 3) | st.floats() | st.sampled_from(["a dog", "../x", "/dev/zero", "dog", ""]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(COCO_KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    captions=COCO_LIKE | JSON_VALUES,
    instances=COCO_LIKE | JSON_VALUES,
    raw=st.none() | st.binary(max_size=64),
    skip=st.booleans(),
)
def test_any_coco_files_give_samples_or_a_clean_error(tmp_path, captions, instances, raw, skip):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "c.json").write_bytes(raw if raw is not None else json.dumps(captions).encode())
    (tmp_path / "i.json").write_text(json.dumps(instances))
    start = time.perf_counter()
    try:
        samples = read_coco(
            tmp_path / "c.json", tmp_path / "i.json", tmp_path / "images", skipped=[] if skip else None
        )
    except AnnotationError as e:
        assert str(e)
    else:
        for sample in samples:
            with pytest.raises(AnnotationError, match=re.escape(sample.id)):
                sample.load_image()  # no image exists, and none outside the folder is ever read
    assert time.perf_counter() - start < 2.0


FLICKR_PIECES = ["[/EN#", "1", "2", "/people", "/notvisual", "/", " ", "a man", "]", "[", "\t", "é"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(st.sampled_from([*FLICKR_PIECES, "\n"]), max_size=60).map("".join),
    raw=st.none() | st.binary(max_size=64),
    xml=st.sampled_from(
        [
            BOX.format(e=1, x0=1, x1=9) + BOX.format(e=2, x0="x", x1=9),
            BOX.format(e=1, x0=1, x1=9) + BOX.format(e=2, x0="inf", x1=9),
            BOX.format(e=1, x0=3, x1=3),
            "<object><name>1</name><bndbox><xmin>1</xmin></bndbox></object>",
            "<object>",
            "<a>" * 5000 + "</a>" * 5000,
        ]
    ),
    skip=st.booleans(),
)
def test_any_flickr_files_give_samples_or_a_clean_error(tmp_path, text, raw, xml, skip):
    root, images = flickr_files(tmp_path, [], xml)
    (root / "Sentences" / "7.txt").write_bytes(raw if raw is not None else text.encode())
    start = time.perf_counter()
    try:
        samples = read_flickr30k(root, images, skipped=[] if skip else None)
    except AnnotationError as e:
        assert str(e)
    else:
        for sample in samples:
            assert sample.load_image().size == (20, 12)
            assert all(0 <= p.span[0] < p.span[1] <= len(sample.caption) for p in sample.phrases)
    assert time.perf_counter() - start < 2.0


def test_tables_of_files_that_are_not_results_are_a_clean_error(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"config": {}, "scores": [{"x": 1}]}))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for name in ("other.json", "deep.json"):
        assert main(["--tables", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err
