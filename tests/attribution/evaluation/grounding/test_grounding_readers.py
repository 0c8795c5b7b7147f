"""COCO and Flickr30k Entities readers on tiny fixtures written here, and the scenes adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from attribution.evaluation.grounding.coco import read_coco
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.flickr30k import parse_sentence, read_flickr30k
from attribution.evaluation.grounding.samples import GroundingSample, Phrase, from_scene
from attribution.evaluation.scenes import generate_scenes


def write_image(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path, Path]:
    write_image(tmp_path / "images" / "000001.jpg")
    write_image(tmp_path / "images" / "000002.jpg")
    captions = {
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "Two Dogs chase a hot dog next to a man."},
            {"id": 12, "image_id": 1, "caption": "A sunny meadow."},  # names no boxed category: skipped
            {"id": 21, "image_id": 2, "caption": "A dog on a sofa"},  # no dog in image 2: only the couch
        ],
    }
    instances = {
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 18, "name": "dog"},
            {"id": 58, "name": "hot dog"},
            {"id": 63, "name": "couch"},
        ],
        "annotations": [
            {"image_id": 1, "category_id": 18, "bbox": [1, 2, 10, 5]},
            {"image_id": 1, "category_id": 18, "bbox": [20, 3, 4.5, 6]},
            {"image_id": 1, "category_id": 58, "bbox": [5, 5, 3, 3]},
            {"image_id": 1, "category_id": 1, "bbox": [30, 0, 10, 30]},
            {"image_id": 2, "category_id": 63, "bbox": [0, 10, 40, 20]},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return tmp_path / "captions.json", tmp_path / "instances.json", tmp_path / "images"


def test_coco_phrases_are_category_words_with_all_boxes_of_the_category(coco):
    samples = read_coco(*coco)
    assert [s.id for s in samples] == ["coco-1-11", "coco-2-21"]
    first = samples[0]
    texts = [first.caption[slice(*p.span)] for p in first.phrases]
    assert texts == ["Dogs", "hot dog", "man"]  # plural, case, longest name first, synonym of person
    assert [p.group for p in first.phrases] == ["dog", "hot dog", "person"]
    assert first.phrases[0].boxes == ((1.0, 2.0, 11.0, 7.0), (20.0, 3.0, 24.5, 9.0))  # x, y, w, h -> corners
    assert first.phrases[1].boxes == ((5.0, 5.0, 8.0, 8.0),)
    second = samples[1]
    assert [(second.caption[slice(*p.span)], p.group) for p in second.phrases] == [("sofa", "couch")]
    assert second.load_image().size == (40, 30)
    assert len(read_coco(*coco, limit=1)) == 1


def test_coco_malformed_files_raise_annotation_errors(coco, tmp_path):
    captions, instances, images = coco
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(AnnotationError, match="cannot read"):
        read_coco(broken, instances, images)
    broken.write_text(json.dumps({"images": []}))
    with pytest.raises(AnnotationError, match="annotations"):
        read_coco(captions, broken, images)
    broken.write_text(
        json.dumps(
            {"annotations": [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}], "categories": []}
        )
    )
    with pytest.raises(AnnotationError, match="malformed"):
        read_coco(captions, broken, images)


def test_coco_missing_image_file_fails_when_loaded(coco):
    captions, instances, _ = coco
    sample = read_coco(captions, instances, Path("/nonexistent"))[0]
    with pytest.raises(AnnotationError, match="cannot read image"):
        sample.load_image()


SENTENCES = """\
[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up [/EN#20/other a set of stairs] .
[/EN#18/people/other A little girl] near [/EN#0/notvisual something] and [/EN#21/scene a garden] .
The sky is blue .
"""

ANNOTATION = """\
<annotation>
  <filename>1000.jpg</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object><name>18</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
  <object><name>19</name><name>18</name>
    <bndbox><xmin>5</xmin><ymin>5</ymin><xmax>15</xmax><ymax>25</ymax></bndbox></object>
  <object><name>20</name><bndbox><xmin>30</xmin><ymin>1</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
  <object><name>21</name><nobndbox>1</nobndbox></object>
</annotation>
"""


@pytest.fixture
def flickr(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "1000.txt").write_text(SENTENCES)
    (tmp_path / "Annotations" / "1000.xml").write_text(ANNOTATION)
    write_image(tmp_path / "images" / "1000.jpg", (50, 40))
    return tmp_path, tmp_path / "images"


def test_flickr_sentence_markup_becomes_plain_caption_with_spans():
    caption, phrases = parse_sentence("[/EN#18/people A child] in [/EN#19/clothing/other a pink dress] .")
    assert caption == "A child in a pink dress ."
    assert [(caption[slice(*span)], entity, types) for span, entity, types in phrases] == [
        ("A child", "18", ("people",)),
        ("a pink dress", "19", ("clothing", "other")),
    ]


def test_flickr_samples_link_phrases_to_every_box_of_their_entity(flickr):
    samples = read_flickr30k(*flickr)
    assert [s.id for s in samples] == ["flickr-1000-0", "flickr-1000-1"]  # the third line has no phrase
    first = samples[0]
    assert first.caption == "A child in a pink dress is climbing up a set of stairs ."
    assert [first.phrase_text(i) for i in range(3)] == ["A child", "a pink dress", "a set of stairs"]
    # 1-based inclusive corners -> end-exclusive pixels; entity 18 is named by two objects.
    assert first.phrases[0].boxes == ((0.0, 1.0, 10.0, 20.0), (4.0, 4.0, 15.0, 25.0))
    assert first.phrases[1].boxes == ((4.0, 4.0, 15.0, 25.0),)
    assert [p.group for p in first.phrases] == ["people", "clothing", "other"]
    second = samples[1]  # notvisual and the box-less scene entity are skipped
    assert [second.phrase_text(i) for i in range(len(second.phrases))] == ["A little girl"]
    assert second.load_image().size == (50, 40)
    assert len(read_flickr30k(*flickr, limit=1)) == 1


def test_flickr_bad_layout_or_xml_raise_annotation_errors(flickr, tmp_path):
    root, images = flickr
    with pytest.raises(AnnotationError, match="Sentences"):
        read_flickr30k(tmp_path / "nowhere", images)
    (root / "Annotations" / "1000.xml").write_text("<annotation><object>")
    with pytest.raises(AnnotationError, match="cannot read"):
        read_flickr30k(root, images)


def test_scene_adapter_keeps_spans_boxes_and_counts_objects():
    scenes = generate_scenes(6, seed=3)
    for i, scene in enumerate(scenes):
        sample = from_scene(scene, i)
        assert sample.caption == scene.caption
        assert len(sample.phrases) == len(scene.objects)
        for phrase, obj in zip(sample.phrases, scene.objects, strict=True):
            assert sample.caption[slice(*phrase.span)] == scene.caption[slice(*obj.span)]
            assert obj.colour in sample.caption[slice(*phrase.span)]
            assert phrase.boxes == (tuple(float(v) for v in obj.box),)
            assert phrase.group == f"{len(scene.objects)} object" + ("s" if len(scene.objects) > 1 else "")


def test_samples_refuse_spans_and_boxes_that_cannot_be():
    with pytest.raises(AnnotationError, match="empty"):
        Phrase((3, 3), ((0, 0, 1, 1),), "g")
    with pytest.raises(AnnotationError, match="no box"):
        Phrase((0, 3), (), "g")
    with pytest.raises(AnnotationError, match="empty"):
        Phrase((0, 3), ((5, 0, 1, 1),), "g")
    with pytest.raises(AnnotationError, match="outside the caption"):
        GroundingSample("x", Image.new("RGB", (4, 4)), "abc", (Phrase((1, 9), ((0, 0, 1, 1),), "g"),))
