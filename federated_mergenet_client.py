#!/usr/bin/env python3
"""A federated MergeNet client: a Flower SuperNode serving one data partition.

    python federated_mergenet_client.py --client_id 0 --device cuda --insecure [--server_address HOST:PORT]
"""

import sys

from fedmergenet.cli import client_main

if __name__ == "__main__":
    sys.exit(client_main())
