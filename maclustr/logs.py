"""The gateway's log lines: a buffered stderr handler, the text and JSON formats, and the
access log's direct path into the same stream (one line per request, no record built)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable


class TextFormatter(logging.Formatter):
    """The stdlib format with the timestamp string cached per second (strftime per record
    showed up in the per-request profile)."""

    _second = -1
    _clock_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.clock_text(record.created)

    def clock_text(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._clock_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._clock_text


class BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to a buffered stderr. INFO lines (the access log, one per request) are flushed
    by `flush_soon` within 100 ms instead of one write syscall each; warnings and errors
    are flushed at once."""

    def __init__(self) -> None:
        super().__init__(open(sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False,  # noqa: SIM115
                              encoding="utf-8", errors="replace"))
        self._pending = False

    def flush(self) -> None:
        pass  # see flush_now / flush_soon

    def flush_now(self) -> None:
        self._pending = False
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()
        else:
            self.flush_soon()

    def access_writer(self) -> Callable[[str], None]:
        """The access log's own path into this stream: the line a record of
        `maclustr.access` at INFO would print, without building the record."""
        stream = self.stream
        formatter = self.formatter

        def write(line: str) -> None:
            if isinstance(formatter, TextFormatter):
                line = f"{formatter.clock_text(time.time())} INFO maclustr.access {line}"
            stream.write(line + "\n")
            self.flush_soon()

        return write

    def flush_soon(self) -> None:
        if not self._pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_now()
                return
            self._pending = True
            loop.call_later(0.1, self.flush_now)


class JSONFormatter(logging.Formatter):
    """`--log-format json`: every line one JSON object. Access-log records already are one
    (`outcome.access_line`); other records become {time, level, logger, message}."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "maclustr.access":
            return record.getMessage()
        obj = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)  # structured extras (healer.note)
        if isinstance(fields, dict):
            obj.update({k: v for k, v in fields.items() if k not in obj})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def configure_logging(level: str, log_format: str = "text") -> BufferedHandler:
    # The access log writes a record per request: skip what no line shows (the caller's
    # file and line, found by walking the stack; thread and process ids): 2 µs a request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    atexit.register(handler.flush_now)
    return handler
