"""Reward server + remote client on loopback: real HTTP, cheap test rewards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards import RewardOutput, build_reward
from stagerl.rewards.remote import encode_png
from stagerl.rewards.server import make_server


class PromptNumber:
    """Score = the integer in the prompt + the mean red value / 255; counts calls."""

    name = "prompt_number"

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls, self.lock = delay, 0, threading.Lock()

    def __call__(self, images, prompts, metadata):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        s = [float(p.split()[-1]) + im.getpixel((0, 0))[0] / 255 for im, p in zip(images, prompts)]
        valid = [not p.startswith("bad") for p in prompts]
        return RewardOutput(torch.tensor(s), torch.tensor(valid),
                            [{"n": len(p), "t": torch.ones(2)} for p in prompts])


@pytest.fixture
def serve():
    servers = []

    def start(rewards, **kw):
        srv = make_server(rewards, port=0, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _img(red: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (red, 0, 0))


def _post(url: str, body: bytes, headers=None) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/score", data=body, method="POST",
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_roundtrip_weights_invalid_and_details(serve):
    srv = serve({"a": PromptNumber(), "b": PromptNumber()})
    assert srv.server_address[0] == "127.0.0.1"
    h = _health(srv.url)
    assert h["status"] == "ok" and h["rewards"] == ["a", "b"]
    fn = build_reward("remote", url=srv.url, rewards="a,b", weights=[1.0, 2.0], batch_size=2)
    out = fn([_img(0), _img(255), _img(0)], ["x 1", "y 2", "bad 3"], [{}, {"k": None}, {}])
    assert out.scores.tolist() == pytest.approx([3.0, 9.0, 9.0])
    assert out.valid.tolist() == [True, True, False]
    assert out.details[1]["scores"] == {"a": 3.0, "b": 3.0}
    assert out.details[0]["a"] == {"n": 3, "t": [1.0, 1.0]}


def test_concurrent_clients_get_their_own_results(serve):
    reward = PromptNumber(delay=0.02)
    srv = serve({"a": reward})
    fn = build_reward("remote", url=srv.url, rewards=["a"], batch_size=3)
    results: dict[int, list[float]] = {}

    def client(k: int) -> None:
        prompts = [f"p {10 * k + j}" for j in range(5)]
        results[k] = fn([_img(0)] * 5, prompts, None).scores.tolist()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {k: v for k, v in results.items()} == {
        k: [float(10 * k + j) for j in range(5)] for k in range(8)}
    assert reward.calls == 8 * 2  # 5 images in chunks of 3 -> 2 requests per client


def test_retry_after_client_timeout_is_not_scored_twice(serve):
    reward = PromptNumber(delay=0.6)
    srv = serve({"a": reward})
    fn = build_reward("remote", url=srv.url, rewards="a", timeout=0.25, retries=6, backoff=0.1)
    out = fn([_img(0), _img(0)], ["p 4", "p 5"], None)
    assert out.valid.all() and out.scores.tolist() == [4.0, 5.0]
    assert reward.calls == 1  # retries joined the running request / hit the stored result
    assert srv.service.computed == 1


def test_bad_requests_get_4xx_and_server_keeps_serving(serve):
    srv = serve({"a": PromptNumber()}, max_request_bytes=20_000, max_batch=2)
    url = srv.url
    good = {"request_id": "r1", "rewards": ["a"], "images": [encode_png(_img(0))],
            "prompts": ["p 1"]}
    cases = [
        (b"x" * 50_000, 413),                                       # oversized body
        (b"{not json", 400),                                        # malformed JSON
        (b"[1, 2]", 400),                                           # not an object
        (json.dumps({**good, "request_id": ""}).encode(), 400),     # no request id
        (json.dumps({**good, "images": ["%%%"]}).encode(), 400),    # bad base64
        (json.dumps({**good, "images": ["aGVsbG8="]}).encode(), 400),  # base64, not a PNG
        (json.dumps({**good, "prompts": []}).encode(), 400),        # length mismatch
        (json.dumps({**good, "rewards": ["nope"]}).encode(), 400),  # unknown reward
        (json.dumps({**good, "images": good["images"] * 3, "prompts": ["p 1"] * 3}).encode(), 413),
    ]
    for body, status in cases:
        code, payload = _post(url, body)
        assert code == status, (body[:60], payload)
        assert payload["error"]
    assert _post(url, b"{}", {"Content-Type": "application/json",
                              "Content-Length": "abc"})[0] in (400, 411)
    code, payload = _post(url, json.dumps(good).encode())
    assert code == 200 and payload["results"]["a"]["scores"] == [1.0]
    # same id, different body -> conflict instead of a wrong cached answer
    code, _ = _post(url, json.dumps({**good, "prompts": ["p 2"]}).encode())
    assert code == 409
    assert _health(url)["status"] == "ok"
    with pytest.raises(UserError, match="does not serve"):
        build_reward("remote", url=url, rewards="zzz")([_img(0)], ["p 1"], None)


def test_unreachable_server_marks_invalid_after_bounded_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fn = build_reward("remote", url=f"http://127.0.0.1:{port}", rewards="a", timeout=1,
                      retries=2, backoff=0.01)
    t0 = time.perf_counter()
    out = fn([_img(0)], ["p 1"], None)
    assert time.perf_counter() - t0 < 5
    assert out.valid.tolist() == [False] and "unreachable" in out.details[0]["error"]


SERVER_SCRIPT = """
import sys, time, torch
from stagerl.rewards import RewardOutput
from stagerl.rewards.server import make_server
ledger, port = sys.argv[1], int(sys.argv[2])

def slow(images, prompts, metadata):
    with open(ledger, "a") as f:
        f.write("start " + ",".join(prompts) + "\\n")
    time.sleep(0.8)
    with open(ledger, "a") as f:
        f.write("done " + ",".join(prompts) + "\\n")
    return RewardOutput(torch.tensor([float(p.split()[-1]) for p in prompts]),
                        torch.ones(len(prompts), dtype=torch.bool), [])

make_server({"slow": slow}, port=port).serve_forever()
"""


def _spawn(script: Path, ledger: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(ledger), str(port)], env=env)
    for _ in range(300):
        try:
            _health(f"http://127.0.0.1:{port}")
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def test_server_killed_mid_request_client_retries_nothing_lost(tmp_path):
    script, ledger = tmp_path / "srv.py", tmp_path / "ledger.txt"
    script.write_text(SERVER_SCRIPT)
    ledger.write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = _spawn(script, ledger, port)
    fn = build_reward("remote", url=f"http://127.0.0.1:{port}", rewards="slow", batch_size=2,
                      timeout=10, retries=30, backoff=0.2, max_backoff=0.5)
    box = {}
    t = threading.Thread(target=lambda: box.update(out=fn([_img(0)] * 4,
                                                          [f"p {k}" for k in range(4)], None)))
    t.start()
    second = None
    try:
        for _ in range(300):  # wait until the first chunk is being scored, then kill -9
            if "start" in ledger.read_text():
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _spawn(script, ledger, port)
        t.join(60)
        assert not t.is_alive()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    out = box["out"]
    assert out.valid.all() and out.scores.tolist() == [0.0, 1.0, 2.0, 3.0]
    lines = ledger.read_text().splitlines()
    done = [ln[5:] for ln in lines if ln.startswith("done ")]
    started = [ln[6:] for ln in lines if ln.startswith("start ")]
    assert sorted(done) == ["p 0,p 1", "p 2,p 3"]  # each chunk scored to completion exactly once
    assert started.count("p 0,p 1") == 2  # the killed attempt, then the retry on the new server


def test_cli_args_and_errors(tmp_path):
    import argparse

    from stagerl.rewards.server import _cli_kwargs, add_cli_args, run_cli

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reward:\n  kwargs:\n    ocr: {batch_size: 4}\n    geneval: {device: cpu}\n")
    args = parser.parse_args(["--rewards", "ocr", "--config", str(cfg),
                              "--reward-kwargs", '{"ocr": {"batch_size": 2}}'])
    assert args.host == "127.0.0.1" and args.port == 8765
    assert _cli_kwargs(args) == {"ocr": {"batch_size": 2}, "geneval": {"device": "cpu"}}
    with pytest.raises(UserError, match="unknown reward"):
        run_cli(parser.parse_args(["--rewards", "no_such_reward"]))
    with pytest.raises(UserError, match="not valid JSON"):
        run_cli(parser.parse_args(["--rewards", "ocr", "--reward-kwargs", "{x"]))
