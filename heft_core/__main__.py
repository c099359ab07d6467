import sys

from heft_core.cli import main

sys.exit(main())
