"""Chat templates: parsing OpenAI messages, rendering, BOS handling, refusals, time bound."""

from __future__ import annotations

import json
import time

import pytest

from splitserve.testing.demo_model import CHATML_TEMPLATE
from splitserve.tokenizer_svc.chat import ChatRenderer, parse_chat_request
from splitserve.tokenizer_svc.errors import InvalidRequest

from .utils import load

USER_HI = json.dumps([{"role": "user", "content": "hi"}])


def render(handle, messages_json=USER_HI, trust=False, timeout_s=5.0, **fields):
    renderer = ChatRenderer(handle, trust_request_chat_template=trust, timeout_s=timeout_s)
    return renderer.render(parse_chat_request(messages_json, **fields))


def test_chatml_with_generation_prompt(handle):
    out = render(handle, add_generation_prompt=True)
    assert out.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out.token_ids == handle.tokenizer.encode(out.prompt, add_special_tokens=False)
    assert out.token_ids[0] == handle.tokenizer.convert_tokens_to_ids("<|im_start|>")
    without = render(handle)
    assert without.prompt == "<|im_start|>user\nhi<|im_end|>\n"


def test_bos_template_does_not_double_bos(bos_handle):
    tok = bos_handle.tokenizer
    assert tok.encode("x")[0] == tok.bos_token_id  # this tokenizer does add BOS to plain text
    out = render(bos_handle)
    assert out.prompt.startswith("<s>[INST] hi [/INST]")
    assert out.token_ids[0] == tok.bos_token_id
    assert out.token_ids.count(tok.bos_token_id) == 1


def test_template_without_bos_gets_none(bos_dir):
    # vLLM's rule for chat: the rendered prompt is tokenized without special tokens, so a
    # template that writes no BOS gets none, even from a tokenizer that adds BOS to text.
    handle = load(bos_dir, chat_template=CHATML_TEMPLATE)
    out = render(handle)
    assert out.prompt.startswith("<|im_start|>user")
    assert handle.tokenizer.bos_token_id not in out.token_ids


def test_content_parts_are_joined(handle):
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
    ]
    out = render(handle, json.dumps(messages))
    assert "<|im_start|>user\none\ntwo<|im_end|>" in out.prompt
    assert out.prompt.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_image_parts_are_refused(handle):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    with pytest.raises(InvalidRequest, match="images are not supported by this model"):
        render(handle, json.dumps(messages))


def test_continue_final_message(handle):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    out = render(handle, json.dumps(messages), continue_final_message=True)
    assert out.prompt.endswith("<|im_start|>assistant\nHel")
    with pytest.raises(InvalidRequest, match="cannot both be set"):
        render(
            handle, json.dumps(messages), continue_final_message=True, add_generation_prompt=True
        )


def test_tools_and_kwargs_reach_the_template(handle):
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% if flavour %}<{{ flavour }}>{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}({{ c.function.arguments.city }}){% endfor %}"
        "{% endfor %}"
    )
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "rain?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
    ]
    out = render(
        handle,
        json.dumps(messages),
        trust=True,
        chat_template=template,
        tools_json=json.dumps(tools),
        chat_template_kwargs_json=json.dumps({"flavour": "mint"}),
    )
    assert out.prompt == "[weather]<mint>user:rain?assistant:(Oslo)"


def test_documents_reach_the_template(handle):
    template = (
        "{% for d in documents or [] %}<{{ d.title }}: {{ d.text }}>{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}"
    )
    docs = [{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]
    out = render(
        handle,
        '[{"role": "user", "content": "q"}]',
        trust=True,
        chat_template=template,
        documents_json=json.dumps(docs),
    )
    assert out.prompt == "<a: x><b: y>user:q"
    for bad in ('{"title": "a"}', '[{"title": 1}]', "[1]"):
        with pytest.raises(InvalidRequest, match="documents must be"):
            render(handle, documents_json=bad)


def test_no_template_is_a_clear_error(no_template_dir):
    handle = load(no_template_dir)
    assert not handle.has_chat_template
    with pytest.raises(InvalidRequest, match="has no chat template"):
        render(handle)
    # The operator's --chat-template fixes it.
    fixed = load(no_template_dir, chat_template=CHATML_TEMPLATE)
    assert render(fixed).prompt == "<|im_start|>user\nhi<|im_end|>\n"


def test_operator_template_from_file(no_template_dir, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    assert render(load(no_template_dir, chat_template=str(path))).prompt == "<hi>"


def test_request_template_refused_unless_trusted(handle):
    with pytest.raises(InvalidRequest, match="does not trust request chat templates"):
        render(handle, chat_template="{{ 'x' }}")
    assert render(handle, trust=True, chat_template="{{ 'x' }}").prompt == "x"


def test_endless_template_is_cut_off(handle):
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match="exceeded 0.3 s"):
        render(handle, trust=True, chat_template=endless, timeout_s=0.3)
    assert time.monotonic() - start < 10  # bounded; the limit itself is 0.3 s
    # The thread is free again and tracing is gone: a normal render still works.
    assert render(handle).prompt.startswith("<|im_start|>user")


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(10**9) %}x{% endfor %}",  # the sandbox refuses the range outright
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ raise_exception('no system messages') }}",
        "{% for %}",
    ],
)
def test_template_errors_are_invalid_argument(handle, template):
    with pytest.raises(InvalidRequest, match="chat template rendering"):
        render(handle, trust=True, chat_template=template, timeout_s=2.0)


@pytest.mark.parametrize(
    "messages_json, match",
    [
        ("not json", "not valid JSON"),
        ("{}", "non-empty JSON array"),
        ("[]", "non-empty JSON array"),
        ('["hi"]', r"messages\[0\] must be an object"),
        ('[{"role": "wizard", "content": "x"}]', r"messages\[0\].role must be one of"),
        ('[{"content": "x"}]', r"messages\[0\].role"),
        ('[{"role": "user"}]', r"messages\[0\].content is required"),
        ('[{"role": "user", "content": 3}]', "must be a string or an array"),
        ('[{"role": "user", "content": [{"type": "text"}]}]', r"content\[0\].text must be"),
        ('[{"role": "user", "content": [{"type": "hologram"}]}]', "not a known content part"),
    ],
)
def test_bad_messages(handle, messages_json, match):
    with pytest.raises(InvalidRequest, match=match):
        render(handle, messages_json)


def test_bad_tools_and_kwargs(handle):
    with pytest.raises(InvalidRequest, match="tools must be"):
        render(handle, tools_json='{"a": 1}')
    with pytest.raises(InvalidRequest, match="chat_template_kwargs must be a JSON object"):
        render(handle, chat_template_kwargs_json="[1]")
    with pytest.raises(InvalidRequest, match="may not set tokenize"):
        render(handle, chat_template_kwargs_json='{"tokenize": true}')


def test_lone_surrogate_and_nul(handle):
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        render(handle, '[{"role": "user", "content": "bad \\ud800 text"}]')
    out = render(handle, '[{"role": "user", "content": "nul \\u0000 byte"}]')
    assert "nul \x00 byte" in out.prompt and out.token_ids


def test_audio_parts_become_the_models_placeholder():
    """An `{"type": "audio"}` part stands for one audio file sent beside the messages; in the
    string content format it is the model's placeholder among the text parts. Unread audio
    parts (`input_audio`, `audio_url`) are refused, as is audio on a model without it."""
    messages = json.dumps(
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio"},
                    {"type": "text", "text": "what?"},
                    {"type": "audio"},
                ],
            }
        ]
    )
    chat = parse_chat_request(messages, audio_placeholder="<A>", image_placeholder="<I>")
    assert chat.num_audio == 2 and chat.num_images == 0
    assert chat.messages[0]["content"] == "<A>\nwhat?\n<A>"
    parts = parse_chat_request(messages, audio_placeholder="<A>", content_format="openai")
    assert [p["type"] for p in parts.messages[0]["content"]] == ["audio", "text", "audio"]
    raw = json.dumps([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    with pytest.raises(InvalidRequest, match="read by the gateway"):
        parse_chat_request(raw, audio_placeholder="<A>")
    with pytest.raises(InvalidRequest, match="audio are not supported by this model"):
        parse_chat_request(messages)
