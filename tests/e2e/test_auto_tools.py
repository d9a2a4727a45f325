"""tool_choice "auto" through the whole stack (the shared server runs with
--enable-auto-tool-choice --tool-call-parser hermes): the tiny random model is steered by a
regex into writing Hermes call markup, which the real tokenizer and detokenizer carry as text,
and the gateway reads back as tool calls, the same in full and streamed responses."""

from __future__ import annotations

import json

from .test_structured_http import idle

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# Some content, then one call whose city the model picks.
MARKUP = (
    r'(Sure|Ok)\.\n<tool_call>\n\{"name": "book", "arguments": \{"city": "(Paris|Rome|Oslo)"\}\}'
    r"\n</tool_call>"
)


def ask(client, server, **kw):
    return client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "book a trip"}],
        tools=TOOLS,
        max_tokens=120,
        temperature=0.8,
        seed=5,
        extra_body={"guided_regex": MARKUP},
        **kw,
    )


def test_auto_tool_call_full_and_streamed(client, server):
    choice = ask(client, server).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content in ("Sure.", "Ok.")
    (call,) = choice.message.tool_calls
    assert call.function.name == "book"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome", "Oslo")

    content, args, finish = "", "", None
    for chunk in ask(client, server, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    # Same seed: the stream carries the same content and call.
    assert (content, args, finish) == (
        choice.message.content,
        call.function.arguments,
        "tool_calls",
    )
    idle(server)
