import sys

from benchmarks.reproduce.runner import main

sys.exit(main())
