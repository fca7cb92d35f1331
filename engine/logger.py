"""Console logging, and ``log.txt``: a copy of everything the run prints, written by the engine alone."""

import logging
import sys
from pathlib import Path


class _Tee:
    """A text stream that writes to the original stream and to the log file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

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
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    return log_path


def restore_streams() -> None:
    """Undo the tee (used by tests that run several trainings in one process)."""
    tees = [getattr(sys, name) for name in ("stdout", "stderr") if isinstance(getattr(sys, name), _Tee)]
    for tee in tees:
        setattr(sys, "stdout" if tee.stream is sys.__stdout__ else "stderr", tee.stream)
    for handler in logging.getLogger("engine").handlers:
        if isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, _Tee):
            handler.setStream(sys.stdout)  # before the file closes: setStream flushes the old stream
    for tee in tees:
        tee.file.close()
