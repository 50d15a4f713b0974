"""Stage `data`: raw dump (Stack Exchange or JSON layout) -> prepared Parquet tables and
`metrics/data.json` (params: data)."""

from __future__ import annotations

import os
import time

# Before pyarrow loads (see cqa_rlhf.data.prepare.ARROW_POOL_ENV).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from cqa_rlhf.config import DataConfig  # noqa: E402
from cqa_rlhf.data.prepare import prepare  # noqa: E402
from cqa_rlhf.errors import cli  # noqa: E402
from cqa_rlhf.io import write_json_atomic  # noqa: E402
from cqa_rlhf.stages.common import Params, stage_args  # noqa: E402


def run(cfg: DataConfig) -> dict:
    """Prepare the tables under ``cfg.out`` and write ``cfg.metrics``; returns the metrics."""
    start = time.perf_counter()
    result = prepare(cfg)
    write_json_atomic(cfg.metrics, result.metrics)
    counts = ", ".join(f"{s} {result.metrics[s]['questions']}" for s in ("train", "val", "test"))
    print(f"data: {cfg.source} -> {result.out} (questions: {counts}) in {time.perf_counter() - start:.1f}s")
    return result.metrics


@cli
def main(argv: list[str] | None = None) -> None:
    run(Params.read(stage_args(__doc__, argv).params).section("data", DataConfig))


if __name__ == "__main__":
    main()
