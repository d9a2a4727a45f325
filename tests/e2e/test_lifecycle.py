"""--api-key, start-up health and SIGTERM with no orphans, on a second stack."""

from __future__ import annotations

import os

import httpx

from .conftest import Server


def test_api_key_and_clean_sigterm(tiny_model, tmp_path):
    s = Server(tiny_model, ["--api-key", "sekrit"], tmp_path / "serve.log")
    try:
        body = {"model": s.model, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(
            s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}
        )
        assert r.status_code == 401 and r.json()["error"]
        r = httpx.post(
            s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}
        )
        assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/health").status_code == 200
        assert len(s.children) == 4  # tokenizer, worker, scheduler, gateway
    finally:
        code = s.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for pid in s.children:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is reaped by init eventually; a live child is an orphan.
        with open(f"/proc/{pid}/status") as f:
            assert "zombie" in f.read(), f"child {pid} outlived the launcher"
    assert "sekrit" not in (tmp_path / "serve.log").read_text()
