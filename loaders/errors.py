"""What every fastclr command shares about failing: exit statuses and the data error."""
from __future__ import annotations

# Exit status of every fastclr command: 0 done; 1 the work failed (a full disk, non-finite weights, a
# failed write); 2 bad input (options, data, checkpoints, a file list) - fix it and rerun.
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class DataError(RuntimeError):
    """The data cannot be used: every image of a shard unreadable, a file the DALI decoder cannot read,
    a listed file missing. Its message is one line that names the file and the fix; the entry points
    print it without a traceback."""
