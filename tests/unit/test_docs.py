"""The docs site: it builds with ``mkdocs build --strict``, its configuration reference is the schema's,
and the architecture picture is drawn from its committed source."""

import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from rdml_dist.config import ExperimentConfig

REPOSITORY = Path(__file__).resolve().parents[2]
DOCS = REPOSITORY / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load("gen_config_reference")


def _mkdocs_build(config_file: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file), "-d", str(site)],
                          cwd=config_file.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def _copy_of_the_docs(tmp_path: Path) -> Path:
    """mkdocs.yml and docs/ copied, every other top-level entry linked, so a page can be spoiled."""
    root = tmp_path / "repository"
    root.mkdir()
    for entry in REPOSITORY.iterdir():
        if entry.name in ("docs", "mkdocs.yml"):
            continue
        (root / entry.name).symlink_to(entry)
    shutil.copy(REPOSITORY / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(DOCS, root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_site_builds_with_strict_checks(tmp_path):
    result = _mkdocs_build(REPOSITORY / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "runtime.exchange.transport" in reference and "students[].resources.gpus" in reference
    landing = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "site" / "index.html").read_text()))
    assert "pip install torch==2.14.1 torchvision==0.29.1 -e" in landing, "README's set-up commands are not on the home page"


def _spoil_the_reference(docs: Path) -> None:
    page = docs / "configuration.md"
    page.write_text(page.read_text().replace("`mimicry.alpha`", "`mimicry.alpha2`", 1))


def _break_a_link_and_an_anchor(docs: Path) -> None:
    page = docs / "index.md"
    page.write_text(page.read_text() + "\n[gone](missing.md) and [moved](configuration.md#no-such-heading)\n")


@pytest.mark.parametrize("spoil, complaints", [
    (_spoil_the_reference, ["differs from the config schema"]),
    (_break_a_link_and_an_anchor, ["'missing.md'", "'#no-such-heading'"]),
], ids=["stale configuration page", "broken link and anchor"])
def test_a_stale_reference_or_a_broken_link_fails_the_build(tmp_path, spoil, complaints):
    root = _copy_of_the_docs(tmp_path)
    spoil(root / "docs")
    result = _mkdocs_build(root / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    for complaint in complaints:
        assert complaint in result.stdout + result.stderr


def test_the_configuration_page_is_what_the_schema_generates():
    page = generator.PAGE.read_text()
    fresh = generator.with_fresh_reference(page, generator.render(ExperimentConfig))
    assert page == fresh, "docs/configuration.md is stale: run python docs/gen_config_reference.py"


class _Inner(BaseModel):
    """How the inner part works.

    More words that stay out of the page."""

    size: int = Field(3, ge=1, lt=10, description="how many")
    kind: Literal["a", "b"] = Field("a", description="which kind")


class _Outer(BaseModel):
    """The whole thing."""

    name: str = Field(description="its name")
    inner: _Inner = Field(default_factory=_Inner)
    extra: _Inner | None = Field(None, description="an optional second inner part")
    items: list[_Inner] = Field(min_length=1, description="the parts")
    weights: dict[str, float] = Field(default_factory=dict, description="per part")


def test_the_reference_walks_nested_models_with_type_default_and_description():
    assert generator.render(_Outer).splitlines() == [
        "## Top level", "",
        "The whole thing.", "",
        "| field | type | default | description |", "|---|---|---|---|",
        "| `name` | string | required | its name |",
        "| `extra` | mapping (`extra` below) or null | `null` | an optional second inner part |",
        "| `items` | list of mappings (`items[]` below), at least 1 item | required | the parts |",
        "| `weights` | mapping | `{}` | per part |",
        "",
        "## `inner`", "",
        "How the inner part works.", "",
        "| field | type | default | description |", "|---|---|---|---|",
        "| `inner.size` | int, ≥ 1, < 10 | `3` | how many |",
        "| `inner.kind` | one of `a`, `b` | `a` | which kind |",
        "",
        "## `extra`", "",
        "An optional second inner part.", "",
        "| field | type | default | description |", "|---|---|---|---|",
        "| `extra.size` | int, ≥ 1, < 10 | `3` | how many |",
        "| `extra.kind` | one of `a`, `b` | `a` | which kind |",
        "",
        "## `items[]`", "",
        "The parts.", "",
        "| field | type | default | description |", "|---|---|---|---|",
        "| `items[].size` | int, ≥ 1, < 10 | `3` | how many |",
        "| `items[].kind` | one of `a`, `b` | `a` | which kind |",
    ]


def test_the_architecture_picture_is_drawn_from_its_source_and_shown(tmp_path):
    committed = Image.open(DOCS / "architecture.png").convert("L")
    _load("architecture").draw(tmp_path / "architecture.png")
    drawn = Image.open(tmp_path / "architecture.png").convert("L")
    assert drawn.size == committed.size
    differing = np.mean(np.abs(np.asarray(drawn, dtype=np.int16) - np.asarray(committed, dtype=np.int16)) > 32)
    assert differing < 0.01, f"{differing:.1%} of the pixels differ: run python docs/architecture.py"
    assert "](architecture.png)" in (DOCS / "index.md").read_text()
    assert "](docs/architecture.png)" in (REPOSITORY / "README.md").read_text()
