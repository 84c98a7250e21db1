#!/usr/bin/env python3
"""The federated MergeNet server: a Flower SuperLink that runs the app once K clients joined.

    python federated_mergenet_server.py --insecure [--rounds N] [--min-clients K] [run options]
"""

import sys

from fedmergenet.cli import server_main

if __name__ == "__main__":
    sys.exit(server_main())
