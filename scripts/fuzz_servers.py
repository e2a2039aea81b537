#!/usr/bin/env python
"""A longer run of the fuzz suite (tests/test_fuzz.py): random and hostile
requests against a real JSON-lines server, a real HTTP server and the
Python API, on the tiny test model. Each case must get an answer in its
protocol's shape; the servers must live, stay within 100 MB of where they
started, and answer a normal request after.

    python scripts/fuzz_servers.py              # 20 times the CI run's cases
    python scripts/fuzz_servers.py --scale 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=20, help="times the CI run's case counts (500, 400, 400)")
    args = p.parse_args()
    env = {**os.environ, "EDGEINFER_FUZZ_SCALE": str(args.scale)}
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "0",
                          str(ROOT / "tests" / "test_fuzz.py")], cwd=ROOT, env=env)
    cases = {"JSON lines": 500 * args.scale, "HTTP": 400 * args.scale, "Python API": 400 * args.scale}
    print(f"{'passed' if rc == 0 else 'FAILED'}: up to {', '.join(f'{v:,} {k}' for k, v in cases.items())} "
          f"cases in {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
