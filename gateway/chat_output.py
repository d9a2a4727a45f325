"""One chat choice's output split into reasoning, content and tool calls: the reasoning parser
(when the server has one) reads first, and the tool parser (tool_choice "auto") reads only
what it leaves as content.

Reasoning goes out under both `reasoning` (current vLLM's name) and `reasoning_content` (its
former name, which many clients still read).
"""

from __future__ import annotations

from typing import Any

from splitserve.gateway.reasoning import REASONING_PARSERS
from splitserve.gateway.tool_parsers import TOOL_PARSERS


class ChoiceOutput:
    """Incremental: `feed` gives one streaming delta's fields; `message` the full message."""

    def __init__(
        self,
        reasoning_parser: str | None,
        tool_parser: str | None,
        *,
        parallel_tool_calls: bool = True,
        include_reasoning: bool = True,
    ) -> None:
        self.reasoning = REASONING_PARSERS[reasoning_parser]() if reasoning_parser else None
        self.tools = TOOL_PARSERS[tool_parser]() if tool_parser else None
        # parallel_tool_calls false: the first call only (later ones are dropped, as in vLLM).
        self.max_calls = None if parallel_tool_calls else 1
        self.include_reasoning = include_reasoning
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def has_calls(self) -> bool:
        return self.tools is not None and bool(self.tools.calls)

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The delta fields for `text` (only the non-empty ones)."""
        reasoning, content = (
            ("", text) if self.reasoning is None else self.reasoning.feed(text, final)
        )
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
            if self.max_calls is not None:
                calls = [d for d in calls if d["index"] < self.max_calls]
        self._reasoning.append(reasoning)
        self._content.append(content)
        out: dict[str, Any] = {}
        if reasoning and self.include_reasoning:
            out["reasoning"] = reasoning
            out["reasoning_content"] = reasoning
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out

    def message(self, prefix: str = "") -> dict[str, Any]:
        """The full message, after the whole output was fed with final=True. `prefix` (echo)
        leads the content."""
        reasoning = "".join(self._reasoning)
        content = prefix + "".join(self._content)
        calls = self.tools.tool_calls()[: self.max_calls] if self.tools is not None else []
        found = calls or (self.reasoning is not None and self.reasoning.found)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": (content or None) if found else content,
            "tool_calls": calls,
        }
        if self.reasoning is not None and self.include_reasoning:
            message["reasoning"] = message["reasoning_content"] = reasoning or None
        return message
