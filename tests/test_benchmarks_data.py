"""The shipped prompt sets (docs/benchmarks.md): recorded sha256 and counts, package data, names
for ``--benchmark`` and ``data.source``, the set that is not shipped, and T2I-R1's prompt file read
with its metadata (as .jsonl or under a .json name) with one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from stagerl.benchmarks import (ASSETS, BENCHMARKS, format_benchmark_list, get_benchmark,
                                resolve_benchmark, sha256_file, verify_benchmark)
from stagerl.cli import main
from stagerl.data import build_source, load_prompt_file, load_prompts
from stagerl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [b for b in BENCHMARKS.values() if b.shipped]
FILES = sorted({f.path: f for b in SHIPPED for f in b.files}.values(), key=lambda f: f.path)


@pytest.mark.parametrize("f", FILES, ids=[f.path for f in FILES])
def test_shipped_files_match_recorded_sha256_and_counts(f):
    path = ASSETS / f.path
    assert sha256_file(path) == f.sha256, f"{f.path} changed: update the record or restore it"
    assert len(load_prompt_file(path)) == f.prompts


def test_every_asset_file_is_registered_and_every_set_verifies():
    data = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file()
            and p.parent.name != "licenses" and p.name != ".gitattributes"}
    assert data == {f.path for f in FILES}
    for b in SHIPPED:
        verify_benchmark(b.name)
        assert b.path.exists() and b.source and b.licence in ("MIT", "Apache-2.0")


def test_package_data_globs_cover_every_shipped_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["stagerl"]
    pkg = ROOT / "src" / "stagerl"
    packaged = {p for g in globs for p in pkg.glob(g) if p.is_file()}
    wanted = {ASSETS / f.path for f in FILES} | set((ASSETS / "licenses").iterdir())
    assert wanted <= packaged


def test_docs_and_notice_credit_every_set():
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    notice = (ROOT / "NOTICE").read_text()
    for b in BENCHMARKS.values():
        assert f"`{b.name}`" in docs, b.name
    for f in FILES:
        assert f.sha256[:16] in docs, f.path
    licences = sorted((ASSETS / "licenses").glob("*.*.txt"))  # <set>.<licence>.txt
    assert len(licences) == 4
    for lic in licences:
        assert lic.name in notice and lic.name in docs
    for who in ("GenEval", "T2I-CompBench", "Flow-GRPO", "T2I-R1", "DrawBench"):
        assert who in notice
    outside = "../" + "shared"  # split so tests/test_docs_stand_alone.py does not flag this line
    assert outside not in docs and outside not in notice


def test_names_resolve_to_the_shipped_copies():
    geneval = resolve_benchmark("geneval")
    assert geneval == ASSETS / "geneval" / "evaluation_metadata.jsonl"
    assert resolve_benchmark("T2I_CompBench").is_dir()
    assert resolve_benchmark("t2i-compbench:Non-Spatial").name == "non_spatial_val.txt"
    assert resolve_benchmark("ocr").name == "test_prompts.txt"
    assert get_benchmark("t2i-r1").use == "train"
    assert BENCHMARKS["t2i-compbench"].prompts == 8 * 300


def test_paths_still_work_and_unknown_names_say_what_exists(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a cat\n")
    assert resolve_benchmark(str(f)) == f and resolve_benchmark(f) == f
    (tmp_path / "geneval").write_text("a dog\n")  # a Path is always a path, never a name
    assert resolve_benchmark(tmp_path / "geneval") == tmp_path / "geneval"
    with pytest.raises(UserError, match=r"benchmark not found: nope .*geneval, t2i-compbench"):
        resolve_benchmark("nope")
    with pytest.raises(UserError, match="category .* choose from 3d_spatial, color"):
        resolve_benchmark("t2i-compbench:colour")


def test_drawbench_is_not_shipped_and_the_error_says_where_to_get_it():
    assert not BENCHMARKS["drawbench"].shipped
    assert not (ASSETS / "drawbench").exists()
    with pytest.raises(UserError) as err:
        resolve_benchmark("drawbench")
    msg = str(err.value)
    assert "\n" not in msg and "not shipped" in msg and "licence" in msg
    assert "imagen.research.google" in msg and "docs/benchmarks.md" in msg


def test_cli_benchmark_list(capsys):
    assert main(["eval", "--benchmark", "list"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_benchmark_list()
    for b in BENCHMARKS.values():
        assert re.search(rf"^{re.escape(b.name)}\s+{b.prompts}\s", out, re.M), b.name
    assert "github.com/djghosh13/geneval" in out and "not shipped" in out


def test_cli_unknown_benchmark_is_a_one_line_error(capsys):
    assert main(["eval", "--benchmark", "drawbench", "--prompts", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stagerl: error: drawbench is not shipped") and "\n" not in err


def test_data_source_names():
    items = build_source("geneval", seed=0, shuffle=False).batch(0, 553)
    assert Counter(it.metadata["tag"] for it in items)["position"] == 100
    assert items[0].metadata["include"] == [{"class": "bench", "count": 1}]
    comp = build_source("t2i-compbench", seed=0)
    assert len(comp.items) == 2400  # the folder: every category file
    assert len(build_source("t2i-compbench:color", seed=0).items) == 300
    with pytest.raises(UserError, match="prompt file not found: no/such.jsonl"):
        build_source("no/such.jsonl", seed=0)


# -- T2I-R1's prompt file: metadata kept, .json name accepted, one-line errors -------------------
T2I_R1_FIELDS = {"spatial": {"nouns", "spatial_info"}, "numeracy": {"nouns", "numeracy_info"},
                 "color": {"nouns", "attr_nouns"}, "object": {"nouns"}}


def test_t2i_r1_prompts_keep_their_metadata():
    items = build_source("t2i-r1", seed=0, shuffle=False).batch(0, 7223)
    assert len(items) == 7223
    first = items[0]
    assert first.prompt == "a photo of a car below a zebra"
    assert first.metadata["spatial_info"] == {"obj1": "car", "obj2": "zebra", "locality": "below"}
    assert first.metadata["nouns"] == ["car", "zebra"] and first.metadata["prompt"] == first.prompt
    tasks = Counter(it.metadata["task_type"] for it in items)
    assert tasks == {"spatial": 2195, "numeracy": 1172, "color": 879, "complex": 700, "non": 700,
                     "texture": 695, "shape": 682, "object": 200}
    for it in items:
        want = T2I_R1_FIELDS.get(it.metadata["task_type"], set())
        assert want <= set(it.metadata), it.metadata


def test_t2i_r1_under_a_json_name_reads_the_same(tmp_path):
    src = resolve_benchmark("t2i-r1")
    as_json = tmp_path / "geneval_and_t2i_data_final.json"  # the upstream file name
    shutil.copyfile(src, as_json)
    a, b = load_prompt_file(src), load_prompt_file(as_json)
    assert [(x.prompt, x.metadata) for x in a] == [(y.prompt, y.metadata) for y in b]
    # a .json array of the same objects is read too
    arr = tmp_path / "array.json"
    arr.write_text(json.dumps([x.metadata for x in a[:5]], indent=1))
    assert [x.metadata for x in load_prompt_file(arr)] == [x.metadata for x in a[:5]]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_t2i_r1_variants_fail_on_one_line_naming_file_and_line(tmp_path, suffix):
    good = '{"prompt": "a photo of a cat", "nouns": ["cat"], "task_type": "object"}'
    bad_json = tmp_path / f"bad{suffix}"
    bad_json.write_text(f"{good}\n{good}\n{{\"prompt\": \"a dog\", \"nouns\": [\"dog\"\n")
    with pytest.raises(UserError, match=rf"bad{suffix}:3: malformed JSON") as err:
        load_prompt_file(bad_json)
    assert "\n" not in str(err.value)
    no_prompt = tmp_path / f"noprompt{suffix}"
    no_prompt.write_text(f'{good}\n\n{{"caption": "a dog", "nouns": ["dog"]}}\n')
    with pytest.raises(UserError, match=rf"noprompt{suffix}:3: expected an object with a string "
                                        r"'prompt' field"):
        load_prompt_file(no_prompt)
    arr = tmp_path / "arr.json"
    arr.write_text('[{"prompt": "x"},\n {"caption": "y"}]')
    with pytest.raises(UserError, match=r"arr.json: item 2: expected an object"):
        load_prompt_file(arr)
    arr.write_text('[{"prompt": "x"},\n {"prompt": "y",}]')
    with pytest.raises(UserError, match=r"arr.json:2: malformed JSON"):
        load_prompt_file(arr)


def test_not_utf8_and_empty_folders_are_user_errors(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_prompt_file(tmp_path / "latin1.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        load_prompts(tmp_path / "empty")
