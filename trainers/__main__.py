"""Worker entry point: `python -m trainers RUN_DIR [--no-resume]` trains the run folder's
config.toml, resuming from its last checkpoint, and prints the adapter path last."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from studio.errors import StudioError

EXIT_CANCELLED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # INFO for the queue's worker.log; `lora-studio train` asks for less (LORA_STUDIO_LOG_LEVEL)
    level = os.environ.get("LORA_STUDIO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainers.trainer import TrainingCancelled
    from trainers.run import train_run

    try:
        path = train_run(args.run_dir, resume=not args.no_resume, show_progress=not args.quiet)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingCancelled as stopped:
        print(f"cancelled: {stopped}", file=sys.stderr)
        return EXIT_CANCELLED
    if path is not None:  # None: a process of a data-parallel run other than the main one
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
