"""The client's request body: what we accept, and the one field we change going upstream.

Pure. The body must be a JSON object with a non-empty string `model`; every other field is
forwarded as the client sent it (re-encoded, values unchanged), except `stream_options`, whose
`include_usage` is made explicit. `n` > 1 is refused (the model servers answer one choice).
"""

from __future__ import annotations

from typing import Any

from . import jsonfast
from .errors import BadRequest, InvalidJSON, UnsupportedMediaType

# curl -d sends form-urlencoded and some SDKs send text/plain; the body is JSON all the same.
_ACCEPTED_TYPES = frozenset({"", "application/json", "text/plain",
                             "application/x-www-form-urlencoded"})


def check_content_type(content_type: str) -> None:
    """`content_type` is the media type without parameters, lower case ("" when absent)."""
    if content_type not in _ACCEPTED_TYPES and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type '{content_type[:60]}' is not supported; send application/json."
        )


def parse_request(body: bytes) -> dict[str, Any]:
    """Decode and validate; the returned dict has a non-empty str `model`."""
    if not body.strip():
        raise InvalidJSON("Request body is empty; expected a JSON object.")
    try:
        payload = jsonfast.loads(body)
    except (ValueError, RecursionError):
        raise InvalidJSON("Request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            f"Request body must be a JSON object, not {_json_type(payload)}."
        )
    model = payload.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, not {_json_type(model)}.", param="model")
    if not model.strip():
        raise BadRequest("'model' must not be empty.", param="model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        # mlx_lm.server refuses it too; checking here keeps the relay's stream/unary choice
        # in step with what the upstream will do.
        raise BadRequest("'stream' must be a boolean.", param="stream")
    _check_n(payload.get("n"))
    _normalise_stream_options(payload)
    return payload


def _check_n(n: object) -> None:
    """mlx_lm.server ignores `n` and answers one choice: refuse rather than silently return
    fewer choices than asked for (fanning out n requests would multiply the load)."""
    if n is None or (n == 1 and not isinstance(n, bool)):
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadRequest("'n' must be a positive integer.", param="n")
    raise BadRequest(f"'n' = {n} is not supported: this gateway returns one choice per "
                     "request. Send n = 1 (or omit it) and make several requests.", param="n")


def _normalise_stream_options(payload: dict[str, Any]) -> None:
    """As OpenAI: `stream_options` only with `stream: true`. mlx_lm.server reads
    `stream_options["include_usage"]` after the content has streamed, so an object without
    it must never reach it bare: the flag is made explicit."""
    opts = payload.get("stream_options")
    if opts is None:
        return
    if payload.get("stream") is not True:
        raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is "
                         "enabled.", param="stream_options")
    if not isinstance(opts, dict):
        raise BadRequest(f"'stream_options' must be an object, not {_json_type(opts)}.",
                         param="stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean.",
                         param="stream_options")
    opts["include_usage"] = usage


def upstream_body(payload: dict[str, Any], internal_model: str) -> bytes:
    """The same request with `model` set to the internal id (mlx_lm.server loads what it names).

    The dict is modified in place: the caller owns it and is done with the client's value.
    """
    payload["model"] = internal_model
    return jsonfast.dumps(payload)  # lone surrogates: the stdlib writes them escaped


def ask_for_usage(payload: dict[str, Any]) -> bool:
    """Make a stream request ask the upstream for its usage event, and say whether the client
    asked for it itself (when not, the relay strips it from what the client sees). Runs after
    `parse_request` (which refuses a malformed or non-stream `stream_options`).

    Why always ask: the metrics count tokens on every request, and a stream reports them only
    in that event. mlx_lm.server (0.32.2, `handle_completion`) sends it when
    `stream_options["include_usage"]` is true, just before `data: [DONE]`, as
    `{"object": "chat.completion", "choices": [], "usage": {...}}` on both completion paths
    (so the gateway relabels it `chat.completion.chunk`); it reads the key with `[...]`, so a
    bare `stream_options: {}` raises after the last token and the stream ends without
    `[DONE]`. The payload is modified in place.
    """
    if not wants_stream(payload):
        return False
    opts = payload.get("stream_options") or {}
    asked = opts.get("include_usage") is True
    payload["stream_options"] = {**opts, "include_usage": True}
    return asked


def wants_stream(payload: dict[str, Any]) -> bool:
    return payload.get("stream") is True


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    for kind, name in ((dict, "an object"), (list, "an array"), (str, "a string"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "a value"
