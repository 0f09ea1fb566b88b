"""A learned proxy reward of the shapes world as an object: its network, the world spec it was
built for and its proxy.json; saving, loading by name or path, and the checks that refuse a folder
that is not a proxy, a proxy of the other kind, or one built for another world spec, before any
weights load. Built by :mod:`stagerl.proxies.build`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stagerl.data import PromptItem
from stagerl.errors import UserError
from stagerl.policies.tiny import PromptVocab
from stagerl.worlds.shapes.detect import SceneParse
from stagerl.worlds.shapes.evaluate import verdict_from_parse
from stagerl.worlds.shapes.prompts import prompt_vocabulary
from stagerl.proxies.nets import DetectorNet, ScorerNet, as_input, decode_detections
from stagerl.worlds.shapes.spec import WorldSpec

PROXY_FORMAT = "stagerl-shapes-proxy"
PROXY_KINDS = {"shapes_detector": "detector", "shapes_scorer": "scorer"}
META, WEIGHTS = "proxy.json", "weights.safetensors"
PROMPT_LEN = 16  # words the scorer reads (the policy's prompt_len)


def scorer_vocab(spec: WorldSpec) -> PromptVocab:
    return PromptVocab([PromptVocab.PAD, PromptVocab.UNK, PromptVocab.NULL]
                       + prompt_vocabulary(spec))


class Proxy:
    """A trained proxy and what it was built for; :meth:`scores` scores images with it."""

    def __init__(self, kind: str, net: torch.nn.Module, spec: WorldSpec, meta: dict[str, Any]):
        self.kind, self.net, self.spec, self.meta = kind, net.eval(), spec, meta
        self.vocab = scorer_vocab(spec) if kind == "scorer" else None

    @torch.no_grad()
    def detect(self, images: np.ndarray, threshold: float = 0.5) -> list[SceneParse]:
        """Detector proxies: the learned parse of uint8 [N, H, W, 3] images."""
        return decode_detections(self.net(as_input(torch.from_numpy(images))), self.spec,
                                 threshold)

    @torch.no_grad()
    def pass_probability(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Scorer proxies: P(strict passes) [N] for uint8 [N, H, W, 3] images and their prompts."""
        assert self.vocab is not None
        ids, _ = self.vocab.encode(prompts, PROMPT_LEN)
        logits = self.net(as_input(torch.from_numpy(images)), ids)
        return torch.sigmoid(logits).numpy()

    def scores(self, images: np.ndarray, items: list[PromptItem],
               threshold: float = 0.5) -> dict[str, np.ndarray]:
        """The proxy's view of each image: {"strict", "lenient", "score"} for a detector (from its
        detections above ``threshold``, by the rule engine), {"strict" (p > ``threshold``),
        "score" (p)} for a scorer."""
        out: dict[str, list] = {"strict": [], "lenient": [], "score": []}
        for c in range(0, len(images), 512):
            im, its = images[c:c + 512], items[c:c + 512]
            if self.kind == "detector":
                for parse, it in zip(self.detect(im, threshold), its):
                    v = verdict_from_parse(parse, it.metadata)
                    out["strict"].append(v.strict)
                    out["lenient"].append(v.lenient)
                    out["score"].append(v.score)
            else:
                p = self.pass_probability(im, [it.prompt for it in its])
                out["score"].extend(p.tolist())
                out["strict"].extend((p > threshold).tolist())
        return {k: np.asarray(v) for k, v in out.items() if v}


def save_proxy(proxy: Proxy, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in proxy.net.state_dict().items()}, str(out / WEIGHTS))
    meta = {"format": PROXY_FORMAT, "version": 1, "kind": proxy.kind,
            "spec": dataclasses.asdict(proxy.spec), **proxy.meta}
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def check_proxy_name(name: str) -> str:
    if name not in PROXY_KINDS:
        raise UserError(f"unknown proxy reward {name!r}; choose from {', '.join(PROXY_KINDS)}")
    return PROXY_KINDS[name]


def shipped_proxy_dir(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / "shapes" / "proxies" / name


def resolve_proxy_path(name: str, weights: str) -> Path:
    """``builtin`` (the shipped proxy of reward ``name``), ``builtin:<shipped name>`` or a
    directory written by ``stagerl pretrain-reward``."""
    if weights == "builtin":
        return shipped_proxy_dir(name)
    if weights.startswith("builtin:"):
        path = shipped_proxy_dir(weights.split(":", 1)[1])
        if not path.is_dir():
            known = sorted(p.name for p in shipped_proxy_dir(name).parent.iterdir() if p.is_dir())
            raise UserError(f"reward.kwargs.{name}.weights: no shipped proxy {weights!r}; "
                            f"shipped: {', '.join('builtin:' + k for k in known)}")
        return path
    return Path(weights).expanduser()


def read_proxy_meta(name: str, weights: str, spec: WorldSpec) -> tuple[Path, dict[str, Any]]:
    """The proxy folder and its proxy.json, checked without loading weights: it is a proxy, of
    reward ``name``'s kind, built for ``spec``. Every problem is a one-line UserError."""
    kind = check_proxy_name(name)
    where = f"reward.kwargs.{name}.weights"
    path = resolve_proxy_path(name, weights)
    if not path.is_dir():
        raise UserError(f"{where}: {str(path)!r} is not a directory; build one with "
                        f"`stagerl pretrain-reward {name} --out DIR`")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: {str(path)!r} is not a proxy reward (no readable {META}: "
                        f"{type(err).__name__}); build one with `stagerl pretrain-reward "
                        f"{name}`") from None
    if not isinstance(meta, dict) or meta.get("format") != PROXY_FORMAT or \
            not (path / WEIGHTS).is_file():
        raise UserError(f"{where}: {str(path)!r} is not a proxy reward ({META} without format "
                        f"{PROXY_FORMAT!r}, or no {WEIGHTS})")
    if meta.get("kind") != kind:
        raise UserError(f"{where}: {str(path)!r} holds a {meta.get('kind')} proxy, but "
                        f"{name} needs a {kind}")
    built = dataclasses.asdict(spec)
    theirs = json.loads(json.dumps(meta.get("spec", {})))
    ours = json.loads(json.dumps(built))
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise UserError(f"{where}: {str(path)!r} was built for another world spec ({k}: "
                        f"{theirs.get(k)!r}, this run's is {ours.get(k)!r}); a proxy for this "
                        f"world is built with stagerl.proxies.build.build_proxy and a base model "
                        f"of this world (docs/rewards.md, \"Learned proxy rewards\")")
    return path, meta


def load_proxy(name: str, weights: str, spec: WorldSpec) -> Proxy:
    path, meta = read_proxy_meta(name, weights, spec)
    width = int(meta["config"]["width"])
    net: torch.nn.Module = (DetectorNet(len(spec.shapes), len(spec.colors), width)
                            if meta["kind"] == "detector"
                            else ScorerNet(len(scorer_vocab(spec)), width))
    try:
        net.load_state_dict(load_file(str(path / WEIGHTS)))
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(f"reward.kwargs.{name}.weights: {str(path / WEIGHTS)!r} does not match "
                        f"its {META} ({str(err).splitlines()[0]})") from None
    return Proxy(meta["kind"], net, spec, meta)
