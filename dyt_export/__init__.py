"""dyt-export: ship Dynamic Tuning ViTs with their token dispatch kept data-dependent."""
__version__ = "0.1.0"
