#!/usr/bin/env python3
"""Render, create, follow or delete the Kubernetes PyTorchJob: see gpt2/launch/k8s.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gpt2.launch.k8s import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
