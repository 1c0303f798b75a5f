from medmitra import lazyfiles

lazyfiles.install()   # the one-file binary: unpack heavy parts on first import (a no-op from source)

import sys  # noqa: E402

if getattr(sys, "frozen", False):
    # In the one-file binary, the model's child process (medmitra/llm/process.py) is this
    # executable again: freeze_support() runs it and exits before the CLI is imported.
    import multiprocessing

    multiprocessing.freeze_support()

from medmitra.cli import main  # noqa: E402

raise SystemExit(main())
