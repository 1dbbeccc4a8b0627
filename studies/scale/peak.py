"""Run one paretoq command in this process and print its wall time and peak resident memory.

    python studies/scale/peak.py -- probe --model DIR --max-memory 0 ...

Prints one JSON line on stderr: {"rc", "seconds", "peak_rss_bytes"} (``ru_maxrss`` of this process).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    from paretoq.cli import main as paretoq

    t = time.time()
    rc = paretoq(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"rc": rc, "seconds": round(time.time() - t, 2), "peak_rss_bytes": peak}), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
