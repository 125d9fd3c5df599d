"""fastclr: SimCLRv2 in PyTorch. Importing this package imports nothing heavy (no DALI, no FFCV)."""
__version__ = "0.1.0"
