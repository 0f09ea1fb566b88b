"""GIT yes/no VQA reward (issue 6, item 4), as in T2I-R1 and the STAGE paper's HPS+GIT+GDino mix.

For each attribute-noun phrase of the prompt ("a red cat", "two dogs") GIT (Wang et al. 2022,
fine-tuned on VQAv2) is asked ``template.format(phrase=...)``; the answer's first-token distribution
gives ``P(yes) / (P(yes) + P(no))``. The reward is the mean over the prompt's questions, in [0, 1].

Phrases come from ``metadata["questions"]`` (full questions, used as they are), else GenEval include
clauses, else the prompt parser shared with the grounding reward (:func:`parse_prompt`).

GIT's input is ``[CLS] question`` after the image tokens, without ``[SEP]`` (the model continues the
text with its answer). Batches are right-padded and read at each question's last real token: text
attends causally and image tokens never attend to text, so padding cannot change a score.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards._common import BatchedReward, local_or_hub, require
from stagerl.rewards.base import register_reward
from stagerl.rewards.grounding import NUMBER_WORDS, parse_prompt, spec_from_metadata

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


@register_reward("git_vqa")
class GitVqaReward(BatchedReward):
    """``git_vqa``: kwargs ``checkpoint`` (default microsoft/git-large-vqav2), ``template``
    (default "is there {phrase}?"), ``device``, ``dtype``, ``batch_size`` (questions per forward)."""

    name = "git_vqa"

    def __init__(self, checkpoint: str = "microsoft/git-large-vqav2",
                 template: str = "is there {phrase}?", device: str | None = "auto",
                 dtype: str | None = "float32", batch_size: int = 16):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if "{phrase}" not in template:
            raise UserError("reward 'git_vqa': template must contain '{phrase}'")
        self.checkpoint = local_or_hub(checkpoint, self.name)
        self.template = template
        self.model: Any = None
        self.processor: Any = None
        self.yes_no: tuple[int, int] = (0, 0)

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
        qs = [questions_for(p, m, self.template) for p, m in zip(prompts, metadata)]
        for p, q in zip(prompts, qs):
            if not q:
                raise ValueError(f"no questions could be built from prompt {p!r}")
        flat_img = [im for im, q in zip(images, qs) for _ in q]
        flat_q = [x for q in qs for x in q]
        probs = torch.cat([self.p_yes(flat_img[lo:lo + self.batch_size],
                                      flat_q[lo:lo + self.batch_size])
                           for lo in range(0, len(flat_q), self.batch_size)])  # [sum Q]
        scores, details, lo = [], [], 0
        for q in qs:
            p = probs[lo:lo + len(q)]
            lo += len(q)
            scores.append(float(p.mean()))
            details.append({"questions": q, "p_yes": [round(float(x), 6) for x in p]})
        return scores, details
