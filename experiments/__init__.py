"""Accuracy experiments, apart from the throughput benchmarks: the semi-supervised chain on the demo
data (``semisup.sh`` + ``semisup_report.py``, ``make semisup``). Their results files are in
``experiments/results/``, with the check of the released-model conversion against the official TF code."""
