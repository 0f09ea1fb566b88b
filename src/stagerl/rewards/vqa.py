"""GIT yes/no VQA reward, as in T2I-R1 and the STAGE paper's HPS+GIT+GDino mix.

For each attribute-noun phrase of the prompt ("a red cat", "two dogs") GIT (Wang et al. 2022,
fine-tuned on VQAv2) is asked ``template.format(phrase=...)``; the answer's first-token distribution
gives ``P(yes) / (P(yes) + P(no))``. The reward is the mean over the prompt's questions, in [0, 1].

Phrases come from ``metadata["questions"]`` (full questions, used as they are), else GenEval include
clauses, else the prompt parser shared with the grounding reward (:func:`parse_prompt`).

GIT's input is ``[CLS] question`` after the image tokens, without ``[SEP]`` (the model continues the
text with its answer). Batches are right-padded and read at each question's last real token: text
attends causally and image tokens never attend to text, so padding cannot change a score.

``scoring="parity"`` builds the questions as the STAGE authors' reward code does (see
:func:`parity_questions`; docs/rewards.md tabulates where it differs from the default). P(yes) is
computed the same way in both scorings.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards._common import BatchedReward, check_choice, local_or_hub, require
from stagerl.rewards.base import register_reward
from stagerl.rewards.grounding import (NUMBER_WORDS, SCORINGS, parse_prompt,
                                       spec_from_metadata)

_COUNT_WORDS = {v: k for k, v in NUMBER_WORDS.items() if v >= 2}


def _with_count(phrase: str, count: int | None) -> str:
    if count is None:
        return ("an " if phrase[:1] in "aeiou" else "a ") + phrase
    noun = phrase if phrase.endswith("s") else phrase + "s"  # naive plural for GenEval classes
    return f"{_COUNT_WORDS.get(count, str(count))} {noun}"


def questions_for(prompt: str, meta: dict[str, Any], template: str) -> list[str]:
    if meta.get("questions"):
        return [str(q) for q in meta["questions"]]
    spec = spec_from_metadata(meta) or parse_prompt(prompt)
    return [template.format(phrase=_with_count(t.phrase, t.count)) for t in spec.objects]


# scoring="parity": re-implemented (not copied) from krennic999/STAGE,
# src/grpo/src/utils/reward_git.py (the same file as CaraJ7/T2I-R1,
# src/t2i-r1/src/utils/reward_git.py).
TEMPLATES = {"fixed": "is there {phrase}?", "parity": "{phrase}?"}
PARITY_UNSCORED_TASKS = ("spatial", "numeracy")  # the authors give these prompts 0


def parity_questions(prompt: str, meta: dict[str, Any],
                     template: str) -> tuple[list[str], float | None]:
    """(questions, constant) as the authors build them from the T2I-R1 metadata.

    ``task_type`` "spatial" or "numeracy": no question, score 0. Else one question per
    ``attr_nouns`` phrase when the prompt has them ("purple elephant?"), else per ``nouns`` entry
    ("mirror?"); no nouns at all: no question, score 1."""
    if meta.get("task_type") in PARITY_UNSCORED_TASKS:
        return [], 0.0
    phrases = meta.get("attr_nouns")
    if phrases is None:
        if "nouns" not in meta:
            raise ValueError(f"scoring='parity' reads the T2I-R1 metadata (attr_nouns, nouns, "
                             f"task_type); prompt {prompt!r} has neither attr_nouns nor nouns")
        if not meta["nouns"]:
            return [], 1.0
        phrases = meta["nouns"]
    if not phrases:
        raise ValueError(f"prompt {prompt!r} has an empty attr_nouns list")
    return [template.format(phrase=str(p)) for p in phrases], None


@register_reward("git_vqa")
class GitVqaReward(BatchedReward):
    """``git_vqa``: kwargs ``checkpoint`` (default microsoft/git-large-vqav2), ``scoring``
    ('fixed', default, or 'parity': the STAGE authors' questions, from T2I-R1 metadata),
    ``template`` (default "is there {phrase}?" fixed, "{phrase}?" parity), ``device``, ``dtype``,
    ``batch_size`` (questions per forward)."""

    name = "git_vqa"

    def __init__(self, checkpoint: str = "microsoft/git-large-vqav2", scoring: str = "fixed",
                 template: str | None = None, device: str | None = "auto",
                 dtype: str | None = "float32", batch_size: int = 16):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.scoring = check_choice(self.name, "scoring", scoring, SCORINGS)
        template = TEMPLATES[self.scoring] if template is None else template
        if "{phrase}" not in template:
            raise UserError("reward 'git_vqa': template must contain '{phrase}'")
        self.checkpoint = local_or_hub(checkpoint, self.name)
        self.template = template
        self.model: Any = None
        self.processor: Any = None
        self.yes_no: tuple[int, int] = (0, 0)

    requires = ("transformers",)

    def checkpoints(self) -> list[tuple[str, str, str]]:
        return [("checkpoint", self.checkpoint, "model")]

    def _load(self) -> None:
        tf = require("transformers", self.name)
        self.processor = tf.AutoProcessor.from_pretrained(self.checkpoint)
        self.model = tf.GitForCausalLM.from_pretrained(self.checkpoint, dtype=self.dtype)
        self.model.to(self.device).eval()
        tok = self.processor.tokenizer
        ids = tok.convert_tokens_to_ids(["yes", "no"])
        if tok.unk_token_id in ids:
            raise UserError(f"reward 'git_vqa': the tokenizer of {self.checkpoint!r} has no "
                            "single 'yes'/'no' tokens")
        self.yes_no = (int(ids[0]), int(ids[1]))

    @torch.no_grad()
    def p_yes(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        """[Q] P(yes)/(P(yes)+P(no)) for question q about images[q]."""
        tok = self.processor.tokenizer
        rows = [[tok.cls_token_id] + tok(q, add_special_tokens=False)["input_ids"]
                for q in questions]
        lens = torch.tensor([len(r) for r in rows])  # [Q]
        ids = torch.full((len(rows), int(lens.max())), tok.pad_token_id)  # [Q, L] right-padded
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r)
        mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()  # [Q, L]
        px = self.processor(images=images, return_tensors="pt")["pixel_values"]  # [Q, 3, H, W]
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            pixel_values=px.to(self.device, self.dtype)).logits  # [Q, I+L, V]
        n_image = logits.shape[1] - ids.shape[1]  # GIT's logits also cover the image tokens
        last = logits[torch.arange(len(rows)), n_image + lens - 1].float()  # [Q, V]
        yn = last[:, list(self.yes_no)].softmax(-1)  # [Q, 2] = P(yes), P(no) renormalised
        return yn[:, 0].cpu()

    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        if self.scoring == "parity":
            plans = [parity_questions(p, m, self.template) for p, m in zip(prompts, metadata)]
        else:
            plans = [(questions_for(p, m, self.template), None) for p, m in zip(prompts, metadata)]
        qs = [q for q, _ in plans]
        for p, (q, const) in zip(prompts, plans):
            if not q and const is None:
                raise ValueError(f"no questions could be built from prompt {p!r}")
        flat_img = [im for im, q in zip(images, qs) for _ in q]
        flat_q = [x for q in qs for x in q]
        probs = torch.cat([torch.zeros(0)]  # [sum Q]; empty when parity asks nothing
                          + [self.p_yes(flat_img[lo:lo + self.batch_size],
                                        flat_q[lo:lo + self.batch_size])
                             for lo in range(0, len(flat_q), self.batch_size)])
        scores, details, lo = [], [], 0
        for q, const in plans:
            if const is not None:  # parity: a prompt the authors do not ask about
                scores.append(const)
                details.append({"scoring": self.scoring, "questions": [], "constant": const})
                continue
            p = probs[lo:lo + len(q)]
            lo += len(q)
            scores.append(float(p.mean()))
            details.append({"scoring": self.scoring, "questions": q,
                            "p_yes": [round(float(x), 6) for x in p]})
        return scores, details
