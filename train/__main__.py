"""`python -m train` is `python -m train.trainer`."""

import sys

from train.trainer import main

sys.exit(main())
