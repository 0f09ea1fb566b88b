"""Public prompt sets that ship with the package, by name.

``stagerl eval --benchmark NAME`` and ``data.source=NAME`` go through :func:`resolve_benchmark`: a
registered name gives the packaged copy under ``stagerl/assets/benchmarks``; anything else is a
path. Each shipped file is a byte-identical copy of its upstream file, pinned by sha256 (checked by
the tests and by :func:`verify_benchmark`). A set whose licence does not allow redistribution is
registered with ``shipped=False``: naming it raises a UserError that says where to get it.

Sources, licences and versions: docs/benchmarks.md; licence texts: assets/benchmarks/licenses/.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stagerl.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets" / "benchmarks"


@dataclass(frozen=True)
class BenchFile:
    path: str  # relative to ASSETS
    prompts: int
    sha256: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    use: str  # "eval" or "train"
    files: tuple[BenchFile, ...]  # one file, or a folder's files (name order); () if not shipped
    source: str  # where the upstream copy lives
    licence: str
    shipped: bool = True
    folder: str | None = None  # relative to ASSETS, for multi-file sets
    why_not: str = ""  # for sets not shipped: why, and where to get the file
    upstream_prompts: int = 0  # for sets not shipped (no files here)
    # The prompt-specific rewards that can score this set (geneval reads GenEval's metadata, ocr
    # the quoted text); prompt-agnostic rewards (CLIP, HPS, VQA, ...) score any set.
    rewards: tuple[str, ...] = ()

    @property
    def prompts(self) -> int:
        return sum(f.prompts for f in self.files) or self.upstream_prompts

    @property
    def path(self) -> Path:
        """The packaged file, or folder for a multi-file set."""
        return ASSETS / (self.folder or (self.files[0].path if self.files else self.name))


_COMPBENCH_SRC = "github.com/Karine-Huang/T2I-CompBench examples/dataset/{}_val.txt"
_COMPBENCH = {  # category -> sha256 of <category>_val.txt (300 prompts each)
    "3d_spatial": "c9953597315f36a5fcb41291bb19bdc6ab5f64a0fa760d691b4854a73f5d1fe9",
    "color": "1e37a12c1861bf6b11623eaffb0bf6d6eeea9702caf45b95d040f1721bba7f4f",
    "complex": "1b808018b8d9916db3d47d5aa2ef18377a3549a56901a474156f799824cdf3b4",
    "non_spatial": "04c56cc9ac441dc9ea6c5157652058bd1635b5308526dd31bb29a1caab9a758d",
    "numeracy": "dad8df141604b70ba7554bec724e3db0a80023680769b5c514854ea2d2527bbe",
    "shape": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
    "spatial": "8707a1d7e42ce3002d95363cf55f74bd043c843ae27108f5125aaaa7840ca988",
    "texture": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f",
}
_COMPBENCH_FILES = tuple(BenchFile(f"t2i_compbench/{c}_val.txt", 300, h)
                         for c, h in sorted(_COMPBENCH.items()))

_ALL = [
    Benchmark(
        "geneval", "GenEval evaluation prompts with their metadata (6 categories)", "eval",
        (BenchFile("geneval/evaluation_metadata.jsonl", 553,
                   "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"),),
        "github.com/djghosh13/geneval prompts/evaluation_metadata.jsonl", "MIT",
        rewards=("geneval",)),
    Benchmark(
        "t2i-compbench", "T2I-CompBench validation prompts, 8 categories", "eval",
        _COMPBENCH_FILES, _COMPBENCH_SRC.format("<category>"), "MIT", folder="t2i_compbench"),
    *(Benchmark(f"t2i-compbench:{c}", f"T2I-CompBench validation prompts, category {c}", "eval",
                (f,), _COMPBENCH_SRC.format(c), "MIT")
      for c, f in zip(sorted(_COMPBENCH), _COMPBENCH_FILES)),
    Benchmark(
        "ocr", "Flow-GRPO's visual-text-rendering test prompts", "eval",
        (BenchFile("ocr/test_prompts.txt", 1018,
                   "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc"),),
        "github.com/yifan123/flow_grpo dataset/ocr/test.txt", "MIT", rewards=("ocr",)),
    Benchmark(
        "t2i-r1", "T2I-R1's training prompts with nouns/attributes/relations", "train",
        (BenchFile("t2i_r1/train_prompts.jsonl", 7223,
                   "96b956b5c92477ea2ff13cdd0c805f762a9d9fd5af43141ada6850ab3f6a0171"),),
        "github.com/CaraJ7/T2I-R1 data/geneval_and_t2i_data_final.json", "Apache-2.0"),
    Benchmark(
        "drawbench", "DrawBench (Imagen), 200 prompts in 11 categories", "eval",
        (), "the DrawBench sheet linked from imagen.research.google", "none stated",
        shipped=False, upstream_prompts=200,
        why_not="no licence is published for it, so it may not be redistributed; "
                "export the DrawBench sheet linked from imagen.research.google as CSV (columns "
                "Prompts, Category) and pass its path, e.g. --benchmark drawbench.csv "
                "(docs/benchmarks.md)"),
]
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}


# Rewards that read one kind of prompt only: the shapes world's exact evaluator, and every
# reward a shipped set declares. On any other set they score nothing a table should report.
SHAPES_REWARDS = ("shapes_strict", "shapes_lenient", "shapes_partial")
PROMPT_SPECIFIC = {**{n: "shapes-world prompts" for n in SHAPES_REWARDS},
                   **{n: f"{b.name} prompts" for b in _ALL for n in b.rewards}}


def check_benchmark_rewards(name: str, rewards: list[str], what: str) -> None:
    """UserError when a reward in ``rewards`` cannot score the shipped set ``name`` (a
    prompt-specific reward the set does not declare, e.g. shapes_strict on GenEval); ``what``
    says where the names came from. A path is not checked (its prompts could be anything)."""
    bench = get_benchmark(name)
    if bench is None:
        return
    wrong = [n for n in rewards if n in PROMPT_SPECIFIC and n not in bench.rewards]
    if wrong:
        fix = (f"pass --rewards {','.join(bench.rewards)}" if bench.rewards else
               "pass --rewards with a prompt-agnostic reward")
        raise UserError(f"--benchmark {name}: {what} {', '.join(wrong)} cannot score "
                        f"{bench.name} prompts (it scores {PROMPT_SPECIFIC[wrong[0]]}); {fix} "
                        f"(or clip_score, pickscore, hps, git_vqa, grounding_dino)")


def _key(name: str) -> str:
    """Ignore case and ``_`` vs ``-``: ``T2I_CompBench:non-spatial`` -> the registered
    ``t2i-compbench:non_spatial``."""
    head, _, cat = name.strip().lower().partition(":")
    return head.replace("_", "-") + (":" + cat.replace("-", "_") if cat else "")


def _short_names() -> list[str]:
    names = [n for n in BENCHMARKS if ":" not in n]
    return [n + (", t2i-compbench:<category>" if n == "t2i-compbench" else "") for n in names]


def get_benchmark(name: str) -> Benchmark | None:
    """The registered set called ``name`` (see :func:`_key` for the spelling rules), else None."""
    return BENCHMARKS.get(_key(name))


def resolve_benchmark(name_or_path: str | Path, what: str = "benchmark") -> Path:
    """A registered name -> its packaged file or folder; anything else -> the path, which must
    exist (else a UserError: "<what> not found: ..."). A :class:`~pathlib.Path` is always a path;
    to use a local file named like a benchmark, write ``./geneval``."""
    if isinstance(name_or_path, Path):
        return name_or_path
    text = str(name_or_path)
    key = _key(text)
    bench = BENCHMARKS.get(key)
    if bench is None and key.startswith("t2i-compbench:"):
        raise UserError(f"unknown T2I-CompBench category in {text!r}; choose from "
                        f"{', '.join(sorted(_COMPBENCH))}")
    if bench is None:
        p = Path(text)
        if not p.exists():
            raise UserError(f"{what} not found: {text} (nor is it the name of a shipped prompt "
                            f"set: {', '.join(_short_names())})")
        return p
    if not bench.shipped:
        raise UserError(f"{bench.name} is not shipped with stagerl: {bench.why_not}")
    if not bench.path.exists():
        raise UserError(f"the shipped {bench.name} prompts are missing from this install "
                        f"({bench.path}); reinstall stagerl")
    return bench.path


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_benchmark(name: str) -> None:
    """Raise UserError unless every shipped file of ``name`` has its recorded sha256."""
    bench = get_benchmark(name)
    if bench is None or not bench.shipped:
        raise UserError(f"{name!r} is not a shipped prompt set")
    for f in bench.files:
        p = ASSETS / f.path
        got = sha256_file(p) if p.is_file() else "missing"
        if got != f.sha256:
            raise UserError(f"{p}: sha256 {got[:16]} differs from the recorded {f.sha256[:16]}")


def format_benchmark_list() -> str:
    """The table ``stagerl eval --benchmark list`` prints: name, prompts, use, licence, source."""
    rows = [("name", "prompts", "use", "licence", "source")]
    for b in BENCHMARKS.values():
        use = b.use if b.shipped else "not shipped"
        rows.append((b.name, str(b.prompts), use, b.licence, b.source))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]),
                        r[3].ljust(widths[3]), r[4]]).rstrip() for r in rows]
    lines.append("Any other value of --benchmark is a path: a prompt file (.txt, .jsonl, .json, "
                 ".csv) or a folder of them. Details: docs/benchmarks.md")
    return "\n".join(lines)
