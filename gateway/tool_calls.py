"""Forced tool calls on chat: `tool_choice` "required" or a named function becomes a JSON
schema constraint, and the constrained output becomes OpenAI `tool_calls`.

A named function constrains the output to that function's parameter schema: the whole output
is the call's arguments. "required" constrains it to a JSON array of at least one
`{"name": ..., "parameters": ...}` object, one `anyOf` branch per tool (the `$defs` of every
tool's parameters hoisted to the root so that their `$ref`s still resolve). "auto" leaves the
output free and reads calls out of it afterwards (gateway/tool_parsers.py), which needs the
server started with --enable-auto-tool-choice --tool-call-parser NAME; without them it is refused.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from splitserve.gateway.errors import bad_request
from splitserve.gateway.structured import Source, schema_text

_DEF_KEYS = ("$defs", "definitions")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolMode:
    """How the output turns into tool calls: one named function, or an array of calls."""

    function: str | None
    """The forced function's name; None for "required"."""


def tool_constraint(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    auto_parser: str | None = None,
) -> tuple[ToolMode, Source] | None:
    """The constraint that forces tool calls, or None when the output stays free text.
    `auto_parser`: the server's tool-call parser for "auto" (None: "auto" is refused)."""
    params = _tool_parameters(tools)
    choice = tool_choice
    if choice is None:
        if not params:
            return None
        choice = "auto"
    if choice == "none":
        return None
    if choice == "auto":
        if not params or auto_parser is not None:
            return None
        raise bad_request(
            "tool_choice 'auto' (the default when tools are given) needs the server started "
            "with --enable-auto-tool-choice --tool-call-parser NAME; otherwise use tool_choice "
            '\'required\', a named function ({"type": "function", "function": {"name": ...}}), '
            "or 'none'",
            "tool_choice",
        )
    if choice == "required":
        if not params:
            raise bad_request("tool_choice 'required' needs at least one tool in tools", "tools")
        schema = _required_schema(params, parallel_tool_calls)
        spec = schema_text(schema, "tools", "tools")
        return ToolMode(None), Source("tool_choice 'required'", "tool_choice", "json", spec)
    name = _named_choice(choice)
    if name not in params:
        known = ", ".join(map(repr, list(params)[:10])) or "none"
        raise bad_request(
            f"tool_choice names function {name[:64]!r}, which is not in tools (tools: {known})",
            "tool_choice",
        )
    spec = schema_text(params[name], f"tools function {name!r} parameters", "tools")
    return ToolMode(name), Source(f"tool_choice function {name!r}", "tool_choice", "json", spec)


def _tool_parameters(tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Function name -> parameter schema, with every tool's shape checked."""
    out: dict[str, Any] = {}
    for k, tool in enumerate(tools or []):
        where = f"tools[{k}]"
        if tool.get("type", "function") != "function":
            raise bad_request(f"{where}.type must be 'function'", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}.function.name must be a non-empty string", "tools")
        if name in out:
            raise bad_request(f"{where}: function name {name[:64]!r} is given twice", "tools")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = _EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON schema object", "tools")
        out[name] = parameters
    return out


def _named_choice(choice: Any) -> str:
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return name


def _required_schema(params: dict[str, Any], parallel_tool_calls: bool | None) -> dict[str, Any]:
    hoisted: dict[str, dict[str, Any]] = {}
    branches = []
    for name, parameters in params.items():
        parameters = copy.deepcopy(parameters)
        for key in _DEF_KEYS:
            defs = parameters.pop(key, None)
            if defs is None:
                continue
            if not isinstance(defs, dict):
                raise bad_request(f"function {name!r}: parameters.{key} must be an object", "tools")
            into = hoisted.setdefault(key, {})
            for def_name, definition in defs.items():
                if def_name in into and into[def_name] != definition:
                    raise bad_request(
                        f"functions define {key} entry {def_name[:64]!r} differently; "
                        "tool_choice 'required' needs them to agree",
                        "tools",
                    )
                into[def_name] = definition
        branches.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    schema.update(hoisted)
    return schema


# ----------------------------------------------------------------------------- output


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(slots=True)
class _Call:
    id: str = field(default_factory=new_tool_call_id)
    name: str | None = None
    arguments: str | None = None  # complete arguments text
    partial: str = ""  # arguments text seen so far (while incomplete)
    sent_header: bool = False
    sent: int = 0  # characters of the arguments already streamed


class ToolCallParser:
    """Turns one sequence's constrained text into tool calls, incrementally: `feed` returns
    OpenAI streaming `tool_calls` deltas, `calls` the complete list for the full response.
    Streamed arguments concatenate to exactly the full response's arguments."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self._calls: list[_Call] = []
        self._scan = _ArrayScanner() if mode.function is None else None
        if mode.function is not None:
            self._calls.append(_Call(name=mode.function))

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        if self._scan is None:
            call = self._calls[0]
            call.partial = self.text.strip()
        else:
            self._scan.feed(text, self._calls)
        return self._deltas()

    def finish(self) -> list[dict[str, Any]]:
        """The last deltas; the sequence ended."""
        if self._scan is None:
            self._calls[0].arguments = self.text.strip()
        return self._deltas()

    @property
    def complete(self) -> bool:
        """The output parsed as a whole: one named call, or a closed array of calls."""
        if self._scan is None:
            return True
        return self._scan.done and not self._scan.error and bool(self._calls)

    def calls(self) -> list[dict[str, Any]]:
        """The tool calls of the full response (named ones only)."""
        return [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c)},
            }
            for c in self._calls
            if c.name is not None
        ]

    def _deltas(self) -> list[dict[str, Any]]:
        out = []
        for index, call in enumerate(self._calls):
            if call.name is None:
                continue  # arguments wait until the name is known
            args = _arguments(call)
            new = args[call.sent :]
            if not call.sent_header:
                call.sent_header = True
                call.sent = len(args)
                out.append(
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": new},
                    }
                )
            elif new:
                call.sent = len(args)
                out.append({"index": index, "function": {"arguments": new}})
        return out


def _arguments(call: _Call) -> str:
    return call.arguments if call.arguments is not None else call.partial


class _ArrayScanner:
    """An incremental reader of `[{"name": ..., "parameters": ...}, ...]`: it tracks nesting and
    strings character by character and cuts out each element's name and parameters text."""

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0
        self.depth = 0
        self.in_str = False
        self.escape = False
        self.done = False
        self.error = False
        self._key: str | None = None
        self._key_start: int | None = None
        self._value_key: str | None = None
        self._value_start: int | None = None

    def feed(self, text: str, calls: list[_Call]) -> None:
        self.buf += text
        buf = self.buf
        for i in range(self.pos, len(buf)):
            if self.error or self.done and not buf[i].isspace():
                self.error = True
                break
            self._step(buf, i, buf[i], calls)
        self.pos = len(buf)
        if self._value_key == "parameters" and self._value_start is not None and calls:
            calls[-1].partial = buf[self._value_start :].strip()

    def _step(self, buf: str, i: int, c: str, calls: list[_Call]) -> None:
        if self.in_str:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_str = False
                if self._key_start is not None:
                    self._key = json.loads(buf[self._key_start : i + 1])
                    self._key_start = None
            return
        if c == '"':
            self.in_str = True
            if self.depth == 2 and self._value_start is None:
                self._key_start = i
            return
        if c in "[{":
            if (self.depth == 0 and c != "[") or (self.depth == 1 and c != "{"):
                self.error = True
                return
            if self.depth == 1:
                calls.append(_Call())
                self._key = self._value_key = self._value_start = None
            self.depth += 1
            return
        if c in "]}":
            if self.depth == 2:
                self._end_value(buf, i, calls)
            self.depth -= 1
            if self.depth == 0:
                self.done = True
            return
        if self.depth == 2:
            if c == ":":
                self._value_key, self._value_start = self._key, i + 1
            elif c == ",":
                self._end_value(buf, i, calls)
        elif self.depth <= 1 and not c.isspace() and c != ",":
            self.error = True

    def _end_value(self, buf: str, end: int, calls: list[_Call]) -> None:
        if self._value_start is None:
            return
        text = buf[self._value_start : end].strip()
        call = calls[-1]
        if self._value_key == "name":
            try:
                name = json.loads(text)
            except json.JSONDecodeError:
                name = None
            if isinstance(name, str):
                call.name = name
            else:
                self.error = True
        elif self._value_key == "parameters":
            call.arguments = text
        self._key = self._value_key = self._value_start = None
