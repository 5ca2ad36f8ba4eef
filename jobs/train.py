"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.train [OPTIONS]`.

Same options as `feedrec train --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
