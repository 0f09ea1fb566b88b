"""Shared fixtures. Tests run single-threaded (docs/development.md, "Threads": 2 torch threads
beside another process were measured 100x slower)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def make_tiny_policy(seed: int = 0, grid: int = 4, codes: int = 32, d_model: int = 32):
    """A small random-init tiny policy over a random patch codebook (no shipped weights needed)."""
    from stagerl.policies.tiny import PromptVocab, TinyConfig, TinyPolicy
    from stagerl.worlds.shapes.prompts import generate
    from stagerl.worlds.shapes.tokenizer import PatchTokenizer

    g = torch.Generator().manual_seed(seed)
    codebook = torch.randint(0, 256, (codes, 4, 4, 3), generator=g, dtype=torch.uint8)
    tok = PatchTokenizer(codebook, (4 * grid, 4 * grid), 4)
    vocab = PromptVocab.build([ex.prompt for ex in generate(200, seed=0, split="train")])
    cfg = TinyConfig(vocab_size=codes, grid=[grid, grid], prompt_len=16,
                     prompt_vocab_size=len(vocab), d_model=d_model, n_layers=2, n_heads=2,
                     mlp_hidden=2 * d_model)
    torch.manual_seed(seed)
    return TinyPolicy(cfg, tok, vocab)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random-init tiny policy directory, loadable with model.path=<dir>."""
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_policy().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_ops_built(request):
    """Compile DeepSpeed's C++ ops here, without a time limit, when the engine tests run and the
    ops are neither prebuilt (`make test` prebuilds them) nor cached: otherwise the first engine
    test compiles them inside its 600 s subprocess timeout (docs/development.md, "DeepSpeed from
    source")."""
    if not any(item.path.name == "test_engines.py" for item in request.session.items):
        return
    try:
        from stagerl import ds_ops

        ds_ops.pending_builds([])  # imports DeepSpeed
    except ImportError:
        return  # no DeepSpeed: the engine tests skip themselves
    try:
        ds_ops.build_pending()
    except Exception as err:  # noqa: BLE001 - the engine tests then fail with DeepSpeed's message
        import warnings

        warnings.warn(f"compiling DeepSpeed's C++ ops failed: {err}", stacklevel=1)
