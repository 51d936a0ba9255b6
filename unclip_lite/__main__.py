"""Command line: `python -m unclip_lite course ...` (see course.py)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m unclip_lite course [--preset P] [--artifacts DIR] [--only NN ...]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "course":
        from .course import main as course_main
        return course_main(rest)
    print(f"unknown command {command!r}; the only command is 'course'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
