"""fastclr's benchmarks: ``throughput.py`` (where the time goes, per stage, with peers measured in the
same run), ``merge_results.py`` and the GPU-machine scripts (``gpu/``). See benchmarks/README.md, "How the code is laid out".

Importing the package is cheap: each module imports torch and the rest itself.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
