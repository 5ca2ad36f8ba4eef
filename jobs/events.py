"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.events sink [OPTIONS]`.

Same commands and options as `feedrec events --help`; `sink --follow-s 60 --retain` is the
long-lived compaction job (`ray job stop` ends it after its pass in progress).
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["events", *sys.argv[1:]])
