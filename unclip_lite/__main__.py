"""Command line: `python -m unclip_lite course ...` (course.py) and `python -m unclip_lite train STAGE ...`
(commands.py)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m unclip_lite course [--preset P] [--artifacts DIR] [--only NN ...]\n"
              "       python -m unclip_lite train STAGE [--preset P] [--artifacts DIR] [--set PATH=VALUE ...]\n"
              "(each command's --help says more)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "course":
        from .course import main as course_main
        return course_main(rest)
    if command == "train":
        from .commands import train_main
        return train_main(rest)
    print(f"unknown command {command!r}; the commands are 'course' and 'train'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
