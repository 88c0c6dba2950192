"""Set-up of the conformance suite (tests/conformance).

Triton decides when a kernel is decorated whether it is compiled or interpreted, so without a GPU
TRITON_INTERPRET=1 is set here, before anything imports the Triton kernels
(poissonflow.kernels.triton
imports them lazily, on first use). The suite's helpers live one directory up (tests/).
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
