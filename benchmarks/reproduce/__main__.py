import argparse
import sys

from benchmarks.reproduce.runner import main


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line, exit 2, as every other ``kode`` command."""

    def error(self, message):
        print(f"kode reproduce: {message}", file=sys.stderr)
        sys.exit(2)


sys.exit(main(parser_class=_OneLineParser))
