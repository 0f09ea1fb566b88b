"""Prompt sources: balanced shapes prompts, position-determinism, prompt files and their errors."""

from collections import Counter

import pytest

from stagerl.data import FileSource, PromptItem, build_source, load_prompt_file
from stagerl.errors import UserError


def test_shapes_source_is_balanced_and_position_deterministic():
    src = build_source("shapes:train", seed=3)
    tags = Counter(it.metadata["tag"] for it in src.batch(0, 120))
    assert len(tags) == 6 and set(tags.values()) == {20}  # every GenEval category, equally
    whole = [it.prompt for it in build_source("shapes:train", seed=3).batch(50, 20)]
    parts = [it.prompt for k in range(0, 20, 3) for it in src.batch(50 + k, min(3, 20 - k))]
    assert whole == parts  # prompt p depends on (seed, p) only, not on batching
    assert whole != [it.prompt for it in build_source("shapes:train", seed=4).batch(50, 20)]


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="unknown shapes split"):
        build_source("shapes:nope", seed=0)


def test_file_source_reshuffles_per_epoch_and_covers_every_prompt():
    items = [PromptItem(f"p{i}", {}) for i in range(7)]
    src = FileSource(items, seed=0)
    epoch0 = [it.prompt for it in src.batch(0, 7)]
    epoch1 = [it.prompt for it in src.batch(7, 7)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"p{i}" for i in range(7))
    assert epoch0 != epoch1


def test_prompt_files(tmp_path):
    (tmp_path / "a.txt").write_text("a red circle\n\n two squares \n")
    assert [it.prompt for it in load_prompt_file(tmp_path / "a.txt")] == ["a red circle",
                                                                         "two squares"]
    (tmp_path / "b.csv").write_text('"Prompts","Category"\n"A red car.","Colors"\n')
    (it,) = load_prompt_file(tmp_path / "b.csv")
    assert it.prompt == "A red car." and it.metadata["tag"] == "Colors"
    (tmp_path / "c.jsonl").write_text('{"prompt": "x", "tag": "counting"}\n[1]\n')
    with pytest.raises(UserError, match=r"c.jsonl:2: expected an object"):
        load_prompt_file(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="no 'prompt'"):
        load_prompt_file(tmp_path / "d.csv")
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(UserError, match="no prompts"):
        build_source(str(tmp_path / "e.txt"), seed=0)


GENEVAL_LINE = '{"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1}]}'


@pytest.mark.parametrize("second,missing", [
    ('{"prompt": "a blue square", "tag": "colors"}', "'include'"),
    ('{"prompt": "a blue square", "include": [{"class": "square", "count": 1}]}', "'tag'"),
    ('{"prompt": "a blue square"}', "'tag' or 'include'"),
])
def test_geneval_style_file_checks_every_line_at_load(tmp_path, second, missing):
    # A line without GenEval metadata would otherwise only fail (or score nothing) when drawn.
    f = tmp_path / "g.jsonl"
    f.write_text(f"{GENEVAL_LINE}\n\n{second}\n")
    with pytest.raises(UserError, match=rf"g\.jsonl:3: no {missing} field"):
        load_prompt_file(f)
    arr = tmp_path / "g.json"
    arr.write_text(f"[{GENEVAL_LINE}, {second}]")
    with pytest.raises(UserError, match=rf"g\.json: item 2: no {missing} field"):
        load_prompt_file(arr)


def test_files_without_geneval_clauses_need_no_tag_or_include(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a red circle", "tag": "colors"}\n{"prompt": "a blue square"}\n')
    assert [it.prompt for it in load_prompt_file(f)] == ["a red circle", "a blue square"]
    whole = tmp_path / "whole.jsonl"
    whole.write_text(f"{GENEVAL_LINE}\n{GENEVAL_LINE}\n")
    assert len(load_prompt_file(whole)) == 2
