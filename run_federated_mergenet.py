#!/usr/bin/env python3
"""One command for a federated MergeNet experiment (simulation by default), the single-machine
baseline, teacher pretraining, or the four-arm comparison suite. See --help and README.md."""

import sys

from fedmergenet.cli import runner_main

if __name__ == "__main__":
    sys.exit(runner_main())
