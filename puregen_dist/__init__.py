"""puregen-dist: PureGen train-time poison defense as a Ray-distributed sweep platform."""

__version__ = "0.1.0"
