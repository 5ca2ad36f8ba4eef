"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.logs_import [OPTIONS]`.

Same options as `feedrec logs import --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["logs", "import", *sys.argv[1:]])
