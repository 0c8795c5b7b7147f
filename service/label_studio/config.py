"""The label config: which tags the backend's results refer to, read from the project's XML.

The backend needs an ``<Image>`` and a ``<Text>`` (their ``value="$key"`` name the task data fields) and
writes to whichever of these controls exist: ``<Labels toName=TEXT>`` (caption spans),
``<RectangleLabels toName=IMAGE>`` (boxes) and ``<BrushLabels toName=IMAGE>`` (masks). Each result
carries the control's first ``<Label value>``. Nothing is hard-coded: the names come from the config.

The XML comes from Label Studio (or whoever calls the backend), so it is parsed with care: bounded
size, and no DTD at all (no entities, hence no entity expansion or external entity reads).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from service.label_studio.errors import LabelConfigInvalid

EXAMPLE_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <Text name="caption" value="$caption"/>
  <Labels name="phrase" toName="caption"><Label value="Phrase"/></Labels>
  <RectangleLabels name="region" toName="image" smart="true"><Label value="Phrase"/></RectangleLabels>
  <BrushLabels name="heatmap" toName="image"><Label value="Phrase"/></BrushLabels>
</View>
"""
"""The labeling config the README documents (a test checks the README shows exactly this)."""

MAX_CONFIG_CHARS = 200_000
"""Label configs are a few hundred characters; far larger ones are refused before parsing."""


@dataclass(frozen=True)
class Control:
    """A labeling control: results use ``from_name``/``to_name`` and carry ``label``."""

    from_name: str
    to_name: str
    label: str


@dataclass(frozen=True)
class LabelConfig:
    image_name: str
    image_key: str  # the task data field holding the image URL
    text_name: str
    text_key: str  # the task data field holding the caption
    spans: Control | None  # <Labels> on the Text
    rectangles: Control | None  # <RectangleLabels> on the Image
    brushes: Control | None  # <BrushLabels> on the Image


def _data_key(tag: ET.Element) -> str:
    value = (tag.get("value") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigInvalid(
            f'<{tag.tag} name="{tag.get("name")}"> needs value="$field" naming a '
            f"task data field, got {value!r}"
        )
    return value[1:]


def _control(tags: list[ET.Element], kind: str, to_name: str) -> Control | None:
    for tag in tags:
        if tag.tag.lower() == kind.lower() and tag.get("toName") == to_name and tag.get("name"):
            labels = [
                lab.attrib["value"] for lab in tag.iter() if lab.tag.lower() == "label" and lab.get("value")
            ]
            if not labels:
                raise LabelConfigInvalid(f'<{tag.tag} name="{tag.get("name")}"> has no <Label value="...">')
            return Control(from_name=tag.attrib["name"], to_name=to_name, label=labels[0])
    return None


def _single(tags: list[ET.Element], kind: str) -> ET.Element:
    found = [t for t in tags if t.tag.lower() == kind.lower()]
    if len(found) != 1 or not found[0].get("name"):
        raise LabelConfigInvalid(f"the label config needs exactly one named <{kind}> tag, found {len(found)}")
    return found[0]


def parse_label_config(xml: str) -> LabelConfig:
    """Read the tags the backend needs; raises ``LabelConfigInvalid`` saying what is missing."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigInvalid("the label config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise LabelConfigInvalid(f"the label config has {len(xml)} characters; at most {MAX_CONFIG_CHARS}")
    if "<!" in xml.replace("<![CDATA[", "").replace("<!--", ""):
        raise LabelConfigInvalid("the label config may not contain <!DOCTYPE or <!ENTITY declarations")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigInvalid(f"the label config is not well-formed XML: {exc}") from None
    tags = list(root.iter())
    image, text = _single(tags, "Image"), _single(tags, "Text")
    config = LabelConfig(
        # _single checked that both tags have a name.
        image_name=image.attrib["name"],
        image_key=_data_key(image),
        text_name=text.attrib["name"],
        text_key=_data_key(text),
        spans=_control(tags, "Labels", text.attrib["name"]),
        rectangles=_control(tags, "RectangleLabels", image.attrib["name"]),
        brushes=_control(tags, "BrushLabels", image.attrib["name"]),
    )
    if not (config.spans or config.rectangles or config.brushes):
        raise LabelConfigInvalid(
            f"the label config has no control the backend can fill: add <RectangleLabels> or <BrushLabels> "
            f'with toName="{config.image_name}", or <Labels> with toName="{config.text_name}"'
        )
    return config
