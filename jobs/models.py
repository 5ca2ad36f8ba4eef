"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.models list|register|
promote|rollback [OPTIONS]`.

Same commands as `feedrec models --help`.
"""

import sys

from feedrec.cli import main

if __name__ == "__main__":
    main(["models", *sys.argv[1:]])
