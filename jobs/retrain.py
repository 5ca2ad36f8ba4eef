"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.retrain [OPTIONS]`.

Same options as `feedrec retrain --help`. Schedule it (cron, Airflow, a Kubernetes CronJob
running `ray job submit`) once per day of new logs; serving started with `--registry` picks up
what it promotes.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["retrain", *sys.argv[1:]])
