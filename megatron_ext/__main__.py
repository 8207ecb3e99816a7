import sys

from megatron_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
