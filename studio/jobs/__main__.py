"""`python -m studio.jobs WORKSPACE`: the supervisor that runs queued training jobs."""
import sys

from studio.jobs import main

sys.exit(main())
