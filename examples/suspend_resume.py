"""Suspend a vector-search service and resume it lazily in a new process (the main demo).

    python examples/suspend_resume.py [--size MiB] [--requests N] [--json] [--quiet]

Same as `pylazymem demo`: see pylazymem/demo.py for what it does and prints.
"""
import sys

from pylazymem.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
