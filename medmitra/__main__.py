from medmitra import lazyfiles

lazyfiles.install()   # the one-file binary: unpack heavy parts on first import (a no-op from source)

from medmitra.cli import main  # noqa: E402

raise SystemExit(main())
