"""Reasoning text split from the answer (vLLM's `--reasoning-parser NAME`): what a reasoning
model writes inside `<think>...</think>` goes to the message's reasoning field, the rest is
content.

  deepseek_r1  the chat template opens `<think>` itself, so the output is reasoning from its
               first character (an opening tag the model writes anyway is dropped) until
               `</think>`; with no closing tag the whole output is reasoning.
  qwen3        reasoning only when the output opens with `<think>` (until `</think>`, or the
               end); output without that tag is all content (thinking turned off).

Incremental like the tool parsers: `feed(text, final)` returns new (reasoning, content), a tag
cut across two pieces is held until it is decided, and the split does not depend on where the
text was cut.
"""

from __future__ import annotations

from splitserve.gateway.tool_parsers import held_suffix

_SPACE = " \t\r\n"


class ReasoningParser:
    START = "<think>"
    END = "</think>"
    reasoning_without_start = True
    """Whether output that does not open with START is reasoning (until END) or content."""

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0
        self.state = "start"
        self.found = False  # some output was read as reasoning

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """Take more output; return the new (reasoning, content)."""
        self.buf += text
        reasoning, content = [], []
        buf = self.buf
        if self.state == "start":
            stripped = buf.lstrip(_SPACE)
            if stripped.startswith(self.START):
                self.pos = len(buf) - len(stripped) + len(self.START)
                self.state = "think"
            elif not final and self.START.startswith(stripped):
                return "", ""  # nothing yet, or the tag's beginning
            else:
                self.state = "think" if self.reasoning_without_start else "content"
        if self.state == "think":
            self.found = True
            j = buf.find(self.END, self.pos)
            if j >= 0:
                reasoning.append(buf[self.pos : j])
                self.pos, self.state = j + len(self.END), "content"
            else:
                keep = 0 if final else held_suffix(buf[self.pos :], self.END)
                reasoning.append(buf[self.pos : len(buf) - keep])
                self.pos = len(buf) - keep
        if self.state == "content":
            content.append(buf[self.pos :])
            self.pos = len(buf)
        return "".join(reasoning), "".join(content)


class DeepSeekR1ReasoningParser(ReasoningParser):
    reasoning_without_start = True


class Qwen3ReasoningParser(ReasoningParser):
    reasoning_without_start = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}
