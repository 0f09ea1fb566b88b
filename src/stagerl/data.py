"""Prompt sources: the procedural shapes world, or prompt files (txt, jsonl/json, csv), by path or
by the name of a shipped prompt set (``geneval``, ``t2i-r1``, ...; see :mod:`stagerl.benchmarks`).

A source is indexed by *position* (prompts consumed so far), so the prompts of any training step are
a pure function of (seed, step): resuming needs no iterator state, and every process draws its own
disjoint slice of the same global batch.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagerl.errors import UserError


@dataclass
class PromptItem:
    prompt: str
    metadata: dict[str, Any]  # GenEval schema where known, else {"prompt": prompt}


# --------------------------------------------------------------------------------------------------
# Shapes suites and the evaluation seed: defined below config.py and eval.py, which both read them

SHAPES_SUITES = ("test", "compositions", "phrasings")
# `heldout` is the name used in configs for the in-distribution held-out suite.
SUITE_ALIASES = {"heldout": "test", "indist": "test"}
# The seed of evaluation prompts and sampling; config field log.eval_seed takes its default from
# here, so that every caller evaluates the same images unless told otherwise.
EVAL_SEED = 1234


def suite_names() -> tuple[str, ...]:
    """Every name ``--suite`` / ``log.eval_suite`` accepts: the documented suites first, then the
    aliases and the training split."""
    return ("heldout", "compositions", "phrasings", "test", "indist", "train")


def check_suite(suite: str, what: str = "--suite") -> str:
    """The shapes split of a suite name; a UserError listing the suites for any other name."""
    if suite not in suite_names():
        raise UserError(f"{what}: unknown shapes suite {suite!r}; choose from heldout (= test), "
                        f"compositions, phrasings (or train)")
    return SUITE_ALIASES.get(suite, suite)


class PromptSource:
    """Abstract: ``batch(position, n) -> n PromptItems`` starting at global ``position``."""

    def batch(self, position: int, n: int) -> list[PromptItem]:
        raise NotImplementedError


class ShapesSource(PromptSource):
    """Fresh procedural prompts from the shapes world.

    Positions are grouped in blocks of ``block`` prompts, each generated with its own seed: the
    generator cycles through the categories, so a block (a multiple of the six GenEval tags) is
    balanced, and prompt ``p`` depends only on (seed, p), never on the batch size.
    """

    def __init__(self, split: str, seed: int, spec: Any = None, block: int = 60):
        from stagerl.worlds.shapes.prompts import SPLITS
        from stagerl.worlds.shapes.spec import WorldSpec

        if split not in SPLITS:
            raise UserError(f"data.source: unknown shapes split {split!r}; choose from "
                            f"{', '.join(SPLITS)}")
        self.split, self.seed, self.spec, self.block = split, seed, spec or WorldSpec(), block
        self._cache: dict[int, list[PromptItem]] = {}

    def _block(self, b: int) -> list[PromptItem]:
        from stagerl.worlds.shapes.prompts import generate

        if b not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            exs = generate(self.block, seed=mix_seed(self.seed, b), spec=self.spec,
                           split=self.split)
            # shuffle within the block so consecutive prompts are not in category order
            rng = random.Random(mix_seed(self.seed + 1, b))
            order = rng.sample(range(self.block), self.block)
            self._cache[b] = [PromptItem(exs[k].prompt, exs[k].metadata) for k in order]
        return self._cache[b]

    def batch(self, position: int, n: int) -> list[PromptItem]:
        return [self._block(p // self.block)[p % self.block] for p in range(position, position + n)]


class FileSource(PromptSource):
    """A finite prompt list, reshuffled every epoch with a seeded permutation."""

    def __init__(self, items: list[PromptItem], seed: int, shuffle: bool = True):
        if not items:
            raise UserError("prompt file holds no prompts")
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        # one shuffle per epoch, not per prompt (prompt files can hold thousands of lines)
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(mix_seed(self.seed, epoch)).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def batch(self, position: int, n: int) -> list[PromptItem]:
        size = len(self.items)
        return [self.items[self._order(p // size)[p % size]] for p in range(position, position + n)]


def mix_seed(seed: int, k: int) -> int:
    """A deterministic 63-bit mix of (seed, k) (splitmix64-style constants)."""
    x = (seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


# --------------------------------------------------------------------------------------------------
# Prompt files


PROMPT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


def load_prompt_file(path: str | Path) -> list[PromptItem]:
    """Read .txt (one prompt a line), .jsonl / .json (objects with a "prompt" field, one a line,
    or a .json array of them; every field is kept in the metadata: GenEval's tag/include/exclude,
    T2I-R1's nouns/attr_nouns/spatial_info/numeracy_info/task_type) or .csv (a "prompt"/"Prompts"
    column; DrawBench). Malformed input raises a one-line UserError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {path}")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith("[")):
        return _read_jsonl(text, str(path))  # T2I-R1 ships JSON Lines under a .json name
    if suffix == ".json":
        return _read_json_array(text, str(path))
    if suffix == ".csv":
        return _read_csv(text, str(path))
    return [PromptItem(line.strip(), {"prompt": line.strip()})
            for line in text.splitlines() if line.strip()]


def load_prompts(path: str | Path) -> list[PromptItem]:
    """A prompt file, or every prompt file of a folder (.txt/.jsonl/.json/.csv, name order)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in PROMPT_SUFFIXES)
        if not files:
            raise UserError(f"prompt folder {path} holds no {'/'.join(PROMPT_SUFFIXES)} files")
        return [it for f in files for it in load_prompt_file(f)]
    return load_prompt_file(p)


def _prompt_item(obj: Any, where: str) -> PromptItem:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise UserError(f"{where}: expected an object with a string 'prompt' field")
    return PromptItem(obj["prompt"], obj)


#: The fields every line of a GenEval-style prompt file carries (the detector reward and the
#: per-tag summary read them).
GENEVAL_KEYS = ("tag", "include")


def _check_geneval_lines(items: list[PromptItem], wheres: list[str]) -> list[PromptItem]:
    """A file in which any line carries GenEval's ``include`` clauses is a GenEval-style file:
    every line must then carry ``tag`` and ``include``, checked here at load rather than when a
    reward first draws the line mid-run."""
    if not any("include" in it.metadata for it in items):
        return items
    for it, where in zip(items, wheres):
        missing = [k for k in GENEVAL_KEYS if k not in it.metadata]
        if missing:
            raise UserError(f"{where}: no {' or '.join(repr(k) for k in missing)} field, but "
                            f"other lines carry GenEval metadata; every line needs "
                            f"{' and '.join(repr(k) for k in GENEVAL_KEYS)}")
    return items


def _read_jsonl(text: str, name: str) -> list[PromptItem]:
    items, wheres = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{name}:{i}: malformed JSON ({err.msg})") from None
        items.append(_prompt_item(obj, f"{name}:{i}"))
        wheres.append(f"{name}:{i}")
    return _check_geneval_lines(items, wheres)


def _read_json_array(text: str, name: str) -> list[PromptItem]:
    try:
        objs = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{name}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(objs, list):
        raise UserError(f"{name}: expected a JSON array of objects or one object a line")
    wheres = [f"{name}: item {k + 1}" for k in range(len(objs))]
    return _check_geneval_lines([_prompt_item(obj, w) for obj, w in zip(objs, wheres)], wheres)


def _read_csv(text: str, name: str) -> list[PromptItem]:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise UserError(f"{name}: empty CSV")
    col = next((c for c in rows[0] if c and c.strip().lower() in ("prompt", "prompts")), None)
    if col is None:
        raise UserError(f"{name}: no 'prompt' or 'Prompts' column (found {list(rows[0])})")
    cat = next((c for c in rows[0] if c and c.strip().lower() == "category"), None)
    return [PromptItem(r[col], {"prompt": r[col], **({"tag": r[cat]} if cat else {})})
            for r in rows if r.get(col)]


def build_source(source: str, seed: int, shuffle: bool = True) -> PromptSource:
    """``shapes:<split>``, the name of a shipped prompt set (``geneval``, ``t2i-r1``, ...; see
    :mod:`stagerl.benchmarks`), or a prompt file or folder path (see :func:`load_prompts`)."""
    from stagerl.benchmarks import resolve_benchmark

    if source.startswith("shapes:"):
        return ShapesSource(source.split(":", 1)[1], seed)
    return FileSource(load_prompts(resolve_benchmark(source, "prompt file")), seed, shuffle)
