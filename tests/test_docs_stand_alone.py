"""The repository stands alone: every document the code and docs cite is inside it.

A reader of a fresh clone has this repository and nothing else, so text must not point at documents
that lived beside it during development (a shared docs folder, its method/platform/architecture
notes) nor at tracker issue numbers. Project documents are cited as ``docs/<name>.md`` (with
``§N`` for numbered sections), and those must exist (docs/design.md §11).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
SCANNED_DIRS = ("src", "tests", "configs", "scripts", "benchmarks", "docs")
SCANNED_ROOT_FILES = ("README.md", "NOTICE", "Makefile", "pyproject.toml", "constraints.txt")

# Files exempt from the scan; the list must only ever shrink (it is empty: everything is checked).
ALLOWED: set[str] = set()

# "issue 3" is this project's own tracker, which a clone does not have. A public issue of another
# project, named with its repository ("geneval #8"), is a citation a reader can follow.
FORBIDDEN = re.compile(
    r"\.\./shared|shared/docs|shared docs/|method\.md|platform\.md|architecture\.md"
    r"|\bissues? \d",
    re.IGNORECASE)
DOC_CITE = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)")
SECTION_CITE = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md),?\s*§\s*(\d+)")
MD_LINK = re.compile(r"\]\(([A-Za-z0-9_./-]+\.md)(?:#[^)]*)?\)")


def _tracked_files() -> list[Path]:
    """Tracked files under the scanned paths (a plain walk when git is not available)."""
    targets = [*SCANNED_DIRS, *SCANNED_ROOT_FILES]
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *targets], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for d in SCANNED_DIRS for p in (ROOT / d).rglob("*") if p.is_file()]
        paths += [ROOT / f for f in SCANNED_ROOT_FILES]
    return sorted(p for p in paths if p.is_file() and "__pycache__" not in p.parts)


def _text_files() -> dict[str, str]:
    """{repo-relative path: text} of every scanned file that is text (binary files are skipped)."""
    texts = {}
    for path in _tracked_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            texts[path.relative_to(ROOT).as_posix()] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def test_the_allow_list_names_real_files_only() -> None:
    # A stale entry would hide nothing, but it would also never be noticed and removed.
    for rel in ALLOWED:
        assert (ROOT / rel).is_file(), f"{rel} is allow-listed but does not exist; drop it"


def test_nothing_cites_documents_outside_the_repository() -> None:
    texts = _text_files()
    assert "README.md" in texts and any(p.startswith("src/") for p in texts)  # the scan ran
    bad = []
    for rel, text in texts.items():
        if rel in ALLOWED or ROOT / rel == THIS:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            m = FORBIDDEN.search(line)
            if m:
                bad.append(f"{rel}:{n}: {m.group(0)!r} in: {line.strip()}")
    assert not bad, ("cite the project's own docs (docs/<name>.md) instead of outside documents "
                     "or issue numbers:\n" + "\n".join(bad))


def test_every_cited_project_document_exists() -> None:
    texts = _text_files()
    missing = []
    for rel, text in texts.items():
        for m in DOC_CITE.finditer(text):
            if not (ROOT / "docs" / m.group(1)).is_file():
                missing.append(f"{rel}: docs/{m.group(1)}")
        if rel.endswith(".md"):  # relative markdown links, e.g. [rewards](rewards.md#geneval)
            for m in MD_LINK.finditer(text):
                target = m.group(1)
                if "://" in target:
                    continue
                if not ((ROOT / rel).parent / target).resolve().is_file():
                    missing.append(f"{rel}: link to {target}")
    assert not missing, "cited documents that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_cited_numbered_sections_exist() -> None:
    texts = _text_files()
    missing = []
    for rel, text in texts.items():
        for m in SECTION_CITE.finditer(text):
            doc, section = ROOT / "docs" / m.group(1), m.group(2)
            if not doc.is_file():
                continue  # reported by test_every_cited_project_document_exists
            heading = re.compile(rf"^#+\s+{section}\.\s", re.MULTILINE)
            if not heading.search(doc.read_text(encoding="utf-8")):
                missing.append(f"{rel}: docs/{m.group(1)} §{section}")
    assert not missing, ("cited sections with no '## N. ...' heading:\n"
                         + "\n".join(sorted(set(missing))))
