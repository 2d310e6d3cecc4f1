"""Every ```python block in README.md and docs/*.md runs as written; every shell command names what exists.

Blocks run one by one, each in a fresh namespace (blocks of one page do not share state),
from the repository root. A block preceded on the line right above its fence by
``<!-- skip-test -->`` is collected but skipped (it needs optional data, e.g. the MNIST digits).
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
        assert name == "CHANGELOG.md" or python_blocks(page), f"{name} has no ```python example"
    for page in (ROOT / "docs").glob("*.md"):
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links {target}, which does not exist"


# ------------------------------------------------------------------------------------------ shell commands
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE_COMMAND = re.compile(r"`((?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?python (?:-m )?[\w./-]+[^`]*)`")
REPO_DIRS = ("benchmarks/", "studies/", "examples/", "recipes/", "tests/")  # a script elsewhere is the reader's own


def shell_commands(page: Path) -> list[str]:
    """Every command of ``page``'s shell fences (continuation lines joined, comments dropped) and every inline
    code span that starts with ``python``."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for match in SHELL_FENCE.finditer(text):
        for line in match.group(1).replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(line)
    commands += [m.group(1) for m in INLINE_COMMAND.finditer(text)]
    return commands


def _help_text(target: str, module: bool) -> str:
    """The ``--help`` output of a script or ``-m`` module, run in this process (argparse exits before any work)."""
    import contextlib
    import io
    import runpy
    import sys

    out, argv = io.StringIO(), sys.argv
    sys.argv = [target, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(ROOT / target), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def check_command(command: str) -> None:
    """Raise AssertionError if ``command`` names a repository script, module, make target or flag that does not exist."""
    import shlex

    words = shlex.split(command, posix=True)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment settings
        words.pop(0)
    if not words:
        return
    head, rest = words[0], words[1:]
    if head == "make":
        missing = [w for w in rest if not w.startswith("-") and w not in MAKE_TARGETS]
        assert not missing, f"{command!r}: the Makefile has no target {missing}"
        return
    if head == "bash" and rest and rest[0].startswith(REPO_DIRS):
        assert (ROOT / rest[0]).is_file(), f"{command!r}: {rest[0]} does not exist"
        return
    if not (head.endswith("python") or head == "torchrun"):
        return  # pip, cp, mkdir: nothing of ours to check
    if "-m" in rest:
        target, flags, module = rest[rest.index("-m") + 1], rest[rest.index("-m") + 2:], True
        if not target.startswith(("recipes", "studies", "benchmarks", "examples", "chunkformer")):
            return
        path = ROOT / (target.replace(".", "/") + ".py")
        assert path.is_file() or (ROOT / target.replace(".", "/") / "__main__.py").is_file(), f"{command!r}: no module {target}"
    else:
        if not rest or not rest[0].startswith(REPO_DIRS):
            return
        target, flags, module = rest[0], rest[1:], False
        path = ROOT / target
        assert path.is_file(), f"{command!r}: {target} does not exist"
    flags = [f.split("=", 1)[0] for f in flags if f.startswith("--")]
    if not flags:
        return
    assert "argparse" in path.read_text(), f"{command!r}: {target} takes no flags"
    help_text = _help_text(target, module)
    unknown = [f for f in flags if not re.search(re.escape(f) + r"\b", help_text)]
    assert not unknown, f"{command!r}: {target} has no flag {unknown}"


def command_cases():
    for page in PAGES + [ROOT / "benchmarks" / "README.md"]:
        for i, command in enumerate(shell_commands(page)):
            yield pytest.param(command, id=f"{page.name}-{i}")


@pytest.mark.parametrize("command", list(command_cases()))
def test_shell_command_names_what_exists(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    check_command(command)


@pytest.mark.parametrize("command", ["python benchmarks/step_speed.py --no-such-flag",
                                     "python benchmarks/no_such_script.py", "python -m recipes.nowhere",
                                     "make no-such-target", "python -m recipes.train --no-such-flag"])
def test_command_check_catches_a_wrong_command(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(AssertionError):
        check_command(command)


def test_generated_regions_are_up_to_date():
    """Every number of docs/performance.md (and the README's speed bullets) comes from benchmarks/results/
    through benchmarks/report.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_docs_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    results = report.load()
    for page in report.PAGES:
        text = page.read_text()
        assert report.fill(text, results) == text, f"{page.name}: run python benchmarks/report.py --write-docs"


def test_performance_page_is_short():
    assert len((ROOT / "docs" / "performance.md").read_text().splitlines()) <= 150


def test_the_docs_speak_of_the_project_only():
    """No development history in the documentation: that lives in git and CHANGELOG.md."""
    pattern = re.compile(r"\b(session|sitting)s?\b|\bissue \d+", re.IGNORECASE)
    for page in PAGES + [ROOT / "benchmarks" / "README.md"]:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{page.name}:{n}: {line.strip()[:100]}"


def test_results_prose_types_no_numbers():
    """docs/results.md's hand-written conclusions quote no measured number: those live in its generated tables."""
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    prose = text[text.index("## What we conclude"):]
    prose = re.sub(r"^```.*?^```", "", prose, flags=re.DOTALL | re.MULTILINE)  # code blocks
    prose = re.sub(r"`[^`]*`", "", prose)  # inline code: settings and file names
    typed = re.findall(r"\d+\.\d+|\d+(?:\.\d+)?\s*%|\d+(?:\.\d+)?x\b|\b\d{3,}\b", prose)
    assert not typed, f"numbers typed by hand in docs/results.md's conclusions: {typed[:10]}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_every_link_to_a_section_finds_its_heading():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)#([\w-]+)\)", page.read_text(encoding="utf-8")):
            linked = page.parent / target
            assert anchor in _anchors(linked), f"{page.name} links {target}#{anchor}, which has no such heading"
