"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.demo [OPTIONS]`.

Same options as `feedrec demo --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["demo", *sys.argv[1:]])
