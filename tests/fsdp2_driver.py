"""Runs several ``megatron-ext train`` commands one after the other in one torchrun launch, so the
multi-rank FSDP2 tests pay for one process start. Usage (under torchrun): ``fsdp2_driver.py JSON``
with JSON a list of argument lists; stops at the first run that fails."""

import json
import sys

from megatron_ext.cli import main
from megatron_ext.training import distributed

if __name__ == "__main__":
    # Keep the process group between runs: a second init on torchrun's store would wait on the
    # first one's rendezvous keys. Megatron's groups are still rebuilt by every run.
    shutdown, distributed.shutdown = distributed.shutdown, lambda *args, **kwargs: None
    try:
        for argv in json.loads(sys.argv[1]):
            rc = main(argv)
            if rc:
                sys.exit(rc)
    finally:
        shutdown()
