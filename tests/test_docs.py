"""The README and docs/ say what is true: the README stays a short guide, its links resolve, every
test the pages name exists, and the README's snippets for reading the latent shards from another
project run against the suite's own latent shards."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import read_members, split_shards

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Linked before they exist: the GIF `make readme-figures` copies from a demo's reports, and the
# world model's page, written with the world model.
MADE_ELSEWHERE = {ROOT / "docs" / "img" / "rollout.gif", ROOT / "docs" / "world-model.md"}


def test_the_readme_is_a_short_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_in_the_pages_resolves(page):
    text = page.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    missing = [t for t in local if t and (page.parent / t).resolve() not in MADE_ELSEWHERE
               and not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_page_names_exists(page):
    missing = []
    for line in page.read_text().splitlines():
        current = None              # `::name` after `tests/x.py::...` in the same line is in that file
        for match in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", line):
            current = match.group(1) or current
            if match.group(1) and not (ROOT / current).is_file():
                missing.append(current)
            elif match.group(2) and current is None:
                missing.append(f"::{match.group(2)} (no test file named before it)")
            elif match.group(2) and not re.search(rf"^def {match.group(2)}\b", (ROOT / current).read_text(), re.M):
                missing.append(f"{current}::{match.group(2)}")
    assert not missing, f"{page.name} names tests that do not exist: {missing}"


# ------------------------------------------------------------------------------------ the snippets
def snippet(name: str, latent: Path) -> str:
    """The README's code block after `<!-- snippet: NAME ...-->`, reading `latent` instead of shards/latent."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"<!-- snippet: {name}")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    assert 'root = "shards/latent"' in code
    return code.replace('root = "shards/latent"', f"root = {str(latent)!r}")


def last_train_sample(latent: Path) -> dict:
    manifest = json.loads((latent / "manifest.json").read_text())
    entries = split_shards(latent, manifest, "train")[-1:]
    members = read_members(entries, ["json"])
    return json.loads(list(members.values())[-1]["json"])


def test_the_webdataset_snippet_reads_the_suites_latent_shards(latent_dir):
    names: dict = {}
    exec(snippet("webdataset", latent_dir), names)          # noqa: S102 - the README's own code
    assert names["cur"].shape == names["nxt"].shape == (210, 160) and names["cur"].dtype == np.uint8
    assert names["codes"].shape == (7, 5) and names["codes"].dtype == np.uint8
    last = last_train_sample(latent_dir)                    # the loop went through the whole split
    assert (names["meta"]["episode"], names["meta"]["t"]) == (last["episode"], last["t"])
    assert names["meta"]["checkpoint"]["sha256"]


def test_the_datasets_snippet_reads_the_suites_latent_shards(latent_dir, tmp_path, monkeypatch):
    for variable in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets", reason="Hugging Face datasets is not a dependency (pip install datasets)")
    names: dict = {}
    exec(snippet("datasets", latent_dir), names)            # noqa: S102 - the README's own code
    assert names["cur"].size == (160, 210) and names["codes"].shape == (7, 5)
    last = last_train_sample(latent_dir)
    assert (names["meta"]["episode"], names["meta"]["t"]) == (last["episode"], last["t"])
