"""Stage `synth`: write the embedded default site as a Stack Exchange dump (params: synth)."""

from __future__ import annotations

from cqa_rlhf.config import SynthConfig, load_section
from cqa_rlhf.data.synthetic import write_dump
from cqa_rlhf.errors import cli
from cqa_rlhf.stages.common import stage_args


@cli
def main() -> None:
    args = stage_args(__doc__)
    cfg = load_section(args.params, "synth", SynthConfig)
    path = write_dump(cfg)
    print(f"synth: wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
