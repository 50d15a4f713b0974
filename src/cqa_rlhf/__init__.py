"""cqa-rlhf: a reproducible, data-versioned RLHF pipeline for community question answering."""

import os

# transformers' own bars ("Loading weights", "Writing model shards") for every load and export
# would bury the stage's progress bar and summary line; it reads this when first imported.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
