import sys

if __name__ == "__main__":
    # Imported here, not at the top: a child process started with multiprocessing's "spawn"
    # method (Megatron's checkpoint writer starts its results manager that way) re-imports this
    # module as __mp_main__, and a top-level import would load torch and Megatron in it again.
    from megatron_ext.cli import main

    sys.exit(main())
