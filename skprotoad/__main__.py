"""``python -m skprotoad``: the command line, see :mod:`skprotoad.cli`."""

import sys

_EXIT_INTERRUPTED = 130


def main():
    """Run the command line; Ctrl-C while torch is still being imported exits
    130 quietly, like Ctrl-C during a command."""
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("\nskprotoad: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
