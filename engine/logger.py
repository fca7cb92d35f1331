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


def setup_logging(output_dir=None, main_process: bool = True) -> Path | None:
    """Send the ``engine`` logger to stdout; on the main process also copy stdout and stderr to log.txt."""
    logger = logging.getLogger("engine")
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    log_path = None
    if output_dir is not None and main_process:
        log_path = Path(output_dir) / "log.txt"
        file = open(log_path, "a", buffering=1)  # line-buffered: a crash still leaves what was printed
        sys.stdout = _Tee(sys.__stdout__, file)
        sys.stderr = _Tee(sys.__stderr__, file)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LINE_FORMAT, datefmt=TIME_FORMAT))
    logger.addHandler(handler)
    return log_path


def restore_streams() -> None:
    """Undo the tee (at the end of a run, and in tests that run several trainings in one process)."""
    attach_progress_bar(None)
    tees = [getattr(sys, name) for name in ("stdout", "stderr") if isinstance(getattr(sys, name), _Tee)]
    for tee in tees:
        setattr(sys, "stdout" if tee.stream is sys.__stdout__ else "stderr", tee.stream)
    for handler in logging.getLogger("engine").handlers:
        if isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, _Tee):
            handler.setStream(sys.stdout)  # before the file closes: setStream flushes the old stream
    for tee in tees:
        tee.file.close()
