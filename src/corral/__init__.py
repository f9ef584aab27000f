"""corral: a supervised fleet of single-threaded web API workers behind one port."""

__version__ = "0.1.0"
