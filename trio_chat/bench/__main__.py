"""``python -m trio_chat.bench COMMAND``: the benchmark's child processes."""

import sys

from ._workers import main

sys.exit(main())
