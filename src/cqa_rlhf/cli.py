"""``cqa-rlhf``: one console script for every stage and tool of the pipeline.

    cqa-rlhf sft --params params.yaml         # a stage, outside DVC (dvc.yaml runs the same code)
    cqa-rlhf reward --kind classification
    cqa-rlhf answer --model models/ppo "How do I merge a git branch?"
    cqa-rlhf presets presets/gpt-neo-125m-1gpu.yaml

``cqa-rlhf <command> --help`` shows a command's flags. ``python -m cqa_rlhf.stages.<stage>``,
``python -m cqa_rlhf.answer`` and ``python -m cqa_rlhf.presets`` are the same commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module with main(argv), one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("cqa_rlhf.stages.synth", "stage: write the embedded synthetic site as a Posts.xml dump"),
    "data": ("cqa_rlhf.stages.data", "stage: raw dump or JSON -> prepared Parquet tables"),
    "tokenizer": ("cqa_rlhf.stages.tokenizer", "stage: the pretrained tokenizer, or a BPE trained on the data"),
    "sft": ("cqa_rlhf.stages.sft", "stage: supervised fine-tuning of the policy"),
    "reward": ("cqa_rlhf.stages.reward", "stage: a reward model (--kind regression|classification)"),
    "ppo": ("cqa_rlhf.stages.ppo", "stage: PPO of the SFT policy against a reward model"),
    "dpo": ("cqa_rlhf.stages.dpo", "stage: DPO (IPO, conservative DPO) of the SFT policy on preference pairs"),
    "grpo": ("cqa_rlhf.stages.grpo", "stage: GRPO (Dr. GRPO, RLOO) of the SFT policy against a reward model"),
    "online_dpo": ("cqa_rlhf.stages.online_dpo", "stage: online DPO: pairs from the policy's own answers, labelled by a reward model"),
    "bon": ("cqa_rlhf.stages.bon", "stage: Best-of-N by a reward model (and by gold: the oracle) as a policy"),
    "overopt": ("cqa_rlhf.stages.overopt", "stage: over-optimisation curves (gold and proxy against sqrt KL)"),
    "gguf": ("cqa_rlhf.stages.gguf", "stage: convert a GGUF checkpoint into a save_pretrained folder (--name NAME)"),
    "base": ("cqa_rlhf.stages.base", "stage: export the untrained base policy"),
    "evaluate": ("cqa_rlhf.stages.evaluate", "stage: answer and score the test questions (--policy NAME)"),
    "compare": ("cqa_rlhf.stages.compare", "stage: the leaderboard: every policy against the baseline"),
    "fetch": ("cqa_rlhf.fetch", "save a datasets source (hf://owner/name, parquet/JSON-lines) as a local folder"),
    "answer": ("cqa_rlhf.answer", "answer a question with an exported policy"),
    "presets": ("cqa_rlhf.presets", "check a preset and print it as `dvc exp run -S` flags"),
}


def parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    ap = argparse.ArgumentParser(prog="cqa-rlhf", description=__doc__, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=sorted(COMMANDS), metavar="command", help="one of the commands below")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments (see cqa-rlhf COMMAND --help)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    module, _ = COMMANDS[args.command]
    sys.argv[0] = f"cqa-rlhf {args.command}"  # the command's own --help and errors name it so
    importlib.import_module(module).main(args.args)


if __name__ == "__main__":
    main()
