"""Console logging, and ``log.txt``: a copy of everything the run prints, written by the engine alone.

The progress bar (``engine.hooks.ProgressBar``) draws on the terminal's stderr and is never copied to
log.txt. While it is on screen, every complete line printed through ``sys.stdout``/``sys.stderr`` (log lines,
warnings, MLflow's messages) first clears the bar and then redraws it below, so no screen line holds both.
"""

import logging
import sys
import threading
from pathlib import Path

_bar = None  # the tqdm bar on the terminal, if any (set by the ProgressBar hook)
_bar_lock = threading.RLock()
LINE_FORMAT = "[%(asctime)s] %(message)s"
TIME_FORMAT = "%m-%d %H:%M:%S"  # month-day: console lines stay within 100 columns


def attach_progress_bar(bar) -> None:
    """Route printed lines around ``bar`` (None detaches it)."""
    global _bar
    with _bar_lock:
        _bar = bar


class _Tee:
    """A text stream that writes to the original stream and to the log file.

    While a progress bar is attached, text is passed on a whole line at a time, with the bar cleared
    before and redrawn after: a partial line would otherwise share the bar's screen line.
    """

    def __init__(self, stream, file):
        self.stream, self.file = stream, file
        self._partial = ""

    def write(self, text):
        self.file.write(text)
        with _bar_lock:
            if _bar is None:
                self._write_through(text)
                return len(text)
            self._partial += text
            if "\n" in self._partial:
                complete, _, self._partial = self._partial.rpartition("\n")
                self._write_around_bar(complete + "\n")
        return len(text)

    def _write_through(self, text):
        if self._partial:  # what was held back while a bar was on screen
            text, self._partial = self._partial + text, ""
        self.stream.write(text)

    def _write_around_bar(self, lines):
        _bar.clear(nolock=True)
        self.stream.write("\r\x1b[2K")  # also erases what the terminal echoed after the bar (^C)
        self.stream.write(lines)
        self.stream.flush()
        _bar.refresh(nolock=True)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... behave like the terminal's stream
        return getattr(self.stream, name)


class _AroundBarHandler(logging.StreamHandler):
    """A console handler whose lines go above the progress bar (the stream is the one current at the start)."""

    def emit(self, record):
        with _bar_lock:
            if _bar is None or isinstance(self.stream, _Tee):  # a tee already writes around the bar
                super().emit(record)
                return
            _bar.clear(nolock=True)
            super().emit(record)
            self.flush()
            _bar.refresh(nolock=True)


def setup_logging(output_dir=None, main_process: bool = True, tee_streams: bool = False) -> Path | None:
    """Send the ``engine`` logger to the console (``sys.stdout`` as it is now) and, on the main process, to
    ``output_dir``/log.txt.

    ``tee_streams`` (the command line asks for it): also copy everything printed through ``sys.stdout`` and
    ``sys.stderr`` (warnings, MLflow's messages, your prints) to log.txt by replacing both streams with a tee
    of the process's own. From Python (a notebook) the streams are left alone: log.txt then holds the engine's
    log lines. ``restore_streams`` undoes either.
    """
    logger = logging.getLogger("engine")
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    _remove_handlers(logger)
    log_path = None
    formatter = logging.Formatter(LINE_FORMAT, datefmt=TIME_FORMAT)
    if output_dir is not None and main_process:
        log_path = Path(output_dir) / "log.txt"
        if tee_streams:
            file = open(log_path, "a", buffering=1)  # line-buffered: a crash still leaves what was printed
            sys.stdout = _Tee(sys.__stdout__, file)
            sys.stderr = _Tee(sys.__stderr__, file)
        else:
            file_handler = _LogFileHandler(log_path)
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)
    handler = _AroundBarHandler(sys.stdout)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return log_path


class _LogFileHandler(logging.FileHandler):
    """log.txt without the streams' tee: every record flushed at once, as the tee's line buffering does."""

    def __init__(self, path):
        super().__init__(path, mode="a", encoding="utf-8")


def _remove_handlers(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if isinstance(handler, _LogFileHandler):
            handler.close()


def restore_streams() -> None:
    """Undo ``setup_logging``: the streams as they were, log.txt closed (at the end of a run; a notebook's next
    run starts from the streams it had)."""
    attach_progress_bar(None)
    tees = [getattr(sys, name) for name in ("stdout", "stderr") if isinstance(getattr(sys, name), _Tee)]
    for tee in tees:
        setattr(sys, "stdout" if tee.stream is sys.__stdout__ else "stderr", tee.stream)
    logger = logging.getLogger("engine")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, _Tee):
            handler.setStream(sys.stdout)  # before the file closes: setStream flushes the old stream
        if isinstance(handler, _LogFileHandler):
            logger.removeHandler(handler)
            handler.close()
    for tee in tees:
        tee.file.close()
