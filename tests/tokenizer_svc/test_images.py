"""Prepare with chat images: `{"type": "image"}` parts plus the image files; the model
folder's processor expands each placeholder and returns the processed pixels, bounded by
--limit-mm-per-prompt and --max-image-pixels."""

from __future__ import annotations

import io
import json

import grpc
import pytest

from splitserve.protos import tokenizer_pb2 as pb
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from tests.models.llava_utils import (
    IMAGE_SIZE,
    NUM_IMAGE_TOKENS,
    build_llava,
    random_image,
    transparent_image,
)

from .test_server import ServerThread


def png(seed: int, size=(40, 34)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava_dir(chatml_dir, tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("tok-llava"), chatml_dir)


@pytest.fixture(scope="module")
def server(llava_dir):
    s = ServerThread(
        TokenizerServiceConfig(
            tokenizer=str(llava_dir), limit_mm_per_prompt='{"image": 2}', max_image_pixels=50_000
        )
    )
    yield s
    s.close()


def chat(n_images: int, text: str = "what is it?") -> str:
    parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return json.dumps([{"role": "user", "content": parts}])


def apply(server, messages: str, images: list[bytes]):
    chat = pb.ChatInput(messages_json=messages, add_generation_prompt=True, images=images)
    (prompt,) = server.stub.Prepare(pb.PrepareRequest(chat=chat), timeout=30).prompts
    return prompt


def test_image_parts_expand_and_carry_pixels(server):
    one = apply(server, chat(1), [png(1)])
    assert "<image>\nwhat is it?" in one.text
    (item,) = one.mm_inputs
    ids = list(one.token_ids)
    image_id = ids[item.offset]
    assert item.length == NUM_IMAGE_TOKENS and ids.count(image_id) == NUM_IMAGE_TOKENS
    assert ids[item.offset : item.offset + item.length] == [image_id] * NUM_IMAGE_TOKENS
    t = item.pixel_values
    assert (t.dtype, list(t.shape)) == ("float32", [3, IMAGE_SIZE, IMAGE_SIZE])
    assert len(t.data) == 4 * 3 * IMAGE_SIZE * IMAGE_SIZE and len(item.hash) == 32
    again = apply(server, chat(1), [png(1)])
    other = apply(server, chat(1), [png(2)])
    assert again.mm_inputs[0].hash == item.hash != other.mm_inputs[0].hash
    two = apply(server, chat(2), [png(1), png(2)])
    a, b = two.mm_inputs
    assert b.offset >= a.offset + a.length and a.hash == item.hash and b.hash != a.hash


@pytest.mark.parametrize(
    "n_parts, images, match",
    [
        (2, [png(1)], "2 image parts but 1 images"),
        (0, [png(1)], "0 image parts but 1 images"),
        (3, [png(1)] * 3, "3 images, more than the limit of 2"),
        (1, [png(1, size=(300, 300))], "more than the limit of 50000"),
        (1, [b"not an image"], "could not be decoded"),
    ],
)
def test_bad_images_are_invalid_argument(server, n_parts, images, match):
    with pytest.raises(grpc.RpcError) as info:
        apply(server, chat(n_parts), images)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in info.value.details()


def test_image_url_parts_must_be_fetched_by_the_caller(server):
    messages = json.dumps(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    )
    with pytest.raises(grpc.RpcError, match="fetched by the gateway"):
        apply(server, messages, [])


def test_text_only_model_refuses_images(chatml_dir):
    s = ServerThread(TokenizerServiceConfig(tokenizer=str(chatml_dir)))
    try:
        with pytest.raises(grpc.RpcError, match="does not take image inputs"):
            apply(s, chat(1), [png(1)])
        with pytest.raises(grpc.RpcError, match="images are not supported by this model"):
            apply(s, chat(1), [])
    finally:
        s.close()


def test_preprocessor_cache_gives_what_the_processor_gives(llava_dir):
    """A prompt whose images are all cached skips the processor; its tokens and images equal
    the processor's, also with the images in other places and another order."""
    s = ServerThread(TokenizerServiceConfig(tokenizer=str(llava_dir)))
    plain = ServerThread(
        TokenizerServiceConfig(tokenizer=str(llava_dir), disable_mm_preprocessor_cache=True)
    )
    try:
        cache = s.server.servicer._images.cache
        assert plain.server.servicer._images.cache is None
        first = apply(s, chat(2, "a b"), [png(1), png(2)])
        assert (cache.hits, cache.misses, len(cache)) == (0, 1, 2)
        for messages, blobs in [
            (chat(2, "a b"), [png(1), png(2)]),
            (chat(2, "other words here"), [png(2), png(1)]),
            (chat(1, "x"), [png(2)]),
        ]:
            hit, ref = apply(s, messages, blobs), apply(plain, messages, blobs)
            assert list(hit.token_ids) == list(ref.token_ids)
            assert list(hit.mm_inputs) == list(ref.mm_inputs)
        assert cache.hits == 3
        assert list(apply(s, chat(2, "a b"), [png(1), png(2)]).mm_inputs) == list(first.mm_inputs)
    finally:
        s.close()
        plain.close()


def test_preprocessor_cache_keeps_within_its_budget():
    from splitserve.protos import common_pb2
    from splitserve.tokenizer_svc.multimodal import ProcessedImageCache

    def item(n: int):
        return common_pb2.MultiModalInput(pixel_values=common_pb2.TensorData(data=b"x" * n))

    cache = ProcessedImageCache(max_bytes=100)
    cache.put(b"a", item(40))
    cache.put(b"b", item(40))
    assert cache.get_all([b"a"]) is not None  # a is now the most recent
    cache.put(b"c", item(40))  # over budget: b (least recent) goes
    assert cache.get_all([b"b"]) is None and cache.get_all([b"a", b"c"]) is not None
    cache.put(b"huge", item(101))  # larger than the whole budget: not kept
    assert cache.get_all([b"huge"]) is None and cache.nbytes == 80


def test_config_checks(chatml_dir):
    with pytest.raises(ValueError, match="mm_processor_cache_gb must be >= 0"):
        TokenizerServiceConfig(tokenizer=str(chatml_dir), mm_processor_cache_gb=-1)
    with pytest.raises(ValueError, match="chat_template_content_format must be one of"):
        TokenizerServiceConfig(tokenizer=str(chatml_dir), chat_template_content_format="xml")


# A llava-hf style template: it loops over content parts and writes the image placeholder.
PARTS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_content_format_is_detected_from_the_template():
    from splitserve.tokenizer_svc.chat import detect_content_format

    assert detect_content_format(PARTS_TEMPLATE) == "openai"
    assert detect_content_format("{% for c in m.content %}{% endfor %}") == "openai"
    chatml = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert detect_content_format(chatml) == "string"
    assert detect_content_format(None) == "string"


@pytest.mark.parametrize("content_format", ["auto", "openai"])
def test_a_template_over_content_parts_gets_parts(llava_dir, content_format):
    s = ServerThread(
        TokenizerServiceConfig(
            tokenizer=str(llava_dir),
            chat_template=PARTS_TEMPLATE,
            chat_template_content_format=content_format,
        )
    )
    try:
        out = apply(s, chat(1), [png(1)])
        assert out.text == "USER: <image>\nwhat is it? ASSISTANT:"
        assert out.mm_inputs[0].length == NUM_IMAGE_TOKENS
        plain = json.dumps([{"role": "user", "content": "hi"}])  # a string becomes one part
        assert apply(s, plain, []).text == "USER: hi ASSISTANT:"
    finally:
        s.close()


def test_string_format_forced_on_a_parts_template_fails_to_place_the_image(llava_dir):
    """--chat-template-content-format string on a template that loops over parts: the
    template sees characters, not parts, so it writes no placeholder; the image count check
    says so instead of sending an image the prompt has no room for."""
    s = ServerThread(
        TokenizerServiceConfig(
            tokenizer=str(llava_dir),
            chat_template=PARTS_TEMPLATE,
            chat_template_content_format="string",
        )
    )
    try:
        with pytest.raises(grpc.RpcError, match="0 image placeholders"):
            apply(s, chat(1), [png(1)])
    finally:
        s.close()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_images_are_composited_on_white_as_transformers_does(server, llava_dir, mode):
    """The pixels the service sends equal transformers' processor output on the same image
    file (the processor composites transparency onto white); the image's colours without
    their alpha give different pixels, so the comparison would catch a dropped channel."""
    import numpy as np
    import transformers
    from PIL import Image

    buf = io.BytesIO()
    transparent_image(mode, seed=7).save(buf, format="PNG")
    (item,) = apply(server, chat(1), [buf.getvalue()]).mm_inputs
    got = np.frombuffer(item.pixel_values.data, dtype=np.float32).reshape(3, IMAGE_SIZE, IMAGE_SIZE)

    processor = transformers.AutoProcessor.from_pretrained(llava_dir).image_processor

    def pixels(image):
        return processor(images=[image], return_tensors="np")["pixel_values"][0]

    np.testing.assert_allclose(got, pixels(Image.open(io.BytesIO(buf.getvalue()))), atol=1e-6)
    # The image really exercises transparency: its colours alone (alpha dropped, and no
    # transparency key left in .info for the processor to honour) give other pixels.
    alpha_dropped = Image.fromarray(
        np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    )
    assert np.abs(got - pixels(alpha_dropped)).max() > 0.1


def test_a_processor_shipped_as_remote_code_needs_trust_remote_code(llava_dir, tmp_path):
    """A model folder whose processor is its own code (MiniMax-VL-01 ships one) loads it only
    with --trust-remote-code, which the tokenizer service passes to transformers."""
    import shutil

    folder = tmp_path / "remote-processor"
    shutil.copytree(llava_dir, folder)
    (folder / "my_processing.py").write_text(
        "from transformers import LlavaProcessor\n\n\n"
        "class RemoteLlavaProcessor(LlavaProcessor):\n"
        "    remote = True\n"
    )
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["processor_class"] = "RemoteLlavaProcessor"
    config["auto_map"] = {"AutoProcessor": "my_processing.RemoteLlavaProcessor"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        ServerThread(TokenizerServiceConfig(tokenizer=str(folder)))
    s = ServerThread(TokenizerServiceConfig(tokenizer=str(folder), trust_remote_code=True))
    try:
        assert getattr(s.server.servicer._images.processor, "remote", False)
        assert apply(s, chat(1), [png(3)]).token_ids
    finally:
        s.close()
