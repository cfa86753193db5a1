"""``python -m topk_lib.bench``: run a benchmark suite, or one isolated point."""

import sys

from topk_lib.bench.harness import main

sys.exit(main())
