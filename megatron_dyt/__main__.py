import sys

from megatron_dyt.cli import main

sys.exit(main())
