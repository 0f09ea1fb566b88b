"""Re-score the shipped shapes model (src/stagerl/assets/shapes/) without retraining it.

Runs the pretraining recipe's evaluation (`stagerl.pretrain.evaluate_recipe`, i.e. the one shapes
evaluation `stagerl.eval.evaluate_suite`) on the shipped weights with the recorded config, then rewrites the `evals` and `check` entries of pretrain_results.json, eval_check.json and
the generated part of MODEL_CARD.md (the command line and the hand-written "Notes on the shipped run"
are kept). Use it after a change to the evaluation protocol, never to replace a retrained model's
numbers.

    python scripts/rescore_shipped_model.py [--out DIR]   # default: the shipped folder itself
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch

from stagerl.policies.tiny import TinyPolicy, shipped_model_dir
from stagerl.pretrain import PretrainResult, evaluate_recipe, model_card, write_check

NOTES = "## Notes on the shipped run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write here instead of the shipped folder")
    args = parser.parse_args()
    src = shipped_model_dir()
    out = Path(args.out) if args.out else src
    if out != src:
        shutil.copytree(src, out, dirs_exist_ok=True)
    torch.set_num_threads(1)
    result = PretrainResult.from_dict(json.loads((src / "pretrain_results.json").read_text()))
    card = (src / "MODEL_CARD.md").read_text()
    command = re.search(r"- Command: `([^`]*)`", card).group(1)
    notes = card[card.index(NOTES):] if NOTES in card else ""
    model = TinyPolicy.from_pretrained(src).eval()
    t0 = time.perf_counter()
    result.evals = evaluate_recipe(model, result.config)
    result.check = write_check(model, result, out)
    print(f"evaluated in {time.perf_counter() - t0:.0f} s")
    (out / "pretrain_results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(result, command) + ("\n" + notes if notes else ""))
    for ev in result.evals:
        print(f"CFG {ev.cfg_scale}: strict overall {ev.strict['overall']:.3f}, "
              f"partial {ev.partial:.3f}")
    print(f"check ({result.check.prompts} prompts): strict overall "
          f"{result.check.strict['overall']:.3f}")

if __name__ == "__main__":
    main()
