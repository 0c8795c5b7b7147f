"""Reading the label config: names and labels come from the XML; unsafe or unusable XML is refused."""

from __future__ import annotations

import pytest

from service.label_studio.config import Control, parse_label_config
from service.label_studio.errors import LabelConfigInvalid
from tests.service.label_studio.scenario import DOCUMENTED


def test_documented_config() -> None:
    config = parse_label_config(DOCUMENTED)
    assert (config.image_name, config.image_key, config.text_name, config.text_key) == (
        "image",
        "image",
        "caption",
        "caption",
    )
    assert config.spans == Control("phrase", "caption", "Phrase")
    assert config.rectangles == Control("region", "image", "Phrase")
    assert config.brushes == Control("heatmap", "image", "Phrase")


def test_other_names_are_read_not_assumed() -> None:
    config = parse_label_config("""<View><Image name="pic" value="$url"/><Text name="t" value="$text"/>
        <RectangleLabels name="boxes" toName="pic"><Label value="Object"/><Label value="Other"/>
        </RectangleLabels>
        </View>""")
    assert (config.image_key, config.text_key) == ("url", "text")
    assert config.rectangles == Control("boxes", "pic", "Object")
    assert config.spans is None and config.brushes is None


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image", "well-formed"),
        ('<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "DOCTYPE"),
        ('<View><Text name="t" value="$t"/></View>', "<Image>"),
        (
            '<View><Image name="i" value="$i"/><Image name="j" value="$j"/>'
            '<Text name="t" value="$t"/></View>',
            "exactly one",
        ),
        ('<View><Image name="i" value="i"/><Text name="t" value="$t"/></View>', "naming a task data field"),
        ('<View><Image name="i" value="$i"/><Text name="t" value="$t"/></View>', "no control"),
        (
            '<View><Image name="i" value="$i"/><Text name="t" value="$t"/>'
            '<RectangleLabels name="r" toName="i"></RectangleLabels></View>',
            "no <Label",
        ),
        ("<View>" + "<View/>" * 40_000 + "</View>", "characters"),
    ],
)
def test_refused(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigInvalid, match=message):
        parse_label_config(xml)
