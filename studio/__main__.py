"""`python -m studio` is the `lora-studio` command."""
import sys

from studio.cli import main

sys.exit(main())
