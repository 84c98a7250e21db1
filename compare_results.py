"""Compare the experiment arms: writes report.md, figures, comparison.json/.csv.

Usage: python compare_results.py [RESULT_DIR ...] [--out results/comparison]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmergenet.errors import EXIT_USAGE, UserError
from fedmergenet.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result_dirs", metavar="RESULT_DIR", nargs="*", type=Path,
                        default=[Path("results")],
                        help="run folders, or folders searched for run folders (default: results/)")
    parser.add_argument("--out", type=Path, default=Path("results/comparison"),
                        help="folder for report.md and figures (default: results/comparison)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.result_dirs, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(report.path)
    print(report.conclusion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
