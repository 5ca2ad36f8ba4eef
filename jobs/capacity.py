"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.capacity [OPTIONS]`.

Same options as `feedrec capacity --help`: reads bench/results/*.json, writes docs/capacity.md.
Starts no Ray work of its own (the plan is arithmetic); it is a job so it runs where the bench
results of a cluster run live.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["capacity", *sys.argv[1:]])
