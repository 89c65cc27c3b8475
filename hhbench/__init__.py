"""hhbench: cost, speed and quality of head-level and layer-wise hybrid attention."""

__version__ = "0.1.0"
