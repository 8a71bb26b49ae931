"""OpenMP's wait policy for every studio process, set when `studio` is imported: the CLI, the
worker and the UI all import studio first, before torch loads (it reads the policy once).

OpenMP threads that spin while waiting make torch up to 80x slower whenever another process
competes for the cores (a training job beside the UI: 40 s instead of 0.5 s per tiny image,
measured on 2 cores). Passive waiting costs nothing measurable when idle."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
