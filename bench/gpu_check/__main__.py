"""``python -m gpu_check`` (from ``bench/``): the GPU check's command line."""

import sys

from . import main

sys.exit(main())
