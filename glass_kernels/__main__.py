"""``python -m glass_kernels``: see glass_kernels.cli."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
