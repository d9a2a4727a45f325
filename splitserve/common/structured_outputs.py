"""`StructuredOutputsParams`: vLLM's in-process structured-output options, as one GrammarSpec.

Torch-free. Exactly one of json, regex, choice, grammar, json_object must be set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's `StructuredOutputsParams` shape)."""

    json: str | dict | None = None
    """A JSON schema (text or a dict) the output must validate against."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF (xgrammar / GBNF) or Lark (guidance) grammar."""
    json_object: bool | None = None
    """Any JSON object."""
    backend: str | None = None
    """xgrammar, guidance or auto; None takes the engine's guided_decoding_backend."""
    whitespace_pattern: str | None = None
    """Regex for whitespace between JSON tokens (guidance backend)."""

    def __post_init__(self) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, regex, choice, grammar, "
                f"json_object; got {', '.join(kinds) or 'none'}"
            )
        if self.backend is not None and self.backend not in ("xgrammar", "guidance", "auto"):
            raise ValueError(f"backend must be xgrammar, guidance or auto, got {self.backend!r}")

    def kinds(self) -> list[str]:
        """The constraint fields that are set."""
        fields = ("json", "regex", "choice", "grammar")
        set_ = [k for k in fields if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        return set_

    def to_proto(self):
        """The `common.v1.GrammarSpec` the compiler takes."""
        from splitserve.protos import common_pb2

        (kind,) = self.kinds()
        if kind == "json":
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json)
        elif kind == "choice":
            spec = json.dumps(list(self.choice))
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        return common_pb2.GrammarSpec(
            kind=kind,
            spec=spec,
            backend=self.backend or "",
            whitespace_pattern=self.whitespace_pattern or "",
        )
