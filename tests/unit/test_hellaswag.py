"""HellaSwag scoring: acc and acc_norm of a model with known losses."""

from __future__ import annotations

import json

import torch

from gpt2 import hellaswag
from gpt2.tokenizer import ByteTokenizer


class FixedDistributionModel:
    """A 'model' whose next-token distribution is the same everywhere: known losses per byte."""

    probs = {ord(" "): 0.4, ord("a"): 0.4, ord("b"): 0.01, ord("c"): 0.1}

    def __call__(self, tokens):
        p = torch.full((257,), (1 - sum(self.probs.values())) / (257 - len(self.probs)))
        for t, v in self.probs.items():
            p[t] = v
        return p.log().expand(tokens.size(0), tokens.size(1), 257), None


def test_acc_norm_of_a_model_with_known_scores(tmp_path):
    # losses: ' ' and a 0.92, b 4.61, c 2.30 nats. Ending 0 " aaaaaaaab" has the lowest mean loss
    # (1.28/token) and ending 1 " c" the lowest sum (3.22): acc_norm picks 0, acc picks 1.
    path = tmp_path / "hs.jsonl"
    labels = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    path.write_text("".join(json.dumps({"ctx": "ctx", "endings": ["aaaaaaaab", "c", "bb", "cc"], "label": y}) + "\n"
                            for y in labels))
    r = hellaswag.score(FixedDistributionModel(), ByteTokenizer(), path, torch.device("cpu"))
    assert (r.total, r.correct_norm, r.correct) == (10, 7, 3)
    assert r.acc_norm == 0.7 and r.acc == 0.3


def test_the_download_has_a_timeout_and_beats_per_chunk(tmp_path, monkeypatch):
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pytest

    body = b'{"ctx": "x"}\n' * 50_000

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 100_000):  # a trickle: a piece every 0.1 s
                self.wfile.write(body[i:i + 100_000])
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    beats = []
    monkeypatch.setattr(hellaswag, "beat", lambda: beats.append(1))
    try:
        hellaswag.download(f"http://127.0.0.1:{server.server_port}/hs.jsonl", tmp_path / "hs.jsonl")
    finally:
        server.shutdown()
    assert (tmp_path / "hs.jsonl").read_bytes() == body and len(beats) >= 5  # progress as it arrived

    silent = socket.socket()  # accepts the connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    t0 = time.monotonic()
    with pytest.raises(OSError):
        hellaswag.download(f"http://127.0.0.1:{silent.getsockname()[1]}/hs.jsonl", tmp_path / "x", timeout_s=1)
    assert time.monotonic() - t0 < 10
    silent.close()
