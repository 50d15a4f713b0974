"""cqa-rlhf: a reproducible, data-versioned RLHF pipeline for community question answering."""

__version__ = "0.1.0"
