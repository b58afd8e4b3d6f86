"""samwatch: Segment Anything for watched folders."""

__version__ = "0.1.0"
