import os
import sys

# Triton kernels run on the CPU through the interpreter; it must be set before any
# kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
