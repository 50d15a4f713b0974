"""Stage `data`: raw dump (Stack Exchange or JSON layout) -> prepared Parquet tables and
`metrics/data.json` (params: data)."""

from __future__ import annotations

import os
import time

# Before pyarrow loads (see cqa_rlhf.data.prepare.ARROW_POOL_ENV).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from cqa_rlhf.config import DataConfig, load_section  # noqa: E402
from cqa_rlhf.data.prepare import prepare  # noqa: E402
from cqa_rlhf.errors import cli  # noqa: E402
from cqa_rlhf.io import write_json_atomic  # noqa: E402
from cqa_rlhf.stages.common import stage_args  # noqa: E402


@cli
def main() -> None:
    args = stage_args(__doc__)
    cfg = load_section(args.params, "data", DataConfig)
    start = time.perf_counter()
    result = prepare(cfg)
    write_json_atomic(cfg.metrics, result.metrics)
    counts = ", ".join(f"{s} {result.metrics[s]['questions']}" for s in ("train", "val", "test"))
    print(f"data: {cfg.source} -> {result.out} (questions: {counts}) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
