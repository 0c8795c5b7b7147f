"""The sample fields a run writes, all named from one caller-chosen prefix, and what goes in them.

``{prefix}_heatmap_{i}``: phrase ``i``'s signed ``fo.Heatmap``; ``{prefix}_boxes``: ``fo.Detections``, one
per phrase with a positive heatmap (label: the phrase; ``confidence``: the share of positive heat inside
the box; ``method``, ``phrase_index``, ``heatmap_field`` attributes); ``{prefix}_phrases``: per phrase its
text, character span, tokens and their scores; ``{prefix}_score`` (cosine similarity),
``{prefix}_completeness`` (total, expected, gap), ``{prefix}_caption`` (the text explained),
``{prefix}_request`` (what was asked: a run skips samples whose request matches and that have no error)
and ``{prefix}_error`` (why the sample has no result; None when it has one).

Every field is declared before the first sample is written, and a name taken by a field of another
type refuses the run before anything is written. A dataset without an App colour scheme gets one that
colours by value, so heatmaps are drawn with a colorscale; one that has a scheme keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fiftyone as fo

from service.fiftyone.labels import BOX_METHOD, PhraseLabels

FieldSpec = tuple[type, type | None, type | None]  # field type, subfield, embedded document type


@dataclass(frozen=True)
class Fields:
    prefix: str
    max_phrases: int

    def heatmap(self, i: int) -> str:
        return f"{self.prefix}_heatmap_{i}"

    @property
    def boxes(self) -> str:
        return f"{self.prefix}_boxes"

    @property
    def phrases(self) -> str:
        return f"{self.prefix}_phrases"

    @property
    def score(self) -> str:
        return f"{self.prefix}_score"

    @property
    def completeness(self) -> str:
        return f"{self.prefix}_completeness"

    @property
    def caption(self) -> str:
        return f"{self.prefix}_caption"

    @property
    def request(self) -> str:
        return f"{self.prefix}_request"

    @property
    def error(self) -> str:
        return f"{self.prefix}_error"

    def specs(self) -> dict[str, FieldSpec]:
        """Every field a run may write, with its FiftyOne type."""
        heatmap: FieldSpec = (fo.EmbeddedDocumentField, None, fo.Heatmap)
        out: dict[str, FieldSpec] = {self.heatmap(i): heatmap for i in range(self.max_phrases)}
        return out | {
            self.boxes: (fo.EmbeddedDocumentField, None, fo.Detections),
            self.phrases: (fo.ListField, fo.EmbeddedDocumentField, fo.DynamicEmbeddedDocument),
            self.score: (fo.FloatField, None, None),
            self.completeness: (fo.EmbeddedDocumentField, None, fo.DynamicEmbeddedDocument),
            self.caption: (fo.StringField, None, None),
            self.request: (fo.StringField, None, None),
            self.error: (fo.StringField, None, None),
        }


def _describe(field: Any) -> str:
    document = getattr(field, "document_type", None)
    inner = getattr(field, "field", None)
    return (
        f"{type(field).__name__}"
        + (f"({document.__name__})" if document else "")
        + (f" of {_describe(inner)}" if inner is not None else "")
    )


def _matches(field: Any, spec: FieldSpec) -> bool:
    kind, subfield, document = spec
    if type(field) is not kind:
        return False
    if subfield is not None:
        inner = getattr(field, "field", None)
        return inner is not None and _matches(inner, (subfield, None, document))
    return document is None or getattr(field, "document_type", None) is document


def check_schema(schema: dict[str, Any], fields: Fields, read: list[str]) -> None:
    """Refuse (``ValueError``) a field name taken by another type, or a field the run reads and writes."""
    specs = fields.specs()
    for name in read:
        if name in specs:
            raise ValueError(f"field {name!r} is read and would be written: choose another prefix")
    for name, spec in specs.items():
        if name in schema and not _matches(schema[name], spec):
            wanted = spec[2].__name__ if spec[2] else spec[0].__name__
            raise ValueError(
                f"field {name!r} exists as {_describe(schema[name])}; this run would write {wanted} "
                f"there: choose another prefix than {fields.prefix!r} or delete the field"
            )


def declare(dataset: fo.Dataset, fields: Fields) -> None:
    """Add the fields the dataset lacks (so writing samples never changes the schema)."""
    schema = dataset.get_field_schema()
    for name, (kind, subfield, document) in fields.specs().items():
        if name not in schema:
            options: dict[str, Any] = {}
            if subfield is not None:
                options["subfield"] = subfield
            if document is not None:
                options["embedded_doc_type"] = document
            dataset.add_sample_field(name, kind, **options)
    # With the App's default (colour by field) a heatmap is drawn in its field's one colour; by value it
    # takes a colorscale (viridis), so the sign shows (0 is mid-scale: the range is symmetric).
    if dataset.app_config.color_scheme is None:
        dataset.app_config.color_scheme = fo.ColorScheme(color_by="value")
        dataset.save()


def result_values(fields: Fields, labels: list[PhraseLabels], summary: dict[str, Any]) -> dict[str, Any]:
    """The values to set on a sample for a result (stale heatmap slots of earlier runs are cleared)."""
    values: dict[str, Any] = {fields.heatmap(i): None for i in range(fields.max_phrases)}
    detections, phrases = [], []
    for i, phrase in enumerate(labels):
        values[fields.heatmap(i)] = fo.Heatmap(map=phrase.heatmap, range=[-phrase.limit, phrase.limit])
        if phrase.box is not None:
            detections.append(
                fo.Detection(
                    label=phrase.text,
                    bounding_box=list(phrase.box),
                    confidence=phrase.box_share,
                    method=BOX_METHOD,
                    phrase_index=i,
                    heatmap_field=fields.heatmap(i),
                )
            )
        phrases.append(
            fo.DynamicEmbeddedDocument(
                text=phrase.text,
                start=phrase.start,
                end=phrase.end,
                tokens=phrase.tokens,
                token_scores=phrase.token_scores,
                heatmap_field=fields.heatmap(i),
                box_share=phrase.box_share,
            )
        )
    return values | {
        fields.boxes: fo.Detections(detections=detections),
        fields.phrases: phrases,
        fields.score: float(summary["score"]),
        fields.completeness: fo.DynamicEmbeddedDocument(**summary["completeness"]),
        fields.caption: summary["caption"],
        fields.request: summary["request"],
        fields.error: None,
    }


def failure_values(fields: Fields, request: str, error: str) -> dict[str, Any]:
    """The values to set on a sample that failed: the error, and no stale result beside it."""
    values: dict[str, Any] = {name: None for name in fields.specs()}
    return values | {fields.request: request, fields.error: error[:2000]}
