import sys

if __name__ == "__main__":
    # Imported here, not at the top: Megatron's checkpoint writer starts a "spawn" helper process,
    # which re-imports this module as __mp_main__; a top-level import would load torch and
    # Megatron in it again (seconds before the first save of every run launched with -m).
    from megatron_ext.cli import main

    sys.exit(main())
