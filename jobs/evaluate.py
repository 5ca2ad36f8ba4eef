"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.evaluate [OPTIONS]`.

Same options as `feedrec evaluate --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
