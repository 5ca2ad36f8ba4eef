"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.serve [OPTIONS]`.

Runs the serving stack in the foreground (as `feedrec serve run`) until the job is stopped.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["serve", "run", *sys.argv[1:]])
