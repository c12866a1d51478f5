"""``python -m st_peft_cli``: the ``st-peft`` console script."""

import sys

from st_peft_cli.parser import main

sys.exit(main())
