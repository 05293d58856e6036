"""The slice of the Messages API the simulator speaks: request parsing and the error body.

Checks follow the real API where it matters to a client: a malformed request is a 400
`invalid_request_error` whose message names the field, never a framework's 422.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
# A rough tokenizer: about four characters per token for English text and JSON.
CHARS_PER_TOKEN = 4


class ApiError(Exception):
    """An error the simulator answers with, in the Messages API's shape and status code."""

    def __init__(self, status_code: int, error_type: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class Tool:
    name: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class SimRequest:
    model: str
    max_tokens: int
    system_text: str
    # Text of every message, in order, with its role.
    turns: tuple[tuple[str, str], ...]
    tools: tuple[Tool, ...] = ()
    # Set when tool_choice forces a tool ("tool" names it, "any" takes the first).
    forced_tool: Tool | None = None
    output_schema: dict[str, Any] | None = None
    extra_input_chars: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def last_user_text(self) -> str:
        for role, text in reversed(self.turns):
            if role == "user":
                return text
        return ""

    @property
    def user_text(self) -> str:
        return "\n".join(text for role, text in self.turns if role == "user")

    @property
    def prompt_text(self) -> str:
        return "\n".join([self.system_text, *(text for _, text in self.turns)])

    @property
    def input_tokens(self) -> int:
        return estimate_tokens(self.prompt_text) + math.ceil(self.extra_input_chars / CHARS_PER_TOKEN)


def parse_request(body: Any) -> SimRequest:
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens: Field required (an integer of at least 1)")
    if body.get("stream"):
        raise invalid("stream: the development simulator does not stream; send stream=false")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0.0 <= temperature <= 1.0):
        raise invalid("temperature: must be a number between 0 and 1")
    system_text = _system_text(body.get("system"))
    turns = _turns(body.get("messages"))
    tools = _tools(body.get("tools"))
    forced_tool = _forced_tool(body.get("tool_choice"), tools)
    output_schema = _output_schema(body.get("output_config"))
    extra_chars = sum(len(json.dumps(tool.input_schema)) + len(tool.name) for tool in tools)
    if output_schema is not None:
        extra_chars += len(json.dumps(output_schema))
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    return SimRequest(model, max_tokens, system_text, turns, tools, forced_tool, output_schema,
                      extra_chars, metadata or {})


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(_block_text(block, "system") for block in system)
    raise invalid("system: must be a string or a list of text blocks")


def _turns(messages: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: at least one message is required")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid(f"{where}: must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"{where}.role: must be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "\n".join(_block_text(block, f"{where}.content") for block in content)
        else:
            raise invalid(f"{where}.content: must be a string or a list of content blocks")
        turns.append((role, text))
    if turns[0][0] != "user":
        raise invalid("messages: the first message must use the 'user' role")
    return tuple(turns)


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise invalid(f"{where}: each content block needs a 'type'")
    if block["type"] == "text":
        if not isinstance(block.get("text"), str):
            raise invalid(f"{where}: a text block needs 'text'")
        return str(block["text"])
    if block["type"] == "tool_result":
        inner = block.get("content")
        if isinstance(inner, str):
            return inner
        if isinstance(inner, list):
            return "\n".join(_block_text(b, where) for b in inner)
        return ""
    if block["type"] == "tool_use":
        return json.dumps(block.get("input", {}))
    # Images, documents and the like carry no text the simulator could read.
    return ""


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("tools: must be a list")
    tools = []
    for index, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise invalid(f"tools.{index}: must be an object")
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
            raise invalid(f"tools.{index}.name: must match {TOOL_NAME_PATTERN.pattern}")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise invalid(f"tools.{index}.input_schema: must be a JSON schema of type 'object'")
        _check_schema(schema, f"tools.{index}.input_schema")
        tools.append(Tool(name, schema))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools: tool names must be unique")
    return tuple(tools)


def _forced_tool(choice: Any, tools: tuple[Tool, ...]) -> Tool | None:
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice.type: must be one of 'auto', 'any', 'tool', 'none'")
    kind = choice["type"]
    if kind in ("auto", "none"):
        return None
    if not tools:
        raise invalid(f"tool_choice: type '{kind}' needs at least one tool in 'tools'")
    if kind == "any":
        return tools[0]
    name = choice.get("name")
    for tool in tools:
        if tool.name == name:
            return tool
    raise invalid(f"tool_choice.name: no tool named {name!r} in 'tools'")


def _output_schema(output_config: Any) -> dict[str, Any] | None:
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        raise invalid("output_config: must be an object")
    fmt = output_config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid("output_config.format.type: must be 'json_schema'")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise invalid("output_config.format.schema: Field required (a JSON schema object)")
    _check_schema(schema, "output_config.format.schema")
    return schema


def _check_schema(schema: dict[str, Any], where: str) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise invalid(f"{where}: not a valid JSON schema: {exc.message}") from exc
