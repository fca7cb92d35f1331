"""The outcome of each ``make gpu-check`` line, and the one table they make at the end.

Each check returns a ``Verdict`` (PASS, FAIL or SKIPPED, with what it measured); ``Table.run`` times it, turns an
exception into a FAIL line (the other checks still run), and prints the line as soon as it is known. ``finish``
prints the whole table, writes it to a file and returns the exit code: 1 when any line failed, else 0.
"""

import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"


@dataclass(frozen=True)
class Verdict:
    status: str  # PASS, FAIL or SKIPPED
    detail: str  # what was measured, against what


def verdict(passed: bool, detail: str) -> Verdict:
    return Verdict(PASS if passed else FAIL, detail)


def skipped(why: str) -> Verdict:
    return Verdict(SKIPPED, why)


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str
    detail: str
    seconds: float


class Table:
    """Collects the outcome of every line; ``stream`` receives each line as it ends."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.outcomes: list[Outcome] = []

    def run(self, name: str, check, *args) -> Outcome:
        """``check(*args) -> Verdict``; an exception is a FAIL of this line with its type and message."""
        started = time.monotonic()
        try:
            result = check(*args)
        except Exception as error:  # a check that breaks is a failed line, and the next ones still run
            last = traceback.extract_tb(error.__traceback__)[-1]
            result = Verdict(FAIL, f"{type(error).__name__}: {error} ({Path(last.filename).name}:{last.lineno})")
        return self.add(Outcome(name, result.status, result.detail, time.monotonic() - started))

    def add(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        print(format_line(outcome), file=self.stream, flush=True)
        return outcome

    @property
    def failed(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status == FAIL]


def format_line(outcome: Outcome, width: int = 50) -> str:
    return f"{outcome.status:<8}{outcome.name:<{width}}{outcome.seconds:>6.0f} s  {outcome.detail}"


def render(outcomes: list[Outcome], header: str = "") -> str:
    """The table: a header line (the machine), one line per check, and the count of each status."""
    width = max([len(outcome.name) for outcome in outcomes] + [len("line")]) + 2
    lines = [header] if header else []
    lines.append(f"{'status':<8}{'line':<{width}}{'time':>8}  detail")
    lines += [format_line(outcome, width) for outcome in outcomes]
    counts = {status: sum(outcome.status == status for outcome in outcomes) for status in (PASS, FAIL, SKIPPED)}
    lines.append(", ".join(f"{count} {status}" for status, count in counts.items()))
    return "\n".join(lines) + "\n"


def finish(table: Table, path: Path, header: str = "") -> int:
    """Print the table, write it to ``path``; the exit code: 1 if a line failed, else 0."""
    text = render(table.outcomes, header)
    print("\n" + text, file=table.stream, end="", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"gpu-check: the table is in {path}", file=table.stream, flush=True)
    return 1 if table.failed else 0
