"""``python -m topk_lib.data``: fetch the pinned sources."""

import sys

from topk_lib.data.download import main

sys.exit(main())
