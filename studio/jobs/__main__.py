"""`python -m studio.jobs WORKSPACE`: the supervisor that runs queued training jobs."""
import sys

from studio.jobs.queue import main

sys.exit(main())
