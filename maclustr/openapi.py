"""`GET /openapi.json`: an OpenAPI 3.1 description of the gateway's own surface.

Pure. Built per request from the live table, so the `model` enum is always the current
aliases (the gateway also accepts internal ids, which are deliberately not published).
Response schemas are as loose as OpenAI's own objects (extra fields allowed) but exact about
what the gateway guarantees: the error envelope, the list shapes, the health answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import __version__
from .config import RouteTable
from .endpoints import served
from .errors import error_table

_ERR = {"$ref": "#/components/schemas/Error"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERR}}}


def _errors(*codes: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Error responses from the error table (errors.py): the rows with `codes` (all when
    none are named, less `skip`), one entry per status listing each code's meaning."""
    by_status: dict[str, list[str]] = {}
    for r in error_table():
        if (r.code in codes or not codes) and r.code not in skip:
            by_status.setdefault(r.status.upper(), []).append(f"{r.meaning} (`{r.code}`).")
    return {status: _err(" ".join(lines)) for status, lines in by_status.items()}


def error_table_markdown() -> str:
    rows = "".join(f"\n| {r.status} | `{r.code}` | {r.meaning} |" for r in error_table())
    return "| status | code | meaning |\n|---|---|---|" + rows


_AUTH_ERRORS = _errors("invalid_api_key")
_COMPLETION_ERRORS = _errors(skip=("not_found", "method_not_allowed", "internal_error"))


def _anthropic_err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/AnthropicError"}}}}


_MESSAGES_ERRORS = {
    "400": _anthropic_err("Malformed body, or refused by the model server "
                          "(`invalid_request_error`)."),
    "401": _anthropic_err("Missing or invalid key (`authentication_error`)."),
    "404": _anthropic_err("Unknown model alias (`not_found_error`)."),
    "413": _anthropic_err("Body over the size limit (`request_too_large`)."),
    "415": _anthropic_err("Content-Type is not JSON (`invalid_request_error`)."),
    "429": _anthropic_err("The model is busy (`overloaded_error`)."),
    "4XX": _anthropic_err("Other refusals by the model server (`invalid_request_error`)."),
    "502": _anthropic_err("Model server unreachable or failing (`api_error`)."),
    "503": _anthropic_err("The gateway is restarting (`overloaded_error`)."),
    "504": _anthropic_err("The model did not answer in time (`api_error`)."),
}


def _messages_op(request: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": ["inference"],
        "security": [{"bearer": []}, {"apiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {"200": ok, **_MESSAGES_ERRORS},
    }


def _completion_op(ref: str) -> dict[str, Any]:
    return {
        "tags": ["inference"],
        "security": [{"bearer": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        },
        "responses": {
            "200": {
                "description": "The completion: JSON, or Server-Sent Events when "
                               "`\"stream\": true` (chunks, then `data: [DONE]`).",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Completion"}},
                    "text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}},
                },
            },
            **_COMPLETION_ERRORS,
        },
    }


def _schemas(aliases: list[str]) -> dict[str, Any]:
    """components.schemas, group by group (the order is the document's)."""
    model = {"type": "string", "enum": aliases,
             "description": "A public model alias (see GET /v1/models)."}
    return {**_error_schemas(), **_anthropic_request(model),
            **_anthropic_answers(model), **_event_schema(),
            **_openai_schemas(model), **_model_schemas(model), **_health_schema(model)}


def _error_schemas() -> dict[str, Any]:
    """The two error envelopes: OpenAI's, and Anthropic's for /v1/messages."""
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["message", "type", "code", "param"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": ["string", "null"]},
                    "param": {"type": ["string", "null"]},
                },
            }},
        },
        "AnthropicError": {
            "type": "object",
            "required": ["type", "error"],
            "properties": {"type": {"const": "error"}, "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            }},
        },
    }


def _anthropic_request(model: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's Messages API request (count_tokens takes the same)."""
    text_blocks = {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}
    return {
        "MessagesRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "description": "Anthropic's Messages API. Also accepted: tool_use / tool_result "
                           "blocks, role system inside messages, cache_control anywhere; "
                           "thinking, metadata, context_management, output_config are "
                           "ignored.",
            "properties": {
                "model": model,
                "messages": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["role", "content"],
                    "properties": {
                        "role": {"type": "string", "enum": ["user", "assistant"]},
                        "content": {"anyOf": [{"type": "string"}, text_blocks]}}}},
                "system": {"anyOf": [{"type": "string"}, text_blocks]},
                "max_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "top_k": {"type": "integer", "minimum": 0},
                "stop_sequences": {"type": "array", "maxItems": 4,
                                   "items": {"type": "string", "minLength": 1}},
                "stream": {"type": "boolean"},
                "tools": {"type": "array", "items": {
                    "type": "object", "required": ["name", "input_schema"],
                    "properties": {"name": {"type": "string", "minLength": 1},
                                   "description": {"type": "string"},
                                   "input_schema": {"type": "object"}}}},
            },
        },
    }


def _anthropic_answers(model: dict[str, Any]) -> dict[str, Any]:
    """What /v1/messages and /v1/messages/count_tokens answer."""
    return {
        "Message": {
            "type": "object",
            "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
            "properties": {
                "id": {"type": "string"},
                "type": {"const": "message"},
                "role": {"const": "assistant"},
                "model": model,
                "content": {"type": "array", "items": {
                    "type": "object", "required": ["type"],
                    "properties": {"type": {"type": "string",
                                            "enum": ["text", "thinking", "tool_use"]}}}},
                "stop_reason": {"type": "string", "enum": [
                    "end_turn", "max_tokens", "tool_use", "stop_sequence"]},
                "stop_sequence": {"type": ["string", "null"]},
                "usage": {"type": "object", "required": ["input_tokens", "output_tokens"]},
            },
        },
        "TokenCount": {
            "type": "object",
            "required": ["input_tokens"],
            "properties": {"input_tokens": {"type": "integer", "minimum": 1}},
        },
    }


def _event_schema() -> dict[str, Any]:
    """One event of any stream."""
    return {
        "Event": {
            "type": "object",
            "description": "One Server-Sent Event: `data` is a JSON chunk whose `model` is the "
                           "alias, a final `{\"error\": {...}}` envelope, or `[DONE]`.",
            "required": ["data"],
            "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                           "id": {"type": "string"}},
        },
    }


def _openai_schemas(model: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's chat and text completions: the two requests and their one answer."""
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
            "content": {"type": "string"},
        },
    }
    common = {
        "model": model,
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "stop": {"anyOf": [{"type": "string"},
                          {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
    }
    return {
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "description": "Any other OpenAI parameter (top_k, presence_penalty, "
                           "frequency_penalty, logit_bias, tools, response_format, "
                           "stream_options, ...) is passed through to the model unchanged.",
            "properties": {**common,
                           "messages": {"type": "array", "items": message, "minItems": 1}},
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "description": "Other OpenAI parameters are passed through unchanged.",
            "properties": {**common, "prompt": {"type": "string"}},
        },
        "Completion": {
            "type": "object",
            "required": ["object", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string",
                           "enum": ["chat.completion", "text_completion"]},
                "created": {"type": "integer"},
                "model": model,
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": "object"},
            },
        },
    }


def _model_schemas(model: dict[str, Any]) -> dict[str, Any]:
    """/v1/models: one model, the list."""
    return {
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": model,
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "string"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"},
                           "data": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/Model"}}},
        },
    }


def _health_schema(model: dict[str, Any]) -> dict[str, Any]:
    """/health: a list of aliases, or with ?deep=true each model's state."""
    return {
        "Health": {
            "type": "object",
            "required": ["status", "models"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded", "down"]},
                "models": {"anyOf": [
                    {"type": "array", "items": model},
                    {"type": "object",
                     "propertyNames": model,
                     "additionalProperties": {
                         "type": "object",
                         "required": ["status"],
                         "properties": {
                             "status": {"type": "string",
                                        "description": "up, down, or a state such as loading"},
                             "latency_ms": {"type": ["number", "null"]},
                             "placement": {"type": "string",
                                           "description": "only for a model sharded over "
                                                          "several nodes: 'sharded over N "
                                                          "nodes'"},
                         },
                     }},
                ]},
            },
        },
    }


def openapi_document(table: RouteTable) -> dict[str, Any]:
    """The document for this table. Without `public_url` no server is named, so the document
    describes the gateway it was fetched from."""
    aliases = list(table.aliases)
    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1},
                   "description": "A public alias (or an internal id, which answers with "
                                  "the alias)."}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "MacLustr LLM API",
            "version": __version__,
            "description": "OpenAI-compatible gateway in front of the MacLustr MLX models. "
                           "Every error uses the envelope "
                           '{"error": {"message", "type", "code", "param"}}; every code the '
                           "gateway answers with:\n\n" + error_table_markdown(),
        },
        "tags": [{"name": "inference"}, {"name": "models"}, {"name": "meta"}],
        "security": [],
        "paths": _paths(table, model_param),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A key from MACLUSTR_API_KEY."},
                                "apiKey": {"type": "apiKey", "in": "header",
                                           "name": "x-api-key",
                                           "description": "The same key, as Anthropic "
                                                          "clients send it (/v1/messages*)."}},
            "schemas": _schemas(aliases),
        },
    }
    if table.settings.public_url:
        doc["servers"] = [{"url": table.settings.public_url}]
    return doc


# --- one operation per endpoint (endpoints.py), by its `operation` ---------------------------


def _paths(table: RouteTable, model_param: dict[str, Any]) -> dict[str, Any]:
    """Every endpoint the gateway serves for this table, each from its one declaration."""
    paths: dict[str, Any] = {}
    for e in served(table.settings.metrics):
        op = {"summary": e.summary, "operationId": e.operation,
              **OPERATIONS[e.operation](table, model_param)}
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return paths


Operation = Callable[[RouteTable, dict[str, Any]], dict[str, Any]]


def _chat_completion(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return _completion_op("ChatCompletionRequest")


def _completion(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return _completion_op("CompletionRequest")


def _response(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    """Responses API: OpenAI's envelope for errors, the Response object or its events."""
    model = {"type": "string", "enum": list(table.aliases)}
    return {
        "tags": ["inference"],
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["model"],
            "description": "OpenAI's Responses API, stateless: `input` is a string or the "
                           "whole conversation's items; `store`/`previous_response_id` "
                           "are refused (nothing is stored).",
            "properties": {"model": model,
                           "input": {"type": ["string", "array"]},
                           "instructions": {"type": "string"},
                           "stream": {"type": "boolean"},
                           "max_output_tokens": {"type": "integer", "minimum": 1},
                           "tools": {"type": "array", "items": {"type": "object"}}}}}}},
        "responses": {
            "200": {"description": "The Response: JSON, or Server-Sent Events when "
                                   "`\"stream\": true` (`response.created` ... "
                                   "`response.completed`).",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {
                                    "$ref": "#/components/schemas/Event"}}}},
            **_COMPLETION_ERRORS,
        },
    }


def _message(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return _messages_op("MessagesRequest", {
        "description": "The Message: JSON, or Server-Sent Events when `\"stream\": true` "
                       "(`event:` message_start, content_block_start/delta/stop, ping, "
                       "message_delta, message_stop; `error` if it fails mid-way).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Message"}},
            "text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}}}})


def _count_tokens(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return _messages_op("MessagesRequest", {
        "description": "The estimated prompt size.",
        "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/TokenCount"}}}})


def _list_models(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": ["models"],
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "The aliases.", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ModelList"}}}},
            **_AUTH_ERRORS,
        },
    }


def _get_model(table: RouteTable, model_param: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": ["models"],
        "security": [{"bearer": []}],
        "parameters": [model_param],
        "responses": {
            "200": {"description": "The model.", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Model"}}}},
            **_AUTH_ERRORS,
            **_errors("model_not_found", "not_found"),
        },
    }


def _usage(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "`maclustr usage --format json` prints the same rows.",
        "tags": ["meta"],
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "YYYY-MM-DD (UTC) or a number of days like 7d."},
            {"name": "by", "in": "query", "required": False,
             "schema": {"type": "string", "default": "key,model,day"},
             "description": "Comma list of key, model, day."}],
        "responses": {
            "200": {"description": "One object per group: its `by` fields, requests, "
                                   "prompt_tokens, completion_tokens, total_tokens.",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": {"object": {"const": "list"},
                                       "data": {"type": "array",
                                                "items": {"type": "object"}}}}}}},
            **_AUTH_ERRORS,
            **_errors("admin_only", "invalid_request", "not_found"),
        },
    }


def _health(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": ["meta"],
        "parameters": [{"name": "deep", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["true", "false", "1", "0",
                                                              "yes", "no", "generate"]},
                        "description": "Ping each model server; per-alias status. "
                                       "`generate` also asks each replica for one token "
                                       "(`wedged` when none comes) and needs a key. Without "
                                       "a key, replicas show state and latency, not load."}],
        "responses": {
            "200": {"description": "Healthy (all models up when deep).",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Health"}}}},
            "503": {"description": "Deep check: some or all models are down.",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Health"}}}},
            **_AUTH_ERRORS,
        },
    }


def _page(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return {"tags": ["meta"],
            "responses": {"200": {"description": "HTML page.", "content": {
                "text/html": {"schema": {"type": "string"}}}}}}


def _openapi(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    return {"tags": ["meta"],
            "responses": {"200": {"description": "OpenAPI 3.1 document.", "content": {
                "application/json": {"schema": {"type": "object"}}}}}}


def _metrics(table: RouteTable, _: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "Requests, latency, tokens per key, queue and replica state; "
                               "see the README's Monitoring section.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}
    op: dict[str, Any] = {"tags": ["meta"], "responses": responses}
    if not table.settings.metrics_public:
        op["security"] = [{"bearer": []}]
        responses.update(_AUTH_ERRORS)
    return op


OPERATIONS: dict[str, Operation] = {
    "createChatCompletion": _chat_completion, "createCompletion": _completion,
    "createResponse": _response, "createMessage": _message,
    "countMessageTokens": _count_tokens, "listModels": _list_models, "getModel": _get_model,
    "usage": _usage, "health": _health, "page": _page, "openapi": _openapi,
    "metrics": _metrics,
}
