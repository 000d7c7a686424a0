"""omni-runtime: serve Omni engines on one node."""

from __future__ import annotations

import os

from omni_sdk import __version__

# The runtime forks (to start workers) while grpcio's threads run (the gRPC front end, the
# fleet's etcd client): grpcio's fork handlers are for children that go on using gRPC, which
# workers never do, and they crash a child between fork and exec. Off, before any grpc import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__all__ = ["__version__"]
