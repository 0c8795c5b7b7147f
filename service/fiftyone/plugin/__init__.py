"""The FiftyOne App plugin ``@exclip/explain``: three operators over ``service.fiftyone``.

- ``explain_selected_samples``: the selected samples (none selected: the current view), explained with
  their caption field and phrases (``explain_samples``).
- ``explain_text_search``: for a text similarity view, the query's words on each result (the query is
  the view's ``sort_by_similarity`` text, or the ``query`` parameter).
- ``grounding_report``: pointing and energy of the heatmaps against a ground-truth detection field and
  FiftyOne's ``evaluate_detections`` of the heatmap boxes (``service.fiftyone.grounding``).

The service's address is the ``url`` parameter, else the ``EXCLIP_URL`` secret (an environment variable
by default), else http://127.0.0.1:8000; ``EXCLIP_API_KEY`` is sent as its API key. The repository must be
importable where FiftyOne runs (``pip install -e .`` or ``PYTHONPATH``). Each operator also runs headless:
``fiftyone.operators.execute_operator("@exclip/explain/<name>", ctx={"view": ..., "params": {...}})``.
"""

from __future__ import annotations

import re
from typing import Any

import fiftyone.core.stages as fos
import fiftyone.operators as foo
import fiftyone.operators.types as types

from service.fiftyone.explain import RunSummary, explain_samples
from service.fiftyone.grounding import grounding_report
from service.fiftyone.limits import MAX_CONCURRENCY
from service.fiftyone.phrases import DEFAULT_MAX_PHRASES, MAX_PHRASES

DEFAULT_URL = "http://127.0.0.1:8000"
WORD = re.compile(r"\w+(?:['-]\w+)*")


def _service(ctx: Any) -> dict[str, Any]:
    url = ctx.params.get("url") or ctx.secret("EXCLIP_URL") or DEFAULT_URL
    return {"url": url, "api_key": ctx.secret("EXCLIP_API_KEY") or None}


def _model_options(ctx: Any) -> dict[str, Any]:
    names = ("model", "text_layer", "image_layer", "steps", "concurrency", "overwrite", "max_phrases")
    return {name: ctx.params[name] for name in names if ctx.params.get(name) is not None}


def _progress(ctx: Any) -> Any:
    """Progress for a delegated run (the App shows it); an immediate run reports nothing midway."""
    if not ctx.delegated:
        return False
    return lambda finished, total: ctx.set_progress(
        progress=finished / max(total, 1), label=f"{finished} of {total} samples"
    )


def _summary(summary: RunSummary) -> dict[str, Any]:
    return {
        "total": summary.total,
        "explained": summary.explained,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "phrases_cut": summary.phrases_cut,
        "errors": summary.errors,
    }


def _common_inputs(inputs: types.Object, prefix: str) -> None:
    inputs.str("url", label="Service URL", description=f"default: EXCLIP_URL or {DEFAULT_URL}")
    inputs.str("prefix", label="Field prefix", default=prefix)
    inputs.str("model", label="Model", description="default: the service's")
    inputs.int("steps", label="Integration steps", min=1)
    inputs.int("max_phrases", label="Phrases per sample", default=DEFAULT_MAX_PHRASES, min=1, max=MAX_PHRASES)
    inputs.int("concurrency", label="Requests at once", default=4, min=1, max=MAX_CONCURRENCY)
    inputs.bool("overwrite", label="Compute done samples again", default=False)


def search_query(view: Any) -> str | None:
    """The text of the view's last ``sort_by_similarity`` stage with a text query."""
    for stage in reversed(getattr(view, "_stages", [])):
        if isinstance(stage, fos.SortBySimilarity) and isinstance(stage.query, str):
            return stage.query
    return None


def query_words(query: str, limit: int) -> list[str]:
    return list(dict.fromkeys(WORD.findall(query)))[:limit]


class ExplainSelectedSamples(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="explain_selected_samples",
            label="Explain selected samples",
            description="Heatmaps and boxes of each caption phrase from the exclip service",
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        inputs.str("caption_field", label="Caption field", default="caption")
        inputs.str("phrases_field", label="Phrases field", description="strings or [start, end] pairs")
        inputs.str("label_field", label="Label field", description="its labels are the phrases")
        _common_inputs(inputs, "exclip")
        return types.Property(inputs, view=types.View(label="Explain selected samples"))

    def execute(self, ctx: Any) -> dict[str, Any]:
        view = ctx.view.select(ctx.selected) if ctx.selected else ctx.view
        summary = explain_samples(
            view,
            **_service(ctx),
            prefix=ctx.params.get("prefix") or "exclip",
            caption_field=ctx.params.get("caption_field") or "caption",
            phrases_field=ctx.params.get("phrases_field") or None,
            label_field=ctx.params.get("label_field") or None,
            progress=_progress(ctx),
            **_model_options(ctx),
        )
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        return _summary(summary)


class ExplainTextSearch(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="explain_text_search",
            label="Explain this text search",
            description="Where each word of the text query lies on each result of the search",
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        inputs.str(
            "query", label="Query", default=search_query(ctx.view) or "", description="the search's text"
        )
        inputs.int("limit", label="Results to explain", default=25, min=1)
        _common_inputs(inputs, "exclip_search")
        return types.Property(inputs, view=types.View(label="Explain this text search"))

    def execute(self, ctx: Any) -> dict[str, Any]:
        query = ctx.params.get("query") or search_query(ctx.view)
        if not query or not query.strip():
            raise ValueError("no text query: run a text similarity search first, or give the query")
        options = _model_options(ctx)
        words = query_words(query, options.get("max_phrases", DEFAULT_MAX_PHRASES))
        view = ctx.view.limit(int(ctx.params.get("limit") or 25))
        summary = explain_samples(
            view,
            **_service(ctx),
            prefix=ctx.params.get("prefix") or "exclip_search",
            caption=query,
            phrases=words or None,
            progress=_progress(ctx),
            **options,
        )
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        return _summary(summary) | {"query": query, "words": words}


class GroundingReport(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="grounding_report",
            label="Grounding report",
            description="Pointing and energy of the heatmaps and evaluate_detections of their boxes",
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        inputs.str("prefix", label="Field prefix of the explanation", default="exclip")
        inputs.str("gt_field", label="Ground-truth detections", default="ground_truth")
        inputs.str("eval_key", label="Evaluation key", description="default: PREFIX_eval")
        return types.Property(inputs, view=types.View(label="Grounding report"))

    def execute(self, ctx: Any) -> dict[str, Any]:
        prefix = ctx.params.get("prefix") or "exclip"
        report = grounding_report(
            ctx.view,
            prefix=prefix,
            gt_field=ctx.params.get("gt_field") or "ground_truth",
            eval_key=ctx.params.get("eval_key") or f"{prefix}_eval",
        )
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        return report


def register(plugin: Any) -> None:
    plugin.register(ExplainSelectedSamples)
    plugin.register(ExplainTextSearch)
    plugin.register(GroundingReport)
