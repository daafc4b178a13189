#!/usr/bin/env python3
"""Submit training to SLURM through submitit: see gpt2/launch/slurm.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gpt2.launch.slurm import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
