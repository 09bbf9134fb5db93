"""Request fields that constrain the output, translated into `SamplingParams.structured_outputs`.

OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and vLLM's extra fields: the
`structured_outputs` object (StructuredOutputsParams' fields) and the older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (with `guided_whitespace_pattern`). At most one
constraint per request; every error is a ProtocolError (400) whose `param` names the field at fault.
The grammar engine's own check of the spec runs later, when the engine takes the request
(`structured_param` tells the route which field to name if it refuses).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.structured.params import StructuredOutputsParams

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class StructuredError(ValueError):
    """A constraint field the API refuses (protocol.py turns it into a ProtocolError: 400 with `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Constraint:
    """The output constraint a request asked for, and the request field it came from."""
    params: StructuredOutputsParams
    param: str


def _build(param: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except (TypeError, ValueError) as e:
        raise StructuredError(f"{param}: {e}", param) from None


def from_response_format(rf) -> StructuredOutputsParams | None:
    """OpenAI's response_format: None for text (no constraint)."""
    if not isinstance(rf, dict):
        raise StructuredError("response_format must be an object with a `type`", "response_format")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _build("response_format", json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise StructuredError("response_format of type json_schema needs a `json_schema` object "
                                  "(with `name` and `schema`)", "response_format.json_schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise StructuredError("response_format.json_schema.name must be a string",
                                  "response_format.json_schema.name")
        schema = js.get("schema", {})       # OpenAI: no schema means any JSON object is fine
        if not isinstance(schema, (dict, bool)):
            raise StructuredError("response_format.json_schema.schema must be a JSON schema (an object)",
                                  "response_format.json_schema.schema")
        if schema in ({}, True):
            return _build("response_format.json_schema.schema", json_object=True)
        return _build("response_format.json_schema.schema", json=schema)
    raise StructuredError(f"response_format.type must be one of text, json_object, json_schema; got {kind!r}",
                          "response_format.type")


def constraint(response_format=None, structured_outputs=None, guided: dict | None = None,
               whitespace_pattern: str | None = None) -> Constraint | None:
    """The one constraint a request sets (None when it sets none); two or more is a 400 naming the second."""
    found: list[Constraint] = []
    if response_format is not None:
        params = from_response_format(response_format)
        if params is not None:
            found.append(Constraint(params, "response_format"))
    if structured_outputs is not None:
        try:
            found.append(Constraint(StructuredOutputsParams.from_dict(structured_outputs), "structured_outputs"))
        except (TypeError, ValueError) as e:
            raise StructuredError(str(e), "structured_outputs") from None
    for field, kind in GUIDED.items():
        value = (guided or {}).get(field)
        if value is not None:
            kw = {kind: value}
            if whitespace_pattern is not None and kind == "json":
                kw["whitespace_pattern"] = whitespace_pattern
            found.append(Constraint(_build(field, **kw), field))
    if len(found) > 1:
        raise StructuredError(f"give at most one output constraint; this request sets "
                              f"{', '.join(c.param for c in found)}", found[1].param)
    if whitespace_pattern is not None and not (found and found[0].param == "guided_json"):
        raise StructuredError("guided_whitespace_pattern only applies with guided_json", "guided_whitespace_pattern")
    return found[0] if found else None
