"""What reaches the log from a client is escaped and clipped, and no error class floods the log.

- `shown(value)`: a client's value (a path, a model name, a field name, a header) as it may appear in a
  log line or an error message: repr()-escaped (newlines, control characters and lone surrogates come
  out as escapes, so a value cannot forge a log line) and cut to `ECHO_CHARS` characters.
- `LogGuard`: a logging filter for the process's handlers. Whatever a call site forgot, it escapes
  control characters in every message; a traceback keeps its lines, each prefixed with `  | ` (an
  exception's message may quote a client's text: no line of it can pass for a record of its own),
  clips a message to `MAX_LINE_CHARS`, and lets at most `burst` warnings or errors of one kind
  (logger, level, message template and exception type) through per `window` seconds; the first
  record of a kind in the next window says how many were suppressed. Info records (one line per
  response) are not rate-limited: they are bounded by the requests served, like an access log.
- `Collapsed`: for event storms that are not log records yet (failed accept() calls, connections
  refused past the cap): one line per kind per `LOG_WINDOW_S`, with a count of what was held back.
"""

from __future__ import annotations

import logging
import re
import threading
import time

ECHO_CHARS = 64           # at most this much of a client's value is quoted (in bodies and logs)
MAX_LINE_CHARS = 2000     # and no log message is longer than this (its traceback aside)
MAX_TRACEBACK_CHARS = 20000
LOG_WINDOW_S = 10.0       # Collapsed: repeated events of one kind, one log line per window
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown(value, limit: int = ECHO_CHARS) -> str:
    """repr() of a client's value cut to `limit` characters (control characters and lone surrogates
    come out escaped, so the result is one printable line)."""
    text = repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def escape_line(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """One log line: control characters escaped, at most `limit` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class LogGuard(logging.Filter):
    """Escapes and clips every record's message and rate-limits records of one kind (see the module)."""

    def __init__(self, burst: int = 5, window: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple, list] = {}  # kind -> [window start, records in it, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_llada_guarded", False):  # one record through several handlers
            return record._llada_pass
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        if record.levelno < logging.WARNING and exc is None:
            record._llada_guarded, record._llada_pass = True, True
            self._escape(record, 0)
            return True
        kind = (record.name, record.levelno, str(record.msg)[:200], exc)
        now = self.clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None or now - state[0] >= self.window:
                suppressed = state[2] if state is not None else 0
                state = self._kinds[kind] = [now, 0, 0]
                if len(self._kinds) > 10000:  # bounded memory under many kinds
                    self._kinds = {kind: state}
            else:
                suppressed = 0
            state[1] += 1
            ok = state[1] <= self.burst
            if not ok:
                state[2] += 1
        record._llada_guarded, record._llada_pass = True, ok
        if not ok:
            return False
        self._escape(record, suppressed)
        return True

    def _escape(self, record: logging.LogRecord, suppressed: int) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        message = escape_line(message)
        if suppressed:
            message += f" [{suppressed} similar message(s) suppressed in the last {self.window:g} s]"
        record.msg, record.args = message, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if len(text) > MAX_TRACEBACK_CHARS:
                text = text[:MAX_TRACEBACK_CHARS // 2] + "\n...\n" + text[-MAX_TRACEBACK_CHARS // 2:]
            record.exc_text = "\n".join("  | " + escape_line(line, MAX_LINE_CHARS) for line in text.splitlines())


def install(guard: LogGuard | None = None, loggers=("", "uvicorn", "uvicorn.error", "uvicorn.access")) -> LogGuard:
    """Put one LogGuard on every handler of the root logger and uvicorn's loggers (call it after
    logging is configured)."""
    guard = guard or LogGuard()
    for name in loggers:
        for h in logging.getLogger(name).handlers:
            if guard not in h.filters:
                h.addFilter(guard)
    return guard


class Collapsed:
    """Repeated events of one kind logged at most once per window: the first at once, the rest as
    a count on the next line after the window (so a storm writes a line per window, not per event)."""

    def __init__(self, window: float = LOG_WINDOW_S):
        self.window = window
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def should_log(self, key: str) -> tuple[bool, int]:
        """(log this one?, how many were held back since the last line)."""
        now = time.monotonic()
        if key in self.last and now - self.last[key] < self.window:
            self.held[key] = self.held.get(key, 0) + 1
            return False, 0
        self.last[key] = now
        return True, self.held.pop(key, 0)
