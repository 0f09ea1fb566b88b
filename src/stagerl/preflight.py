"""Checks that run before any model loads or any work starts, so that a bad input costs a second,
not a failed run: output paths that cannot be written, prompts and rewards that cannot be used, and
batch sizes that cannot fit in memory. Each raises :class:`UserError` naming the option or field.

The memory estimate is a lower bound (the key/value cache of sampling, plus the logits and saved
activations of a training forward pass): a size it refuses cannot fit; a size it accepts may still
be too large for other reasons.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagerl.errors import UserError
from stagerl.config_schema import Config

GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------------
# Paths


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | Path, what: str, shown: str | Path | None = None) -> Path:
    """A folder we may create and write into: not a file, and its nearest existing ancestor takes a
    new folder (probed with a temporary folder that is removed again, so nothing is left behind).
    ``shown`` is the path the user gave, when it is not ``path`` itself."""
    p, shown = Path(path), path if shown is None else shown
    if p.exists() and not p.is_dir():
        raise UserError(f"{what}={shown}: {p} is a file, not a folder")
    base = _first_existing(p)
    if not base.is_dir():
        raise UserError(f"{what}={shown}: {base} is a file, so no folder can be made inside it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".stagerl-probe-", dir=base))
    except OSError as err:
        raise UserError(f"{what}={shown}: cannot create or write folders under {base} "
                        f"({err.strerror})") from None
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """A file we may write: not a folder, in a folder we may create and write into."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what}={path}: is a folder; give a file name")
    check_output_dir(p.parent, what, shown=path)
    return p


# --------------------------------------------------------------------------------------------------
# Memory


@dataclass
class ModelDims:
    """What a batch's memory grows with: image tokens L, codes V, prompt slots T, width, depth."""

    tokens: int
    codes: int
    prompt_len: int
    width: int
    layers: int
    mlp: int

    def sample_bytes(self, guided: bool = True) -> int:
        """Per sequence while sampling: fp32 keys and values of every layer, both CFG branches."""
        branches = 2 if guided else 1
        return branches * 2 * self.layers * (self.prompt_len + self.tokens) * self.width * 4

    def train_bytes(self) -> int:
        """Per sequence in a training forward pass: saved activations plus logits and their grad."""
        seq = self.prompt_len + self.tokens
        saved = self.layers * seq * (6 * self.width + 3 * self.mlp) * 4
        return saved + 2 * self.tokens * self.codes * 4

    def image_bytes(self) -> int:
        """A decoded RGB image, about one 4x4 patch per token (the shapes world's tokenizer)."""
        return self.tokens * 48


def model_dims(model_cfg: Any) -> ModelDims | None:
    """Sizes of a tiny-policy checkpoint from its config.json; None when unknown (other kinds, or
    a folder the loader will reject with its own message)."""
    if getattr(model_cfg, "kind", "tiny") != "tiny":
        return None
    from stagerl.policies.tiny import resolve_model_path

    path = resolve_model_path(str(model_cfg.path)) / "config.json"
    try:
        c = json.loads(path.read_text())
        return ModelDims(int(c["grid"][0]) * int(c["grid"][1]), int(c["vocab_size"]),
                         int(c["prompt_len"]), int(c["d_model"]), int(c["n_layers"]),
                         int(c["mlp_hidden"]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def memory_limit(cpu: bool = True) -> tuple[int, str]:
    """(bytes, name) of the memory a run can use: the first GPU's, else the machine's RAM."""
    if not cpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory (RAM)"
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "memory"


def check_fits(need: int, what: str, hint: str, cpu: bool = True) -> None:
    """Refuse when ``need`` bytes exceed the memory the run can use."""
    limit, name = memory_limit(cpu)
    if need > limit:
        raise UserError(f"{what} needs at least {need / GIB:.1f} GiB, more than this machine's "
                        f"{limit / GIB:.1f} GiB of {name}; {hint}")


def check_sampling_fits(model_cfg: Any, prompts: int, images_per_prompt: int, what: str,
                        guided: bool = True, chunk_prompts: int = 32, cpu: bool = True) -> None:
    """Sampling ``prompts`` x ``images_per_prompt`` images in chunks of ``chunk_prompts`` prompts
    (as :func:`stagerl.eval.generate_images` does), keeping every image."""
    dims = model_dims(model_cfg)
    if dims is None:
        return
    batch = min(prompts, chunk_prompts) * images_per_prompt
    need = batch * dims.sample_bytes(guided) + prompts * images_per_prompt * dims.image_bytes()
    check_fits(need, f"{what} = {prompts} prompts x {images_per_prompt} images",
               "ask for fewer images", cpu)


def check_training_fits(cfg: Config) -> None:
    """One training step (rollout, then the update's micro-batches) and the in-run evaluation."""
    dims = model_dims(cfg.model)
    if dims is None:
        return
    s = cfg.sampling
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    n = s.prompts_per_step * s.group_size
    local = max(1, n // world)
    sample_batch = s.micro_batch or local
    update_batch = s.micro_batch or -(-local // cfg.optim.grad_accum)
    need = max(sample_batch * dims.sample_bytes(s.cfg_scale != 1.0),
               update_batch * dims.train_bytes()) + local * dims.image_bytes()
    hint = "lower them" + ("" if s.micro_batch else ", or set sampling.micro_batch")
    cpu = bool(cfg.run.cpu)
    check_fits(need, f"sampling.prompts_per_step x sampling.group_size = {s.prompts_per_step} x "
                     f"{s.group_size} = {n} sequences per step", hint, cpu)
    if cfg.log.eval_prompts:
        check_sampling_fits(cfg.model, cfg.log.eval_prompts, cfg.log.eval_images_per_prompt,
                            "log.eval_prompts x log.eval_images_per_prompt", s.cfg_scale != 1.0,
                            cpu=cpu)


# --------------------------------------------------------------------------------------------------
# Command-line option types (argparse): a value out of range is a one-line error naming the option


def int_arg(lo: int, hi: int | None = None) -> Any:
    """An argparse ``type`` for a whole number in [lo, hi]."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {value}")
        return value

    return parse


def float_arg(lo: float, hi: float | None = None, lo_open: bool = False) -> Any:
    """An argparse ``type`` for a finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    import argparse
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_bad = value <= lo if lo_open else value < lo
        if not math.isfinite(value) or low_bad or (hi is not None and value > hi):
            span = ("> " if lo_open else ">= ") + f"{lo:g}" + ("" if hi is None else
                                                              f" and <= {hi:g}")
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, got {text!r}")
        return value

    return parse


# --------------------------------------------------------------------------------------------------
# Training


def check_data_source(source: str, seed: int, shuffle: bool) -> None:
    """``data.source``: a shapes split, a shipped prompt set, or a readable prompt file or folder
    with prompts in it (reading a file costs far less than loading a model)."""
    from stagerl.data import build_source

    try:
        build_source(source, seed, shuffle)
    except UserError as err:
        if source in str(err):
            raise
        raise UserError(f"data.source={source}: {err}") from None


def check_prompts_readable(model_cfg: Any, source: str) -> None:
    """``data.source`` prompts the shapes model cannot read (no word of its vocabulary: it would
    draw unconditional pictures and learn nothing) are refused, naming file and line."""
    if getattr(model_cfg, "kind", "tiny") == "llamagen":
        from stagerl.policies.llamagen_cond import check_c2i_prompts

        check_c2i_prompts(model_cfg, source)
        return
    from stagerl.policies.tiny import located_prompts, prompt_vocab

    vocab = prompt_vocab(model_cfg)
    if vocab is None or source.startswith("shapes:"):
        return
    from stagerl.benchmarks import resolve_benchmark

    try:
        vocab.check_readable(located_prompts(resolve_benchmark(source, "prompt file")))
    except UserError as err:
        raise UserError(f"data.source={source}: {err}") from None


def check_model_path(model_cfg: Any, what: str = "model.path") -> None:
    """A tiny-policy checkpoint must be an existing folder; a local Janus folder must hold a Janus
    checkpoint, and a Janus hub id must be in the hub cache or answered by the hub
    (:func:`check_hub_ref`; its model type is checked when it loads)."""
    if getattr(model_cfg, "kind", "tiny") == "janus":
        if not getattr(model_cfg, "tiny_random", False):
            from stagerl.policies.janus import check_janus_checkpoint

            check_janus_checkpoint(str(model_cfg.path), what)
            if not Path(str(model_cfg.path)).expanduser().exists():
                check_hub_ref(str(model_cfg.path), what, "model")
        return
    if getattr(model_cfg, "kind", "tiny") == "llamagen":
        from stagerl.policies.llamagen_load import check_llamagen_files

        check_llamagen_files(model_cfg, what)
        return
    if getattr(model_cfg, "kind", "tiny") != "tiny":
        return
    from stagerl.policies.tiny import resolve_model_path

    path = resolve_model_path(str(model_cfg.path))
    if not path.is_dir():
        raise UserError(f"{what}={model_cfg.path}: no such model folder")


# --------------------------------------------------------------------------------------------------
# Hub checkpoints and remote services: resolved without downloading or loading anything, with one
# short network request at most (transformers would retry a dead hub five times, ~25 s per file).

NETWORK_TIMEOUT = 5.0  # seconds for one probe of the hub, a reward server or the tracker's host
_UNREACHABLE: dict[str, str] = {}  # endpoint -> why it could not be reached (probed once per run)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) is set: only the cache is used."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_cache_dir() -> str | None:
    """The hub cache huggingface_hub reads (HF_HUB_CACHE, else HF_HOME/hub); None: its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect answers the probe (the file exists); following it would cost another request."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def probe_url(url: str, method: str = "HEAD", timeout: float = NETWORK_TIMEOUT,
              headers: dict[str, str] | None = None) -> tuple[int | None, str]:
    """One request, no retries: (HTTP status, '') when a server answered (redirects count as
    answers), (None, why) when none did within ``timeout`` seconds."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout) as resp:
            return int(resp.status), ""
    except urllib.error.HTTPError as err:
        return int(err.code), str(err.reason)
    except urllib.error.URLError as err:
        reason = err.reason
        text = getattr(reason, "strerror", None) or str(reason)
        return None, "timed out" if isinstance(reason, TimeoutError) else text
    except (TimeoutError, OSError, ValueError) as err:
        return None, "timed out" if isinstance(err, TimeoutError) else str(err)


def _hub_headers() -> dict[str, str]:
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 - no token, or an old huggingface_hub: probe anonymously
        token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _cached_hub_file(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def check_hub_ref(ref: str, field: str, what: str, file: bool = False,
                  needs: str | None = "config.json") -> None:
    """``field`` names a local folder, a hub repo id, or (``file``) a local file or
    ``<repo id>:<filename>``. Checked without loading: a local path must exist (a model folder
    must hold ``needs``); a hub id must be in the hub cache, or, when HF_HUB_OFFLINE is not set,
    be answered by the hub within :data:`NETWORK_TIMEOUT` seconds. Raises a one-line UserError
    naming ``what`` (e.g. "reward 'geneval'"), the field, the id and the way out."""
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith(("/", "./", "../", "~")):
        _check_local_ref(path, ref, field, what, file, needs)
        return
    if file:
        if ":" not in ref:
            raise UserError(f"{what}: {field}={ref!r} is neither a file nor "
                            f"'<hub repo>:<filename>'")
        repo, filename = ref.split(":", 1)
    else:
        repo, filename = ref, needs or "config.json"
    cached = _cached_hub_file(repo, filename)
    if cached is not None:  # transformers and huggingface_hub fall back to it when offline
        _check_readable(Path(cached), ref, field, what)
        return
    cache = hub_cache_dir() or "the default hub cache"
    way_out = (f"download it once where the hub is reachable (hf download {repo}"
               f"{' ' + filename if file else ''}) and run with HF_HUB_OFFLINE=1, or set {field} "
               f"to a local {'file' if file else 'folder'}")
    if hub_offline():
        raise UserError(f"{what}: {field}={ref!r} is a hub id that is not in the hub cache "
                        f"({cache}) and HF_HUB_OFFLINE=1 forbids downloading it; {way_out}")
    endpoint = hub_endpoint()
    why = _UNREACHABLE.get(endpoint)
    status = None
    if why is None:
        status, why = probe_url(f"{endpoint}/{repo}/resolve/main/{urllib.parse.quote(filename)}",
                                headers=_hub_headers())
        if status is None:
            _UNREACHABLE[endpoint] = why
    if status is None:
        raise UserError(f"{what}: {field}={ref!r} is a hub id that is not in the hub cache "
                        f"({cache}), and the hub at {endpoint} did not answer within "
                        f"{NETWORK_TIMEOUT:g} s ({why}); {way_out}")
    if status in (401, 403):
        raise UserError(f"{what}: {field}={ref!r}: the hub refuses access to {repo} (HTTP "
                        f"{status}); accept its terms on the hub and log in (hf auth login, or "
                        f"HF_TOKEN), or set {field} to a local {'file' if file else 'folder'}")
    if status == 404:
        raise UserError(f"{what}: {field}={ref!r}: the hub at {endpoint} has no "
                        f"{'file ' + repr(filename) + ' in ' if file else ''}repo {repo!r}; "
                        f"check the name")


def _check_local_ref(path: Path, ref: str, field: str, what: str, file: bool,
                     needs: str | None) -> None:
    if not path.exists():
        raise UserError(f"{what}: {field}={ref!r} does not exist")
    if file and not path.is_file():
        raise UserError(f"{what}: {field}={ref!r} is a folder; give the checkpoint file")
    if not file and not path.is_dir():
        raise UserError(f"{what}: {field}={ref!r} is a file; give the model folder")
    if not file and needs and not (path / needs).is_file():
        raise UserError(f"{what}: {field}={ref!r} has no {needs}, so it is not a saved model "
                        f"folder")
    _check_readable(path if file else path / str(needs), ref, field, what)


def _check_readable(path: Path, ref: str, field: str, what: str) -> None:
    """The file opens (a JSON config also parses): a cut-short copy fails here, not after the
    policy has loaded."""
    if not path.is_file():
        return
    try:
        with open(path, "rb") as fh:
            if path.suffix == ".json":
                json.loads(fh.read())
            else:
                fh.read(1)
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: {field}={ref!r}: cannot read {path} "
                        f"({getattr(err, 'strerror', None) or err})") from None


def check_module(module: str, what: str, extra: str) -> None:
    """An optional dependency is installed (found, not imported: importing costs seconds)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"{what} needs the Python package {module!r}, which is not installed; "
                        f"pip install 'stagerl[{extra}]'")
