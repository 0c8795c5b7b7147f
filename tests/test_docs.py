"""The settings tables of docs/contract.md and the README agree with ``service.settings.Settings``.

docs/contract.md's table is generated (scripts/settings_table.py) and must be up to date. The README's
tables are written by hand: every setting must appear in one of them with its environment variable and
its default, and every variable they name must be a real setting.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.settings_table import BEGIN, END, default_text, env_names, markdown_table
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"
README = ROOT / "README.md"
CODE = re.compile(r"`([^`]*)`")


def settings_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``text`` that has an ``environment`` and a ``default`` column."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            if {"environment", "default"} <= set(cells):
                tables.append([])
            continue
        if set(line) <= set("|-: ") or not tables or {"environment", "default"} - set(header):
            continue
        tables[-1].append(dict(zip(header, cells, strict=False)))
    return tables


def documented_defaults(rows: list[dict[str, str]]) -> dict[str, str | None]:
    """Env var -> its documented default (None where the cell says it in words: unset)."""
    found: dict[str, str | None] = {}
    for row in rows:
        names = [n for n in CODE.findall(row["environment"]) if n]
        values = CODE.findall(row["default"])
        for i, name in enumerate(names):
            if not values:
                found[name] = None
            else:
                found[name] = values[i] if len(values) == len(names) else values[0]
    return found


def check_against_settings(rows: list[dict[str, str]]) -> None:
    documented = documented_defaults(rows)
    every_env = {e for n, f in Settings.model_fields.items() for e in env_names(n, f)}
    assert not set(documented) - every_env, "documented variables that are not settings"
    for name, field in Settings.model_fields.items():
        primary = env_names(name, field)[0]
        assert primary in documented, f"{primary} ({name}) is not documented"
        assert documented[primary] == default_text(field), f"{primary}: documented default differs"


def test_contract_table_is_generated_from_settings() -> None:
    text = CONTRACT.read_text(encoding="utf-8")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    stale = "stale: run python scripts/settings_table.py --write docs/contract.md"
    assert block.strip() == markdown_table().strip(), stale


@pytest.mark.parametrize("doc", [CONTRACT, README], ids=["contract", "readme"])
def test_settings_tables_match_settings(doc: Path) -> None:
    tables = settings_tables(doc.read_text(encoding="utf-8"))
    assert tables, f"{doc.name} has no settings table"
    check_against_settings([row for table in tables for row in table])


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert not missing


def test_check_catches_a_wrong_default_and_an_unknown_variable() -> None:
    rows = settings_tables(CONTRACT.read_text(encoding="utf-8"))[0]
    wrong = [dict(r, default="`7`") if "EXCLIP_MAX_BATCH" in r["environment"] else r for r in rows]
    with pytest.raises(AssertionError, match="EXCLIP_MAX_BATCH"):
        check_against_settings(wrong)
    extra = [*rows, {"environment": "`EXCLIP_NO_SUCH_SETTING`", "default": "`1`"}]
    with pytest.raises(AssertionError, match="not settings"):
        check_against_settings(extra)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title, flags=re.ASCII).replace(" ", "-"))
    return anchors


DOCS = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_docs_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)#\s:]*)#([^)\s]+)\)", text):
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {target} does not exist"
        assert anchor in heading_anchors(path.read_text(encoding="utf-8")), f"{doc.name}: {target}#{anchor}"


def test_the_readme_shows_the_label_studio_config_the_tests_use() -> None:
    """The Label Studio tests and bench use ``EXAMPLE_CONFIG``; the README's ```xml block is it."""
    from service.label_studio.config import EXAMPLE_CONFIG

    blocks = re.findall(r"```xml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert EXAMPLE_CONFIG.strip() in [b.strip() for b in blocks]


def _families_table() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    table = (
        text.split("<!-- families table: checked by tests/test_docs.py -->", 1)[1].strip().split("\n\n")[0]
    )
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


# The tiny random models of testing.families that stand for each explained family of the README.
FAMILY_STAND_INS = {
    "CLIP ViTs": "clip",
    "SigLIP": "siglip",
    "SigLIP 2": "siglip2",
    "CLIPA": "clipa",
    "MetaCLIP 2 worldwide": "metaclip2",
}


def test_the_readme_families_table_says_what_the_code_does() -> None:
    """Every example is an open_clip architecture, explained or refused as the row says; an explained
    family's extra rows and columns are those its tiny stand-in's result carries."""
    import open_clip
    import torch

    from attribution.explainer import Explainer
    from attribution.models import unsupported_reason
    from testing.families import build_family

    rows = _families_table()
    assert len(rows) >= 8
    for family, examples, explained, extras, _cost in rows:
        for arch in re.findall(r"`([^`]+)`", examples):
            reason = unsupported_reason(open_clip.get_model_config(arch))
            assert (reason is None) == (explained == "yes"), (family, arch, reason)
        if explained != "yes":
            continue
        stand_in = next(v for k, v in FAMILY_STAND_INS.items() if family.split(" (")[0] == k)
        model, tokenizer = build_family(stand_in)
        [result] = Explainer(model, tokenizer, steps=1).explain(torch.zeros(1, 3, 32, 32), ["a red car"])
        said = {name for kind, name in re.findall(r"(column|row) `(\w+)`", extras)}
        assert said == set(result.extra_columns) | set(result.extra_rows), family
        columns = {name for kind, name in re.findall(r"(column|row) `(\w+)`", extras) if kind == "column"}
        assert columns == set(result.extra_columns), family
