#!/usr/bin/env python
"""Deliver what a run could not send to MLflow (the tracking server was unreachable when it ended).

    python tools/upload_pending.py OUTPUT_DIR [--tracking-uri URI]

Reads OUTPUT_DIR/mlflow_pending.jsonl, re-attaches (or creates, with its params and tags) the run, logs
the metrics it lacks (steps already in the run are skipped, so running it twice is harmless), uploads the
pending artifacts and the final log.txt, sets the final status, and removes the file once all arrived.
"""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # as tools/train_net.py does

from engine.tracking import PENDING_FILE, MLflowTracker, read_pending_file  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--tracking-uri", default="", help="default: the URI the run was logging to")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for delivery")
    args = parser.parse_args(argv)
    pending_path = args.output_dir / PENDING_FILE
    if not pending_path.is_file():
        print(f"nothing to upload: {pending_path} does not exist")
        return 0
    header, items = read_pending_file(pending_path)
    run_id = header.get("run_id") or _read(args.output_dir / "mlflow_run_id")
    tracker = MLflowTracker(args.tracking_uri or header["tracking_uri"], header["experiment"],
                            header.get("run_name", ""), pending_dir=args.output_dir, end_wait=args.timeout)
    # Re-queues the pending file's metrics, artifacts and tags; params and tags apply when the run is new.
    tracker.start(header.get("params", {}), tags=header.get("tags", {}), run_id=run_id)
    if tracker.run_id is None:
        print(f"error: MLflow at {tracker.tracking_uri} is still unreachable; try again later", file=sys.stderr)
        return 1
    tracker.log_artifact(args.output_dir / "log.txt")  # the final log, whatever was queued before
    status = next((item[1] for item in reversed(items) if item[0] == "status"), "FINISHED")
    if not tracker.end(status):
        print(f"error: some records are still undelivered; they stay in {pending_path}", file=sys.stderr)
        return 1
    print(f"uploaded {sum(item[0] == 'metric' for item in items)} metric values to run {tracker.run_id}")
    return 0


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
