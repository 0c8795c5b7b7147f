"""The App plugin's operators run headless through ``fiftyone.operators.execute_operator``, loaded from
the repository's plugin directory (``FIFTYONE_PLUGINS_DIR``), against real FiftyOne and MongoDB and the
embedded service with the demo model. One driver process for the module.
"""

from __future__ import annotations

from typing import Any

import pytest

from testing.fiftyone_env import FiftyOne

pytestmark = pytest.mark.slow

PLUGIN = "@exclip/explain"
N_SCENES, SEED = 4, 7_200_007
QUERY = "a blue circle"


@pytest.fixture(scope="module")
def answers(fiftyone: FiftyOne, service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    images = str(tmp_path_factory.mktemp("plugin"))
    explain = {"url": service.url, "prefix": "op", "phrases_field": "phrases", "concurrency": 2}
    search = {"url": service.url, "query": QUERY}

    def run(name: str, params: dict[str, Any], **view: Any) -> list[Any]:
        return ["operator", {"name": "plugin", "uri": f"{PLUGIN}/{name}", "params": params, **view}]

    names = ["build", "selected", "dump_selected", "all", "report", "search", "query", "dump"]
    steps = [
        ["build", {"name": "plugin", "directory": images, "n": N_SCENES, "seed": SEED}],
        run("explain_selected_samples", explain, select=2),
        ["dump", {"name": "plugin", "prefix": "op"}],
        run("explain_selected_samples", explain),
        run("grounding_report", {"prefix": "op", "gt_field": "ground_truth"}),
        run("explain_text_search", search, limit=3),
        ["search_query", {"query": QUERY}],
        ["dump", {"name": "plugin", "prefix": "exclip_search"}],
    ]
    return dict(zip(names, fiftyone.run("steps", steps=steps), strict=True))


def test_explain_selected_samples_explains_only_the_selection(answers):
    selected = answers["selected"]
    assert selected["error"] is None and selected["result"]["explained"] == 2
    done = {s["id"] for s in answers["dump_selected"]["samples"] if s["phrases"]}
    assert done == set(selected["selected"])


def test_without_a_selection_the_view_is_explained_and_done_samples_are_skipped(answers):
    result = answers["all"]["result"]
    assert (result["explained"], result["skipped"], result["failed"]) == (N_SCENES - 2, 2, 0)


def test_the_grounding_report_scores_the_heatmaps_and_evaluates_the_boxes(answers):
    report = answers["report"]
    assert report["error"] is None, report
    result = answers["report"]["result"]
    assert result["phrases"] >= N_SCENES and result["eval_key"] == "op_eval"
    assert result["pointing"] >= 0.5 and 0 < result["energy"] <= 1  # chance is about 0.07
    counts = result["detections"]
    assert counts["tp"] + counts["fn"] >= result["phrases"] and counts["tp"] + counts["fp"] >= 1


def test_the_text_search_operator_explains_the_query_words_on_each_result(answers):
    search = answers["search"]
    assert search["error"] is None and search["result"]["explained"] == 3
    assert search["result"]["words"] == QUERY.split()
    explained = [s for s in answers["dump"]["samples"] if s["phrases"]]
    assert len(explained) == 3
    for sample in explained:
        assert sample["caption"] == QUERY and [p["text"] for p in sample["phrases"]] == QUERY.split()
        assert all(sample["heatmaps"][i] is not None for i in range(3))


def test_the_text_search_operator_reads_the_query_of_a_similarity_view(answers):
    assert answers["query"] == {"query": QUERY}
