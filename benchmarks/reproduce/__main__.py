import argparse
import sys

from benchmarks.reproduce.runner import main


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line ``kode: error: reproduce: …``, exit 2, as every other ``kode``
    command says it (kode.cli's parser, kode.errors.error_line). Not imported from kode:
    importing kode loads TensorFlow, seconds before a one-line answer."""

    def error(self, message):
        command = self.prog.removeprefix("kode").strip()
        print(f"kode: error: {command}: {message}", file=sys.stderr)
        sys.exit(2)


sys.exit(main(parser_class=_OneLineParser))
