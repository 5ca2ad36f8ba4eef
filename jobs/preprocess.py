"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.preprocess [OPTIONS]`.

Same options as `feedrec preprocess --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["preprocess", *sys.argv[1:]])
