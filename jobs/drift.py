"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.drift [OPTIONS]`.

Same options as `feedrec drift --help`. Exit status 3 when a feature or prediction crosses the
PSI alert threshold (the job then shows as FAILED: that is the alert), 0 otherwise.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["drift", *sys.argv[1:]])
