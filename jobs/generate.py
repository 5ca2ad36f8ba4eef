"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.generate [OPTIONS]`.

Same options as `feedrec generate --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
