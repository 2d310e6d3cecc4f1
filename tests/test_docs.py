"""Every ```python block in README.md and docs/*.md runs as written.

Blocks run one by one, each in a fresh namespace (blocks of one page do not share state),
from the repository root. A block preceded on the line right above its fence by
``<!-- skip-test -->`` is collected but skipped (it needs optional data, e.g. the MNIST digits).
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "<!-- skip-test -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(((?:docs/)?[\w.-]+\.md)\)")


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(index, code, skipped)`` for every python fence of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for i, match in enumerate(FENCE.finditer(text)):
        line_above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((i, match.group(1), line_above == SKIP_MARK))
    return blocks


def cases():
    for page in PAGES:
        for i, code, skipped in python_blocks(page):
            marks = [pytest.mark.skip(reason=f"{SKIP_MARK}: needs optional data")] if skipped else []
            yield pytest.param(page, code, id=f"{page.name}-{i}", marks=marks)


@pytest.mark.parametrize("page, code", list(cases()))
def test_python_block_runs(page, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    # blocks that start a fresh interpreter must find the package too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"{page.name}[python block]", "exec"), namespace)


def test_every_documented_page_exists_and_has_examples():
    linked = set(LINK.findall((ROOT / "README.md").read_text(encoding="utf-8")))
    assert linked, "README.md links no docs pages"
    for name in linked:
        page = ROOT / name
        assert page.is_file(), f"README.md links {name}, which does not exist"
        assert python_blocks(page), f"{name} has no ```python example"
    for page in (ROOT / "docs").glob("*.md"):
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links {target}, which does not exist"
