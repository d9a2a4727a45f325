"""Load formats, sharded and parallel loading, hub revisions, remote code and load-time errors."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.worker import weight_files
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import check_model, load_model
from splitserve.worker.models.registry import MODEL_REGISTRY

from .utils import model_forward

PROMPT = [50, 60, 70, 80]
STEPS = 6


def _load(path, **kwargs):
    return load_model(WorkerConfig(model=str(path), **kwargs))


def _check(path, **kwargs):
    return check_model(WorkerConfig(model=str(path), **kwargs))


def greedy(model, prompt=PROMPT, steps=STEPS) -> list[int]:
    """Greedy tokens by re-running the whole sequence (no KV cache needed)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model_forward(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


@torch.inference_mode()
def hf_greedy(path, prompt=PROMPT, steps=STEPS) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _state(path):
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _write_pt_shards(src, out, n_shards):
    """A sharded .bin checkpoint with pytorch_model.bin.index.json (as transformers 4 wrote)."""
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    state = _state(src)
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        torch.save({n: state[n] for n in part}, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def formats(checkpoint, tmp_path_factory):
    """One tiny model saved as: one safetensors, sharded safetensors, one .bin, sharded .bin."""
    root = tmp_path_factory.mktemp("formats")
    single = checkpoint("fmt_single", seed=7)
    sharded = checkpoint("fmt_sharded", seed=7, max_shard_size="20KB")
    pt = checkpoint("fmt_pt", seed=7, safe=False)
    pt_sharded = _write_pt_shards(single, root / "pt_sharded", 4)
    return {"single": single, "sharded": sharded, "pt": pt, "pt_sharded": pt_sharded}


def test_every_format_gives_transformers_greedy_tokens(formats):
    expected = hf_greedy(formats["single"])
    assert len(set(expected)) > 3  # a degenerate model would hide a wrong load
    runs = {
        ("single", "auto"),
        ("single", "safetensors"),
        ("sharded", "auto"),
        ("sharded", "safetensors"),
        ("pt", "auto"),
        ("pt", "pt"),
        ("pt_sharded", "pt"),
        ("pt_sharded", "auto"),
    }
    for name, fmt in sorted(runs):
        assert greedy(_load(formats[name], load_format=fmt).model) == expected, (name, fmt)
    assert len(list(formats["sharded"].glob("*.safetensors"))) > 2
    assert len(list(formats["pt_sharded"].glob("*.bin"))) == 4


def test_pt_format_ignores_safetensors_and_auto_prefers_them(formats, tmp_path):
    # A folder with both: safetensors of one model, .bin of another.
    both = tmp_path / "both"
    shutil.copytree(formats["single"], both)
    other = _state(formats["single"])
    other = {k: v + 0.05 for k, v in other.items()}
    torch.save(other, both / "pytorch_model.bin")
    from_st = _load(both, load_format="auto").model.model.norm.weight
    from_pt = _load(both, load_format="pt").model.model.norm.weight
    torch.testing.assert_close(from_st, _state(formats["single"])["model.norm.weight"])
    torch.testing.assert_close(from_pt, other["model.norm.weight"])


class _Mkdir:
    """Pickles as a call of os.mkdir: loading it with plain pickle would create `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pt_refuses_a_pickle_that_runs_code(checkpoint, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(checkpoint("fmt_single", seed=7) / "config.json", folder)
    marker = tmp_path / "pwned"
    state = dict(_state(checkpoint("fmt_single", seed=7)))
    state["payload"] = _Mkdir(marker)
    torch.save(state, folder / "pytorch_model.bin")
    for fmt in ("pt", "auto"):
        with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True"):
            _load(folder, load_format=fmt)
        with pytest.raises(ValueError, match=r"refusing to load"):
            _check(folder, load_format=fmt)
    assert not marker.exists()
    # The file really is hostile: an unrestricted unpickle runs the call.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.is_dir()


def test_dummy_reads_no_weight_file(formats, monkeypatch, tmp_path):
    folder = tmp_path / "with_weights"
    shutil.copytree(formats["single"], folder)
    torch.save(_state(formats["single"]), folder / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a weight file was read: {args}")

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(weight_files, "find_weight_files", refuse)
    loaded = _load(folder, load_format="dummy", seed=1)
    assert torch.isfinite(model_forward(loaded.model, PROMPT)).all()
    assert _check(folder, load_format="dummy") == folder.resolve()
    # The patch is live: a real format does go through it.
    with pytest.raises(AssertionError, match="a weight file was read"):
        _load(folder, load_format="auto")


def test_sharded_load_with_one_and_four_workers_is_identical(formats, monkeypatch):
    path = formats["sharded"]
    n_files = len(list(path.glob("*.safetensors")))
    assert n_files >= 6
    active, peak, calls, threads = 0, 0, 0, set()
    lock = threading.Lock()
    barrier = threading.Barrier(4, timeout=30)
    real = weight_files.read_shard

    def tracked(file, kind, wanted):
        nonlocal active, peak, calls
        with lock:
            active += 1
            calls += 1
            peak = max(peak, active)
            threads.add(threading.current_thread().name)
            first_wave = calls <= 4
        if first_wave and threading.current_thread() is not threading.main_thread():
            barrier.wait()  # proves four reads run at once (times out if they do not)
        try:
            return real(file, kind, wanted)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(weight_files, "read_shard", tracked)
    one = _load(path, max_parallel_loading_workers=1).model.state_dict()
    assert peak == 1 and threads == {threading.main_thread().name}
    peak, calls, threads = 0, 0, set()
    four = _load(path, max_parallel_loading_workers=4).model.state_dict()
    assert peak == 4 and len(threads) == 4
    assert one.keys() == four.keys()
    for name in one:
        assert torch.equal(one[name], four[name]), name


def test_progress_bar_only_on_a_terminal(formats, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        _load(formats["sharded"], max_parallel_loading_workers=2)
        n = len(list(formats["sharded"].glob("*.safetensors")))
        text = stream.getvalue()
        assert (f"{n}/{n}" in text and "fmt_sharded (rank 0)" in text) is shown, text


def test_max_parallel_loading_workers_is_checked():
    with pytest.raises(ValueError, match="max_parallel_loading_workers must be at least 1, got 0"):
        WorkerConfig(model="m", max_parallel_loading_workers=0)


# --- hub ids and revisions ---------------------------------------------------------------

COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


@pytest.fixture
def hub_cache(checkpoint, tmp_path, monkeypatch):
    """A hub cache in a download dir with models--tiny-org--tiny/{refs,snapshots}: main and
    v2 hold different weights; the default cache is empty; everything offline."""
    import huggingface_hub.constants

    cache = tmp_path / "downloads"
    repo = cache / "models--tiny-org--tiny"
    for commit, seed in ((COMMIT_MAIN, 1), (COMMIT_V2, 2)):
        shutil.copytree(checkpoint(f"hub_{seed}", seed=seed), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    (repo / "refs" / "v2").write_text(COMMIT_V2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_each_revision_serves_its_own_weights(hub_cache, checkpoint):
    expected = {
        rev: _state(checkpoint(f"hub_{seed}"))["model.embed_tokens.weight"]
        for rev, seed in (("main", 1), ("v2", 2))
    }
    assert not torch.equal(expected["main"], expected["v2"])
    cases = [(None, "main"), ("main", "main"), ("v2", "v2"), (COMMIT_V2, "v2")]
    for revision, which in cases:
        loaded = _load("tiny-org/tiny", revision=revision, download_dir=str(hub_cache))
        assert loaded.path.name == {"main": COMMIT_MAIN, "v2": COMMIT_V2}[which]
        torch.testing.assert_close(loaded.model.model.embed_tokens.weight, expected[which])
        assert greedy(loaded.model) == hf_greedy(loaded.path)
    with pytest.raises(FileNotFoundError, match=r"'tiny-org/tiny' \(revision v3\)"):
        _load("tiny-org/tiny", revision="v3", download_dir=str(hub_cache))
    # Without --download-dir the (empty) default cache is searched.
    with pytest.raises(FileNotFoundError, match="tiny-org/tiny"):
        _load("tiny-org/tiny")


def test_local_folder_ignores_hub_options_with_a_warning(formats, caplog):
    with caplog.at_level(logging.WARNING, logger="splitserve.common.model_path"):
        _load(
            formats["single"],
            revision="v2",
            code_revision="c1",
            download_dir="/nowhere",
            load_format="dummy",
        )
    (record,) = [r for r in caplog.records if "local folder" in r.getMessage()]
    message = record.getMessage()
    assert "--revision v2" in message and "--code-revision c1" in message
    assert "--download-dir /nowhere" in message


# --- remote code -------------------------------------------------------------------------

_CUSTOM_CONFIG = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""


def _custom_folder(src, out, architectures, auto_map=True, model_type="tiny-custom"):
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = architectures
    config["model_type"] = model_type
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_custom.TinyCustomConfig"}
        (out / "configuration_custom.py").write_text(_CUSTOM_CONFIG)
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.safetensors"):
        shutil.copy(f, out)
    return out


def test_remote_code_config_needs_trust_remote_code(formats, tmp_path):
    folder = _custom_folder(formats["single"], tmp_path / "custom", ["LlamaForCausalLM"])
    for fn in (_load, _check):
        with pytest.raises(ValueError, match=r"needs remote code .*--trust-remote-code"):
            fn(folder)
    loaded = _load(folder, trust_remote_code=True)
    assert type(loaded.hf_config).__name__ == "TinyCustomConfig"
    assert greedy(loaded.model) == hf_greedy(formats["single"])


def test_known_model_type_with_config_code_loads_like_transformers(formats, tmp_path):
    # transformers builds a known model_type without the folder's code unless trusted.
    folder = _custom_folder(formats["single"], tmp_path / "k", ["LlamaForCausalLM"], True, "llama")
    assert type(_load(folder, load_format="dummy").hf_config).__name__ == "LlamaConfig"
    trusted = _load(folder, load_format="dummy", trust_remote_code=True)
    assert type(trusted.hf_config).__name__ == "TinyCustomConfig"


def test_unknown_model_type_needs_trust_remote_code(formats, tmp_path):
    folder = _custom_folder(formats["single"], tmp_path / "c", ["LlamaForCausalLM"], False)
    with pytest.raises(ValueError, match=r"model_type 'tiny-custom' is unknown to transformers"):
        _load(folder, load_format="dummy")


def test_trusted_remote_model_still_runs_only_our_implementations(formats, tmp_path):
    folder = _custom_folder(formats["single"], tmp_path / "custom", ["TinyCustomForCausalLM"])
    with pytest.raises(ValueError, match=r"needs remote code"):
        _load(folder)
    with pytest.raises(
        ValueError,
        match=r"unsupported model architecture \['TinyCustomForCausalLM'\]; supported: "
        + re.escape(", ".join(sorted(MODEL_REGISTRY)))
        + r"\. splitserve runs only its own model implementations",
    ):
        _load(folder, trust_remote_code=True)


# --- errors at start-up ------------------------------------------------------------------


def _with_bad_tensor(src, out, name, shape):
    shutil.copytree(src, out)
    state = load_file(out / "model.safetensors")
    state[name] = torch.zeros(shape)
    save_file(state, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    "name,shape,message",
    [
        (
            "model.layers.1.mlp.down_proj.weight",
            (32, 60),
            r"checkpoint tensor model\.layers\.1\.mlp\.down_proj\.weight has shape \(32, 60\), "
            r"the model expects \(32, 64\)",
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            (8, 32),
            r"checkpoint tensor model\.layers\.0\.self_attn\.k_proj\.weight: shard 'k' weight "
            r"has shape \(8, 32\), expected \(16, 32\)",
        ),
    ],
)
def test_tensor_shape_mismatch_is_named(formats, tmp_path, name, shape, message):
    folder = _with_bad_tensor(formats["single"], tmp_path / "bad", name, shape)
    for fn in (_check, _load):
        with pytest.raises(ValueError, match=message):
            fn(folder)


def test_missing_files_are_named(formats, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        _check(tmp_path)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(formats["single"] / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match=r"no weight files in .*--load-format dummy"):
        _check(no_weights)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        _check(no_weights, load_format="safetensors")
    gap = tmp_path / "gap"
    shutil.copytree(formats["sharded"], gap)
    lost = sorted(gap.glob("*.safetensors"))[1]
    lost.unlink()
    for fn in (_check, _load):
        with pytest.raises(
            FileNotFoundError, match=f"lists shard files that are missing: {lost.name}"
        ):
            fn(gap)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _check(tmp_path / "absent" / "x" / "y")


def test_missing_tensor_is_named(formats, tmp_path):
    out = tmp_path / "lacking"
    shutil.copytree(formats["single"], out)
    state = load_file(out / "model.safetensors")
    del state["model.layers.2.post_attention_layernorm.weight"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weights .*layers\.2\.post_attention_layernorm"):
        _check(out)


def test_code_revision_picks_the_config_code_of_a_hub_model(hub_cache, formats):
    """main's weights with the config class of another revision (offline cache)."""
    repo = hub_cache / "models--tiny-org--tiny"
    code_commit = "c" * 40
    for commit, flavour in ((COMMIT_MAIN, "main-code"), (code_commit, "new-code")):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(exist_ok=True)
        config = json.loads((formats["single"] / "config.json").read_text())
        config.update(
            model_type="tiny-custom",
            auto_map={"AutoConfig": "configuration_custom.TinyCustomConfig"},
        )
        (snapshot / "config.json").write_text(json.dumps(config))
        code = _CUSTOM_CONFIG + f"    flavour = {flavour!r}\n"
        (snapshot / "configuration_custom.py").write_text(code)
    (repo / "refs" / "code2").write_text(code_commit)
    dl = str(hub_cache)
    with pytest.raises(ValueError, match="needs remote code"):
        _load("tiny-org/tiny", download_dir=dl, load_format="dummy")
    for code_revision, flavour in ((None, "main-code"), ("code2", "new-code")):
        loaded = _load(
            "tiny-org/tiny",
            download_dir=dl,
            trust_remote_code=True,
            code_revision=code_revision,
        )
        assert loaded.hf_config.flavour == flavour
        assert loaded.path.name == COMMIT_MAIN  # the weights stay at --revision
