"""perfsim: a hardware-aware performance simulator and profiler for small language models."""

__version__ = "0.1.0"
