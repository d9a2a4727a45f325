"""Tool calls read out of free text, for tool_choice "auto" (vLLM's `--enable-auto-tool-choice
--tool-call-parser NAME`).

Each parser knows one model family's call markup:
  hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, with
               content around them (Qwen2.5, Qwen3, Hermes).
  llama3_json  the whole output is `{"name": ..., "parameters": {...}}` objects joined by `;`,
               optionally after `<|python_tag|>` (Llama 3.1+ JSON tool calling).
  mistral      `[TOOL_CALLS]` then a JSON array of `{"name": ..., "arguments": {...}}`.

One incremental machine serves both the full response and the stream: `feed(text, final)`
returns the new content and OpenAI tool-call deltas. Its decisions depend on the text, not on
how it was cut, so a stream folds into the full response, with one exception shared with vLLM:
a call's name and arguments start streaming as soon as they read as a call, and if the markup
turns out broken after that (bad JSON inside the arguments, output cut by max_tokens) the streamed
call cannot be taken back, whereas the full response, which sees the whole markup at once, keeps
it as content. Markup that is broken before that point is content in both.

`arguments` is the model's own JSON text of the arguments object, so streamed fragments
concatenate to exactly the full response's string. Whitespace outside the markup next to a call
is not content; with no call at all the content is the output unchanged.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

_SPACE = " \t\r\n"


def held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class _CallObject:
    """Reads one call object, `{"name": "...", "<args key>": {...}}` (keys in either order, each
    once, no others), character by character from `start` in a growing buffer. It fails as
    soon as the text cannot be a call; the whole object is checked with `json.loads` at its end."""

    def __init__(self, start: int, arg_keys: tuple[str, ...]) -> None:
        self.start = start
        self.pos = start
        self.arg_keys = arg_keys
        self.depth = 0
        self.in_str = False
        self.escape = False
        self.expect = "key"  # at depth 1: key, colon, value, sep
        self.keys: set[str] = set()
        self.key: str | None = None
        self.str_start = 0
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.end: int | None = None  # index after the closing brace, once read and valid
        self.failed_at: int | None = None

    @property
    def ready(self) -> bool:
        """Name known and arguments begun: it reads as a call."""
        return self.failed_at is None and self.name is not None and self.args_start is not None

    def arguments(self, buf: str) -> str:
        """The arguments text read so far ("{}" for a finished call that gave none)."""
        if self.args_start is None:
            return "{}" if self.end is not None else ""
        return buf[self.args_start : self.args_end if self.args_end is not None else self.pos]

    def scan(self, buf: str) -> None:
        i = self.pos
        while i < len(buf) and self.end is None and self.failed_at is None:
            if not self._step(buf, i):
                self.failed_at = i
            i += 1
        self.pos = i

    def _step(self, buf: str, i: int) -> bool:
        c = buf[i]
        if self.in_str:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_str = False
                if self.depth == 1:
                    return self._string_end(buf, i)
            return True
        if self.depth == 0:
            self.depth = 1
            return c == "{"
        if self.depth >= 2:  # inside the arguments: structure only, json.loads checks the rest
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self.args_end = i + 1
                    self.expect = "sep"
            return True
        if c in _SPACE:
            return True
        if self.expect == "key":
            self.in_str, self.str_start = c == '"', i
            return c == '"'
        if self.expect == "colon":
            self.expect = "value"
            return c == ":"
        if self.expect == "value":
            if self.key == "name" and c == '"':
                self.in_str, self.str_start = True, i
                return True
            if self.key in self.arg_keys and c == "{":
                self.depth, self.args_start = 2, i
                return True
            return False
        if c == ",":
            self.expect = "key"
            return True
        if c == "}":
            return self._close(buf, i)
        return False

    def _string_end(self, buf: str, i: int) -> bool:
        try:
            value = json.loads(buf[self.str_start : i + 1])
        except json.JSONDecodeError:
            return False
        if self.expect == "key":
            allowed = value == "name" or value in self.arg_keys
            if not allowed or value in self.keys or (value != "name" and self.keys - {"name"}):
                return False
            self.keys.add(value)
            self.key, self.expect = value, "colon"
            return True
        self.name, self.expect = value, "sep"
        return True

    def _close(self, buf: str, i: int) -> bool:
        if self.name is None:
            return False
        try:
            json.loads(buf[self.start : i + 1])
        except json.JSONDecodeError:
            return False
        self.end = i + 1
        return True


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    obj_start: int  # where its object began in the output (which object it is)
    arguments: str = ""  # read so far
    sent: int = 0  # characters of the arguments already streamed


class ToolParser:
    """The shared machine: content outside markup, one `_CallObject` at a time inside it.
    Subclasses give the markup's states in `_advance`."""

    arg_keys: tuple[str, ...] = ("arguments",)
    special_start_tag = False
    """Whether the markup begins with a special token, which detokenization must keep."""

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0
        self.state = "out"
        self.block_start = 0  # where the undecided markup began (content if it breaks early)
        self.obj: _CallObject | None = None
        self.calls: list[_Call] = []
        self._pending_space = ""
        self._space_before = ""
        self._content: list[str] = []
        self._deltas: list[dict[str, Any]] = []
        self._final = False

    # ------------------------------------------------------------------ public

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """Take more output (`final`: it ended); return (new content, new tool-call deltas)."""
        self.buf += text
        self._final = final
        content_before = len(self._content)
        self._deltas = []
        while self._advance():
            pass
        if self.state == "obj" and self.obj is not None and self.obj.ready:
            self._send(self.obj)  # stream the call read so far
        if final and self._pending_space and not self.calls:
            self._content.append(self._pending_space)
        if final:
            self._pending_space = ""
        return "".join(self._content[content_before:]), self._deltas

    @property
    def content(self) -> str:
        return "".join(self._content)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls found so far, as in a full response."""
        out = []
        for sent in self.calls:
            out.append(
                {
                    "id": sent.id,
                    "type": "function",
                    "function": {"name": sent.name, "arguments": sent.arguments},
                }
            )
        return out

    # ------------------------------------------------------------------ helpers for subclasses

    def _advance(self) -> bool:
        raise NotImplementedError

    def _new_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def _text(self, text: str) -> None:
        """Content outside markup; trailing whitespace waits to see what follows it."""
        if not text:
            return
        text = self._pending_space + text
        kept = text.rstrip(_SPACE)
        self._pending_space = text[len(kept) :]
        if kept:
            self._content.append(kept)

    def _skip_space(self) -> bool:
        """Move past whitespace; True when a character follows."""
        while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
            self.pos += 1
        return self.pos < len(self.buf)

    def _open_block(self, at: int) -> None:
        # Whitespace before a call is not content, unless the markup turns out broken.
        self._space_before, self._pending_space = self._pending_space, ""
        self.block_start = at

    def _advance_to_start(self, next_state: str) -> bool:
        """Outside the markup: text up to the opening tag is content (an end of the buffer
        that may begin the tag is held back), then the block opens in `next_state`."""
        buf = self.buf
        j = buf.find(self.START, self.pos)
        if j < 0:
            keep = 0 if self._final else held_suffix(buf[self.pos :], self.START)
            self._text(buf[self.pos : len(buf) - keep])
            self.pos = len(buf) - keep
            return False
        self._text(buf[self.pos : j])
        self._open_block(j)
        self.pos, self.state = j + len(self.START), next_state
        return True

    def _advance_open(self) -> bool:
        """After the opening markup: a call object must follow (spaces allowed)."""
        if not self._skip_space():
            if self._final:
                self._broken(self.block_start)
                return True
            return False
        if self.buf[self.pos] != "{":
            self._broken(self.block_start)
            return True
        self._begin_object()
        return True

    def _begin_object(self) -> None:
        self.obj = _CallObject(self.pos, self.arg_keys)
        self.state = "obj"

    def _read_object(self, after: str) -> bool:
        """Scan the current object; on its end go to state `after`."""
        obj = self.obj
        assert obj is not None
        obj.scan(self.buf)
        if obj.end is not None:
            self._send(obj)
            self.pos, self.obj, self.state = obj.end, None, after
            return True
        if obj.failed_at is not None:
            committed = self._committed(obj)
            self.obj = None
            self._broken(obj.failed_at if committed else self.block_start)
            return True
        if self._final:
            # Cut short: a call already streamed stays; otherwise the markup is content.
            if not self._committed(obj):
                self._broken(self.block_start)
            else:
                self._send(obj)
                self.pos, self.obj, self.state = len(self.buf), None, "done"
            return True
        return False

    def _committed(self, obj: _CallObject) -> bool:
        return bool(self.calls) and self.calls[-1].obj_start == obj.start

    def _send(self, obj: _CallObject) -> None:
        """Stream what is new of `obj`'s call (its header the first time)."""
        if not self.calls or self.calls[-1].obj_start != obj.start:
            call = _Call(self._new_id(), obj.name or "", obj.start)
            self.calls.append(call)
            args = obj.arguments(self.buf)
            call.arguments = args
            call.sent = len(args)
            self._deltas.append(
                {
                    "index": len(self.calls) - 1,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": args},
                }
            )
            return
        call = self.calls[-1]
        args = obj.arguments(self.buf)
        if len(args) > call.sent:
            self._deltas.append(
                {"index": len(self.calls) - 1, "function": {"arguments": args[call.sent :]}}
            )
            call.arguments, call.sent = args, len(args)

    def _broken(self, at: int) -> None:
        """Markup that does not parse: content from `at` (subclasses say how far)."""
        if at == self.block_start:
            self._pending_space = self._space_before + self._pending_space
        self._space_before = ""
        self.pos = at
        self.state = "broken"


class HermesToolParser(ToolParser):
    """`<tool_call>` JSON `</tool_call>` blocks anywhere in the output."""

    START = "<tool_call>"
    END = "</tool_call>"

    def _advance(self) -> bool:
        buf, state = self.buf, self.state
        if state == "out":
            return self._advance_to_start("open")
        if state == "open":
            return self._advance_open()
        if state == "obj":
            return self._read_object("close")
        if state == "close":
            if not self._skip_space():
                if self._final:
                    self.state = "out"
                    return True
                return False
            rest = buf[self.pos : self.pos + len(self.END)]
            if rest == self.END:
                self.pos += len(self.END)
                self.state = "out"
                return True
            if not self._final and self.END.startswith(rest):
                return False
            self._broken(self.pos)
            return True
        if state == "broken":
            # Content through the end tag (when there is one), then outside again.
            j = buf.find(self.END, self.pos)
            if j >= 0:
                self._text(buf[self.pos : j + len(self.END)])
                self.pos, self.state = j + len(self.END), "out"
                return True
            keep = 0 if self._final else held_suffix(buf[self.pos :], self.END)
            self._text(buf[self.pos : len(buf) - keep])
            self.pos = len(buf) - keep
            return False
        return False


class _SequenceToolParser(ToolParser):
    """Calls as a run of objects between separators; broken markup makes the rest content."""

    SEP = ";"
    CLOSE: str | None = None  # what ends the run (None: the end of the output)

    def _advance_sequence(self) -> bool:
        buf, state = self.buf, self.state
        if state == "open":
            return self._advance_open()
        if state == "obj":
            return self._read_object("sep")
        if state == "sep":
            if not self._skip_space():
                if self._final:
                    if self.CLOSE is not None:
                        self._broken(self.pos)
                    else:
                        self.state = "done"
                    return True
                return False
            c = buf[self.pos]
            if c == self.SEP:
                self.pos += 1
                self.block_start, self.state = self.pos, "open"
            elif self.CLOSE is not None and c == self.CLOSE:
                self.pos += 1
                self.state = "out"
            else:
                self._broken(self.pos)
            return True
        if state == "broken":
            self._text(buf[self.pos :])
            self.pos = len(buf)
            return False
        if state == "done":
            return False
        raise AssertionError(state)


class Llama3JsonToolParser(_SequenceToolParser):
    """The output is calls, `{"name": ..., "parameters": {...}}` joined by `;`, optionally after
    `<|python_tag|>`; output that begins otherwise is content."""

    TAG = "<|python_tag|>"
    arg_keys = ("parameters", "arguments")

    def _advance(self) -> bool:
        if self.state != "out":
            return self._advance_sequence()
        stripped = self.buf.lstrip(_SPACE)
        lead = len(self.buf) - len(stripped)
        if stripped.startswith(self.TAG):
            self._open_block(0)
            self.pos, self.state = lead + len(self.TAG), "open"
            return True
        if stripped.startswith("{"):
            self._open_block(0)
            self.pos, self.state = lead, "open"
            return True
        if not self._final and self.TAG.startswith(stripped):
            return False  # empty so far, or a beginning of the tag
        self.state = "broken"  # plain content
        return True


class MistralToolParser(_SequenceToolParser):
    """`[TOOL_CALLS]` then a JSON array of calls; content before and after it."""

    START = "[TOOL_CALLS]"
    special_start_tag = True
    SEP = ","
    CLOSE = "]"
    _ALPHANUM = string.ascii_letters + string.digits

    def _new_id(self) -> str:
        # Mistral's chat templates accept only 9-character alphanumeric call ids.
        return "".join(secrets.choice(self._ALPHANUM) for _ in range(9))

    def _advance(self) -> bool:
        buf = self.buf
        if self.state == "out":
            return self._advance_to_start("array")
        if self.state == "array":
            if not self._skip_space():
                if self._final:
                    self._broken(self.block_start)
                    return True
                return False
            if buf[self.pos] != "[":
                self._broken(self.block_start)
                return True
            self.pos += 1
            self.state = "open"
            return True
        return self._advance_sequence()


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}
