"""Encoder-output cache: time to first token for an image the engine has encoded before (a
cache hit) against an image it has not (encoded in the request), same run, same model.

    python bench/mm_cache.py            # a LLaVA with a 224 px, 6-layer 384-wide CLIP tower
    python bench/mm_cache.py --small    # a quick run on a tiny one

Both requests of a pair have new words in front of the image, and prefix caching is off, so
the KV cache serves neither: the only difference is whether the vision tower runs. Without
the encoder cache every request would pay the miss, so miss/hit is what the cache saves on a
repeated image. Requests run one at a time (`max_tokens=1`, the in-process engine); pairs
alternate hit and miss; medians over `--pairs`. The outputs of a hit and of a miss on the
same image are checked to be the same token before anything is timed.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time


def build(out: pathlib.Path, small: bool) -> tuple[pathlib.Path, int]:
    """A random LLaVA-1.5 checkpoint with a processor; returns (folder, image size)."""
    import torch
    import transformers

    from splitserve.testing.demo_model import build_tokenizer

    size, patch = (30, 6) if small else (224, 14)
    width, layers = (32, 2) if small else (384, 6)
    tok = transformers.AutoTokenizer.from_pretrained(build_tokenizer(out / "tok"))
    tok.add_tokens(["<image>"], special_tokens=True)
    vision = transformers.CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(width // 64, 2),
        image_size=size,
        patch_size=patch,
        projection_dim=width,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tok) + 23,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    folder = out / "llava"
    transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return folder, size


def image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()

    from splitserve import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        path, size = build(pathlib.Path(tmp), args.small)
        llm = LLM(str(path), kv_cache_memory=64 << 20, enable_prefix_caching=False)
        params = SamplingParams(max_tokens=1, temperature=0)
        words = iter(range(10**6))

        def ttft(img) -> tuple[float, list[int]]:
            prompt = f"request {next(words)} looks at <image> and says"
            t0 = time.perf_counter()
            out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, params)
            return time.perf_counter() - t0, out[0].outputs[0].token_ids

        seen = image(0, size)
        mm = llm.engine.executor.runner.mm
        # The same words and image twice: encoded the first time, held the second (prefix
        # caching is off, so the KV is computed again): the answers must agree.
        same = {"prompt": "same words <image> again", "multi_modal_data": {"image": seen}}
        first = llm.generate(same, params)[0].outputs[0].token_ids
        encoded = mm.num_encoded
        assert llm.generate(same, params)[0].outputs[0].token_ids == first, "hit != miss"
        assert mm.num_encoded == encoded, "the repeated image was encoded again"
        ttft(seen)  # warm-up
        fresh_seeds = iter(range(1, 10**6))
        hits, misses = [], []
        for _ in range(args.pairs):
            before = mm.num_encoded
            hits.append(ttft(seen)[0])
            assert mm.num_encoded == before, "the repeated image was encoded again"
            misses.append(ttft(image(next(fresh_seeds), size))[0])
            assert mm.num_encoded == before + 1
        llm.shutdown()
    hit, miss = statistics.median(hits) * 1e3, statistics.median(misses) * 1e3
    tokens = mm.model.num_image_tokens
    print(f"image {size}px, {tokens} image tokens; medians of {args.pairs} pairs")
    print(f"TTFT, image held (encoder cache hit): {hit:.1f} ms")
    print(f"TTFT, image not held (encoded)      : {miss:.1f} ms")
    print(f"miss / hit = {miss / hit:.2f}")


if __name__ == "__main__":
    main()
