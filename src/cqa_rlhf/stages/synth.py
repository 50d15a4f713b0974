"""Stage `synth`: write the embedded default site as a Stack Exchange dump (params: synth)."""

from __future__ import annotations

from cqa_rlhf.config import SynthConfig
from cqa_rlhf.data.synthetic import write_dump
from cqa_rlhf.errors import cli
from cqa_rlhf.stages.common import Params, stage_args


def run(cfg: SynthConfig) -> dict:
    """Write the synthetic site's dump under ``cfg.out``; returns its size."""
    path = write_dump(cfg)
    size = path.stat().st_size
    print(f"synth: wrote {path} ({size} bytes)")
    return {"bytes": size}


@cli
def main(argv: list[str] | None = None) -> None:
    run(Params.read(stage_args(__doc__, argv).params).section("synth", SynthConfig))


if __name__ == "__main__":
    main()
