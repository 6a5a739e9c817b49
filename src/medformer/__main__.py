"""`python -m medformer` (used by `torchrun -m medformer ...`)."""

from medformer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
