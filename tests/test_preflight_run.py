"""What a training run touches is checked before the policy loads: every reward's packages,
checkpoints and server, and the tracker. A problem is one ``stagerl: error:`` line, exit code 2,
nothing created, and (under a multi-process launch) printed once. No test reaches a real network:
the hub is either forbidden (HF_HUB_OFFLINE=1) or a closed local port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from stagerl import cli, preflight, trainer
from stagerl.errors import UserError
from stagerl.rewards.base import RewardSet
from stagerl.tracking import check_tracker

GENEVAL_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
GENEVAL_CLIP = "openai/clip-vit-large-patch14"


def _closed_port() -> int:
    """A local port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty hub cache; the hub itself a closed local port (never the real one)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    return tmp_path / "hf" / "hub"


def _cache(hub: Path, repo: str, files: dict[str, str]) -> None:
    """A hub-cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c0ffee")
    for name, text in files.items():
        (root / "snapshots" / "c0ffee").mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / "c0ffee" / name).write_text(text)


def _one_line(err: UserError) -> str:
    text = str(err)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------------
# Hub-backed rewards


def test_offline_hub_id_is_one_line_naming_reward_id_and_way_out(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        RewardSet(["geneval"]).preflight()
    msg = _one_line(info.value)
    assert "reward 'geneval'" in msg and GENEVAL_DETECTOR in msg
    assert "reward.kwargs.geneval.checkpoint" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "not in the hub cache" in msg


def test_unreachable_hub_is_one_line_too(empty_hub):
    with pytest.raises(UserError) as info:
        RewardSet(["geneval"]).preflight()
    msg = _one_line(info.value)
    assert GENEVAL_DETECTOR in msg and os.environ["HF_ENDPOINT"] in msg
    assert "did not answer" in msg and "HF_HUB_OFFLINE=1" in msg


def test_a_cached_copy_passes_offline(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache(empty_hub, GENEVAL_DETECTOR, {"config.json": "{}"})
    with pytest.raises(UserError) as info:  # the detector is cached, its colour model is not
        RewardSet(["geneval"]).preflight()
    assert "color_checkpoint" in str(info.value) and GENEVAL_CLIP in str(info.value)
    _cache(empty_hub, GENEVAL_CLIP, {"config.json": "{}"})
    RewardSet(["geneval"]).preflight()


class _Hub(BaseHTTPRequestHandler):
    """A stand-in hub: HEAD /<repo>/resolve/main/<file> answers with the status in the repo name."""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(int(self.path.split("/")[2].split("-")[1]))
        self.send_header("Location", "/elsewhere")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_what_the_hub_answers(empty_hub, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")

    def check(repo: str) -> None:
        preflight.check_hub_ref(repo, "reward.kwargs.x.checkpoint", "reward 'x'")

    try:
        check("org/status-302")  # the hub would serve it: downloaded when the reward loads
        check("org/status-200")
        with pytest.raises(UserError, match="has no repo 'org/status-404'"):
            check("org/status-404")
        with pytest.raises(UserError, match=r"refuses access.*HF_TOKEN"):
            check("org/status-401")
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_file_reward_names_its_file(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        RewardSet(["hps"]).preflight()
    msg = _one_line(info.value)
    assert "reward 'hps'" in msg and "xswu/HPSv2:HPS_v2.1_compressed.pt" in msg
    assert "HF_HUB_OFFLINE=1" in msg


def test_a_janus_hub_id_is_checked_like_a_reward_checkpoint(empty_hub, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = SimpleNamespace(kind="janus", path="deepseek-community/Janus-Pro-1B", tiny_random=False)
    with pytest.raises(UserError) as info:
        preflight.check_model_path(model)
    msg = _one_line(info.value)
    assert "model.path='deepseek-community/Janus-Pro-1B'" in msg and "HF_HUB_OFFLINE=1" in msg
    _cache(empty_hub, model.path, {"config.json": '{"model_type": "janus"}'})
    preflight.check_model_path(model)


def test_a_local_model_folder_must_be_a_saved_model(tmp_path):
    (tmp_path / "clip").mkdir()
    kwargs = {"clip_score": {"checkpoint": str(tmp_path / "clip")}}
    with pytest.raises(UserError, match="no config.json"):
        RewardSet(["clip_score"], kwargs).preflight()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "cl')  # cut short
    with pytest.raises(UserError, match="cannot read"):
        RewardSet(["clip_score"], kwargs).preflight()
    (tmp_path / "clip" / "config.json").write_text("{}")
    RewardSet(["clip_score"], kwargs).preflight()


def test_a_new_reward_declares_what_it_needs(monkeypatch):
    """The hook is the reward's own: a registered reward with ``preflight`` is checked."""
    from stagerl.rewards import base

    calls = []

    class Needy:
        name = "needy_test"

        def preflight(self) -> None:
            calls.append("checked")
            raise UserError("reward 'needy_test': its server is down")

        def __call__(self, images, prompts, metadata):  # pragma: no cover - never scored
            raise AssertionError

    monkeypatch.setitem(base._REGISTRY, "needy_test", Needy)
    with pytest.raises(UserError, match="needy_test"):
        RewardSet(["shapes_strict", "needy_test"]).preflight()
    assert calls == ["checked"]


# --------------------------------------------------------------------------------------------------
# The remote reward's server


class _Health(BaseHTTPRequestHandler):
    served: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"status": "ok", "rewards": self.served}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_remote_reward_server_refusing_connections_is_one_line():
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(UserError) as info:
        RewardSet(["remote"], {"remote": {"url": url, "rewards": ["geneval"]}}).preflight()
    msg = _one_line(info.value)
    assert "reward 'remote'" in msg and url in msg and "stagerl reward-server" in msg


def test_remote_reward_server_must_serve_the_rewards():
    handler = type("Handler", (_Health,), {"served": ["ocr"]})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(UserError, match="serves ocr, not geneval"):
            RewardSet(["remote"], {"remote": {"url": url, "rewards": ["geneval"]}}).preflight()
        RewardSet(["remote"], {"remote": {"url": url, "rewards": ["ocr"]}}).preflight()
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# The tracker


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """An installed-looking ``wandb`` (found, never imported by the check); no key anywhere."""
    (tmp_path / "site" / "wandb").mkdir(parents=True)
    (tmp_path / "site" / "wandb" / "__init__.py").write_text("raise ImportError('not here')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_wandb_not_installed_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import machinery: "not installed"
    with pytest.raises(UserError, match=r"stagerl\[wandb\]"):
        check_tracker(True)
    check_tracker(False)  # not asked for: nothing to check


def test_wandb_without_key_says_how_to_run_offline(fake_wandb, monkeypatch):
    with pytest.raises(UserError) as info:
        check_tracker(True)
    msg = _one_line(info.value)
    assert "log.wandb=true" in msg and "WANDB_MODE=offline" in msg and "wandb login" in msg
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_tracker(True)


def test_wandb_with_key_but_no_server_fails_fast(fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(UserError, match="did not answer.*WANDB_MODE=offline"):
        check_tracker(True)


# --------------------------------------------------------------------------------------------------
# The command line: one line, exit 2, nothing made, the model never loaded


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(trainer, "build_policy", refuse)


@pytest.mark.parametrize("case", ["offline_hub", "wandb", "remote"])
def test_train_fails_before_the_model_loads(case, tmp_path, empty_hub, monkeypatch, capsys,
                                            no_model_load):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {"offline_hub": ["reward.names=[geneval]"],
            "wandb": ["log.wandb=true"],
            "remote": ["reward.names=[remote]", "reward.kwargs={remote: {url: "
                       f"'http://127.0.0.1:{_closed_port()}', rewards: [geneval]}}}}"]}[case]
    out = tmp_path / "runs"
    code = cli.main(["train", f"run.out_dir={out}", *args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stagerl: error: "), captured.err
    assert {"offline_hub": "geneval", "wandb": "log.wandb", "remote": "reward 'remote'"}[case] \
        in lines[0]
    assert captured.out == ""
    assert not out.exists()


def test_other_ranks_stay_quiet_and_leave_the_line_for_the_launcher(tmp_path, monkeypatch,
                                                                     capsys):
    codes, waits = [], []
    monkeypatch.setattr(cli, "hard_exit", codes.append)
    # A rank other than 0 waits before exiting, so that the launcher does not stop rank 0 before
    # it has printed the line (a race seen under torchrun when rank 1 got there first).
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        cli.main(["train", f"run.out_dir={tmp_path / 'runs'}", "reward.names=[nope]"])
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == (0 if rank == "1" else 1), lines
        line = json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"]
        assert line.startswith("stagerl: error: unknown reward 'nope'")
        assert waits == [cli.LATE_RANK_GRACE_S], waits  # rank 1 waited; rank 0 did not
    assert codes == [2, 2]


def test_a_crash_under_a_launcher_leaves_its_traceback_for_the_summary(tmp_path, monkeypatch):
    def bug(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_config", bug)
    monkeypatch.setattr(cli, "hard_exit", lambda code: None)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError):
        cli.main(["config"])
    saved = json.loads((tmp_path / "error.json").read_text())["message"]
    assert "RuntimeError: a bug" in saved["extraInfo"]["py_callstack"]


def test_two_process_launch_prints_the_error_once(tmp_path):
    """torchrun: each rank meets the error before any collective; rank 0 prints it, every rank
    exits 2, and the launcher's summary carries the line. torchrun itself then exits 1 with its
    own block (docs/janus.md, "When a launch fails")."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stagerl", "train", f"run.out_dir={out}", "reward.names=[geneval]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    ours = [line for line in text.splitlines() if line.startswith("stagerl: error:")]
    assert len(ours) == 1, text[-3000:]
    assert "reward 'geneval'" in ours[0] and "HF_HUB_OFFLINE" in ours[0]
    assert proc.returncode == 1  # torchrun's own code for any failed child
    # The root cause is a rank that exited 2 with our line (a rank still importing when another
    # failed may instead be stopped by the launcher's SIGTERM).
    root = text.split("Root Cause (first observed failure):", 1)[1]
    assert "exitcode  : 2" in root, text[-3000:]
    assert "traceback : stagerl: error: reward 'geneval'" in root
    assert not out.exists()
