"""cqa-rlhf: a reproducible, data-versioned RLHF pipeline for community question answering."""

import os

# transformers' own bars ("Loading weights", "Writing model shards") for every load and export
# would bury the stage's progress bar and summary line; it reads this when first imported.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Before anything imports torch: the CPU code paths every stage computes with (numerics.py).
from cqa_rlhf.numerics import pin_environment  # noqa: E402

pin_environment()

__version__ = "0.1.0"
