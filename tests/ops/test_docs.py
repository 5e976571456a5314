"""The docs stay true: the README stays short, every relative link and anchor in README.md
and docs/*.md leads somewhere, docs/operations.md's configuration table names exactly the
variables the service reads, and the README's API examples, pasted into bash against a
real server, answer with the JSON the README shows."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coupon.domain.codes import is_well_formed
from harness.server import ServerProcess, clean_environment

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
# Where the service, its operators' command line and the load tool read the environment.
ENVIRONMENT_READERS = (
    ROOT / "src/coupon/entrypoints/settings.py",
    ROOT / "src/coupon/entrypoints/operator_cli.py",
    ROOT / "loadtest/src/coupon_loadtest/cli.py",
)
LOADTEST = DOCS / "loadtest.md"
README_MAX_LINES = 250
README_URL = "http://127.0.0.1:8000"


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# --- reading Markdown -------------------------------------------------------------------

FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block, in order."""
    blocks: list[tuple[str, str]] = []
    fence = ""
    info = ""
    body: list[str] = []
    for line in text.splitlines():
        match = FENCE.match(line)
        if not fence:
            if match:
                fence, info, body = match.group(1), match.group(2).strip(), []
        elif closes(fence, line):
            blocks.append((info, "\n".join(body) + "\n"))
            fence = ""
        else:
            body.append(line)
    assert not fence, "a code block is never closed"
    return blocks


def closes(fence: str, line: str) -> bool:
    """Whether `line` ends a block opened by `fence`: the same character, as many or more."""
    return re.fullmatch(re.escape(fence[0]) + f"{{{len(fence)},}}", line.strip()) is not None


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks: only they hold links and headings."""
    fence = ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if not fence:
            if match:
                fence = match.group(1)
            else:
                yield line
        elif closes(fence, line):
            fence = ""


INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)")
CODE_SPAN = re.compile(r"`+([^`]*)`+")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and code spans as their text),
    lower case, without punctuation, spaces as hyphens."""
    text = INLINE_LINK.sub(lambda m: m.group(1), heading)
    text = CODE_SPAN.sub(lambda m: m.group(1), text)
    text = re.sub(r"[*_]{1,3}([^*_]+)[*_]{1,3}", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


LINK_TARGET = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def link_targets(text: str) -> list[str]:
    targets = []
    for line in prose_lines(text):
        targets += LINK_TARGET.findall(CODE_SPAN.sub("", line))
    return targets


def broken_links(document: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of `document` that leads nowhere: a missing file, a file outside
    `root` (the repository), or an anchor its target does not have."""
    broken = []
    for target in link_targets(document.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto: - not ours to check
        path, _, fragment = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.is_relative_to(root):
            broken.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            broken.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(root)}")
    return broken


def section(text: str, heading: str) -> str:
    """From `heading` (a whole line) to the next heading of the same level."""
    level = heading.split(" ", maxsplit=1)[0]
    lines = text.splitlines()
    start = lines.index(heading)
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith(level + " ")),
        len(lines),
    )
    return "\n".join(lines[start:end]) + "\n"


# --- the reader itself --------------------------------------------------------------------


def test_slugs_are_githubs() -> None:
    assert slug("Using the API") == "using-the-api"
    assert slug("`just bench` — commit 6ee9062, 2026-11-25 01:39 UTC ([run](runs/x.json))") == (
        "just-bench--commit-6ee9062-2026-11-25-0139-utc-run"
    )
    assert slug("Herds: the flash crowd") == "herds-the-flash-crowd"
    assert anchors("# A\n\n## A\n\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Its part\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Page\n\n[ok](#page) [gone](#nowhere) [file](missing.md) [web](https://x.example)\n"
        "[there](docs/other.md#its-part) [not there](docs/other.md#a-part) [out](../x.md)\n"
        "`[not a link](nowhere.md)`\n\n```\n[in code](nowhere.md)\n```\n"
    )
    (tmp_path.parent / "x.md").touch()
    assert broken_links(page, root=tmp_path) == [
        "#nowhere: no heading #nowhere in README.md",
        "missing.md: no such file",
        "docs/other.md#a-part: no heading #a-part in docs/other.md",
        "../x.md: outside the repository",
    ]


# --- the documents ------------------------------------------------------------------------


def test_the_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(document: Path) -> None:
    assert broken_links(document) == []


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_points_outside_the_project(document: Path) -> None:
    """A path that climbs out of its document's folder must land on something in the
    repository, and no path names the folder the checkout happens to sit in: a reader has
    the project alone."""
    text = document.read_text()
    outside = [
        path
        for path in re.findall(r"(?:\.\./)+[\w.-]+", text)
        if not (target := (document.parent / path).resolve()).is_relative_to(ROOT)
        or not target.exists()
    ]
    assert outside == []
    assert f"{ROOT.parent}/" not in text


def variables_read() -> set[str]:
    """Every environment variable name the service's settings and the operators' command
    line read: the first argument of `<mapping>.get("NAME", ...)`, the second of
    `_int(env, "NAME", ...)` / `_float(env, "NAME", ...)`."""
    names: set[str] = set()
    for path in ENVIRONMENT_READERS:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            candidates: list[ast.expr] = []
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
                candidates.append(node.args[0])
            if isinstance(node.func, ast.Name) and node.func.id in ("_int", "_float"):
                candidates.append(node.args[1])
            for arg in candidates:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and re.fullmatch(r"[A-Z][A-Z0-9_]+", arg.value)
                ):
                    names.add(arg.value)
    return names


def configuration_table() -> set[str]:
    rows = section(OPERATIONS.read_text(), "## Configuration").splitlines()
    return {m.group(1) for row in rows if (m := re.match(r"^\| `([A-Z][A-Z0-9_]+)` \|", row))}


def test_the_configuration_table_names_every_variable_read_and_no_other() -> None:
    read = variables_read()
    # The reader finds what it must: the Go service's names, ours, and the CLI's URL.
    assert {"APP_ENV", "DATABASE_URL", "COUPON_CORS_ORIGINS", "COUPON_URL"} <= read
    assert len(read) >= 25
    documented = configuration_table()
    assert sorted(read - documented) == [], "read but not in docs/operations.md"
    assert sorted(documented - read) == [], "in docs/operations.md but read by nothing"


def test_the_load_tools_options_are_its_help() -> None:
    """docs/loadtest.md quotes `coupon loadtest --help` whole, as it prints it on a terminal
    80 columns wide."""
    options = section(LOADTEST.read_text(), "## Options")
    quoted = [body for info, body in fenced_blocks(options) if body.startswith("usage: ")]
    env = clean_environment() | {"COLUMNS": "80"}
    printed = subprocess.run(
        [sys.executable, "-m", "coupon", "loadtest", "--help"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert quoted == [printed]


# --- the README's API examples, run -------------------------------------------------------

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


def kind(value: str) -> str | None:
    """What a value that differs from run to run is (None: a value that must not differ)."""
    if UUID.match(value):
        return "uuid"
    if TIMESTAMP.match(value):
        return "timestamp"
    if is_well_formed(value):
        return "coupon code"
    return None


def json_documents(text: str) -> list[Any]:
    """The JSON values in `text`, one after the other (curl prints no newline after each)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


def same_shape(expected: Any, actual: Any, where: str = "$") -> list[str]:
    """Where `actual` differs from `expected` in its keys, its lengths, or a value that does
    not vary (ids, times and coupon codes may; "…" in the README stands for anything)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        if set(expected) != set(actual):
            return [f"{where}: keys {sorted(actual)}, the README shows {sorted(expected)}"]
        return [
            d for key in expected for d in same_shape(expected[key], actual[key], f"{where}.{key}")
        ]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: expected {len(expected)} items, got {actual!r}"]
        return [
            d
            for i, pair in enumerate(zip(expected, actual, strict=True))
            for d in same_shape(*pair, f"{where}[{i}]")
        ]
    if isinstance(expected, str) and isinstance(actual, str):
        if "…" in expected:
            return []
        varies = kind(expected)
        if varies is not None:
            return [] if kind(actual) == varies else [f"{where}: {actual!r} is not a {varies}"]
    if expected != actual or type(expected) is not type(actual):
        return [f"{where}: {actual!r}, the README shows {expected!r}"]
    return []


def test_the_shape_check_can_fail() -> None:
    shown = {"coupon": {"code": "너하므자후노로버거르", "issuedAt": "2026-12-03T09:00:18.342895Z"}}
    assert (
        same_shape(
            shown, {"coupon": {"code": "소도루7다커9거무0", "issuedAt": "2027-01-01T00:00:00Z"}}
        )
        == []
    )
    assert same_shape(shown, {"coupon": {"code": "x", "issuedAt": "2027-01-01T00:00:00Z"}})
    assert same_shape(shown, {"coupon": {"code": "소도루7다커9거무0"}})
    assert same_shape({"alreadyIssued": True}, {"alreadyIssued": False})
    assert same_shape({"code": "invalid_argument"}, {"code": "not_found"})


def api_examples() -> list[tuple[str, list[Any]]]:
    """Each ```sh block of the README's "Using the API", with the JSON documents of the
    ```json block that follows it."""
    blocks = fenced_blocks(section(README.read_text(), "## Using the API"))
    examples: list[tuple[str, list[Any]]] = []
    for (info, body), following in zip(blocks, [*blocks[1:], ("", "")], strict=True):
        if info == "sh":
            assert following[0] == "json", f"no ```json output after the example:\n{body}"
            examples.append((body, json_documents(following[1])))
    return examples


@pytest.mark.e2e
def test_the_readme_api_examples_answer_as_shown(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    examples = api_examples()
    # Create, issue twice, a page, an error, the admin token: a section that lost its
    # examples must not pass by running nothing.
    assert len(examples) >= 5
    with ServerProcess(env=server_env) as server:
        marker = "@@@ example "
        script = ["set -eo pipefail"]
        for number, (body, _) in enumerate(examples):
            script += [f"printf '\\n{marker}{number}\\n'", body.replace(README_URL, server.url)]
        # The shell a reader pastes into: no admin token, none of the service's settings.
        run = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            check=False,
            cwd=tmp_path,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
    outputs = run.stdout.split(marker)[1:]
    assert len(outputs) == len(examples), run.stdout
    for number, ((body, shown), output) in enumerate(zip(examples, outputs, strict=True)):
        answers = json_documents(output.partition("\n")[2])
        assert len(answers) == len(shown), f"example {number}:\n{body}\nanswered:\n{output}"
        for expected, actual in zip(shown, answers, strict=True):
            assert same_shape(expected, actual) == [], f"example {number}:\n{body}"
