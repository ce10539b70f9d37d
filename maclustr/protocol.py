"""aiohttp's own answers to requests that never reach the app (a header over the limit, a
request line that is not HTTP) in our envelope and with our Server header.

aiohttp builds those in `RequestHandler.handle_error` as text/plain with `Server:
aiohttp/…`; the app's middlewares never see them. `GatewayRunner` serves the app through a
request handler whose `handle_error` answers like every other error of the gateway.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from .errors import GatewayError, HeaderTooLarge, MalformedRequest
from .headers import SERVER, request_id

log = logging.getLogger("maclustr.protocol")  # not the access log: its lines are JSON


def protocol_error(status: int, exc: BaseException | None) -> GatewayError:
    """The envelope for what aiohttp could not parse (4xx) or a failure outside the app's
    error funnel (5xx)."""
    if isinstance(exc, LineTooLong):
        return HeaderTooLarge()
    if 400 <= status < 500:
        return MalformedRequest()
    return GatewayError()


def _reason(exc: BaseException | None, message: str | None) -> str:
    """The parser's complaint as one short printable line (it may quote the client's bytes
    over several lines): never a second log line, never a control byte in the log."""
    text = getattr(exc, "message", None) or str(exc or "") or message or "unparsable"
    first = " ".join(str(text).split("\n", 1)[0].split())[:160].rstrip(":")
    return first.encode("ascii", "backslashreplace").decode("ascii")


class EnvelopeRequestHandler(RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Not aiohttp's: it logs every parser refusal at ERROR with a traceback ("Error
        handling request"), so anyone could fill the log; a refusal is one warning line
        with the request id. A 5xx here is a failure outside the app's funnel: a traceback."""
        err = protocol_error(status, exc)
        rid = request_id(None)
        if err.status >= 500:
            log.error("%s failed outside the error funnel: status=%d", rid, status,
                      exc_info=exc)
        else:
            log.warning("%s refused before routing: status=%d code=%s reason=%s", rid,
                        err.status, err.code, _reason(exc, message))
        if request.writer.output_size > 0:  # as aiohttp's: part of an answer already left
            raise ConnectionError("Response is sent already, cannot send another response "
                                  "with the error message")
        resp = web.Response(body=err.to_body(), status=err.status,
                            headers={"Content-Type": "application/json", "Server": SERVER,
                                     "X-Request-Id": rid, **err.answer_headers()})
        resp.force_close()
        return resp


class EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayServer(EnvelopeServer):
    """The listening socket's protocol factory: the front (front.py) serves the POST
    endpoints; the connections it hands over get aiohttp's request handler."""

    def __init__(self, app: web.Application, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from .app import make_front  # the app's handlers, wired into the front

        self.front = make_front(app, super().__call__)

    def __call__(self) -> Any:
        return self.front()

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        self.front.close_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        await super().shutdown(timeout)
        self.front.close_all()


class GatewayRunner(web.AppRunner):
    """web.AppRunner whose connections answer protocol errors in our envelope, with the
    front serving the POST endpoints."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # starts the app, builds aiohttp's Server
        return GatewayServer(self.app, base.request_handler,
                             request_factory=base.request_factory,
                             handler_cancellation=base.handler_cancellation, **base._kwargs)
