"""Command line: ``python -m fastattn demo``."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastattn",
        description="fastattn: fused scaled dot-product attention for NumPy on the CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the lecture notes' worked examples through fastattn and the reference")
    demo.add_argument("--plot", metavar="DIR",
                      help="also write the examples' figures as PNG files into DIR (needs matplotlib)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from fastattn.demo.console import run_demo

        return run_demo(plot_dir=args.plot)
    return 2


if __name__ == "__main__":
    sys.exit(main())
