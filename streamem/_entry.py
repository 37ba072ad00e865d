"""The ``streamem`` console command.

It imports the command line inside ``try``: a Ctrl-C during the imports
(a second or two: Dask, xarray, scikit-learn) ends with one line and exit
status 130, as it does later on (:func:`streamem.cli.main`).
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from streamem.cli import main as cli_main
    except KeyboardInterrupt:
        command = next((word for word in sys.argv[1:] if not word.startswith("-")), "")
        print(f"streamem{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
