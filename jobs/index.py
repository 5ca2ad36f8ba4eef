"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.index [OPTIONS]`.

Same options as `feedrec index --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["index", *sys.argv[1:]])
