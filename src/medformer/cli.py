"""The `medformer` command."""


def main(argv=None) -> int:
    raise SystemExit("medformer: command line not built yet")
