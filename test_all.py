"""InfiniteContext tests. Run: pytest test_all.py

Every test holds our code to an independent reference: float64 math, a peer library
(transformers, tiktoken), a closed form, or a real process / server on loopback.
Sections follow the pipeline; each starts with a banner naming the issue it proves.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the CPU interpreter here
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


# ============================================================================ model (issue 2)


# ============================================================================ hf export (issue 3)


# ============================================================================ mla kernel (issue 4)


# ============================================================================ needle (issue 5)


# ============================================================================ train (issue 6)


# ============================================================================ dpo (issue 7)


# ============================================================================ judge (issue 8)


# ============================================================================ serve (issue 9)


# ============================================================================ infra (issue 10)
