"""``python -m cqa_rlhf.presets <preset.yaml> [--params params.yaml]``: a preset as DVC flags.

A preset (``presets/*.yaml``) is a partial ``params.yaml``: the keys it sets replace those of the
params file. The command checks that every key exists in the params file (DVC refuses unknown
``-S`` keys) and that the merged params pass every section's typed config, then prints the
preset as ``-S key=value`` flags, so a preset runs as an experiment:

    dvc exp run $(python -m cqa_rlhf.presets presets/gpt-neo-125m-1gpu.yaml)

Entries of ``gguf`` (checkpoints to convert) are new keys by nature; a ``pkg:<package>/<file>``
there becomes the file's absolute path, the dependency DVC hashes.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import yaml

from cqa_rlhf.config import (
    OPEN_SECTIONS,
    SECTIONS,
    TOP_LEVEL,
    GGUFConfig,
    ParamsLoader,
    parse_section,
    read_params,
    seeded,
)
from cqa_rlhf.errors import ConfigError, cli


def read_preset(path: str | Path) -> dict:
    path = Path(path)
    try:
        preset = yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read preset: {str(exc).splitlines()[0]}") from None
    if not isinstance(preset, dict) or not preset:
        raise ConfigError(f"{path}: a preset is a non-empty mapping of params sections")
    return preset


def leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every non-mapping value."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, dotted + ".")
        else:
            yield dotted, value


def merge(params: dict, preset: dict, where: str) -> tuple[dict, set[str]]:
    """``params`` with the preset's values, and the preset keys that ``params`` lacks (their
    section must exist; the typed configs then decide whether the key is valid)."""
    merged, added = copy.deepcopy(params), set()
    for dotted, value in leaves(preset):
        node = merged
        *parents, last = dotted.split(".")
        for i, key in enumerate(parents):
            if parents[0] in OPEN_SECTIONS and isinstance(node, dict) and i > 0:
                node.setdefault(key, {})
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {dotted}: no section {'.'.join(parents[: i + 1])} in params")
        if last not in node:
            added.add(dotted)
        node[last] = value
    return merged, added


def resolve_gguf(preset: dict, where: str) -> dict:
    """The preset with every ``gguf`` entry checked and its ``pkg:`` file made a path."""
    from cqa_rlhf.io import resolve_resource

    entries = preset.get("gguf") or {}
    for name, entry in entries.items():
        cfg = parse_section({f"gguf.{name}": entry}, f"gguf.{name}", GGUFConfig, where)
        entry["file"] = str(resolve_resource(cfg.file).resolve())
    return preset


def flag(dotted: str, value: object, where: str, added: bool = False) -> str:
    """``-S key=value`` in DVC's (Hydra's) override syntax: JSON scalars and lists; ``+key``
    for a key the params file does not have yet (DVC refuses it otherwise)."""
    text = "null" if value is None else value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if any(c.isspace() for c in str(text)):
        raise ConfigError(f"{where}: {dotted}: a value with spaces cannot be passed as a -S flag")
    return f"-S {'+' if added else ''}{dotted}={text}"


def preset_flags(preset_path: str | Path, params_path: str | Path) -> list[str]:
    """The preset as ``-S`` flags, after checking it against the params file and the configs."""
    preset = resolve_gguf(read_preset(preset_path), str(preset_path))
    params = read_params(params_path)
    merged, added = merge(params, preset, str(preset_path))
    where = f"{params_path} + {preset_path}"
    checked = seeded(merged, where)
    for name in preset:
        if name not in SECTIONS and name not in TOP_LEVEL and name not in OPEN_SECTIONS:
            raise ConfigError(f"{preset_path}: {name}: not a params section")
        if name in SECTIONS:
            parse_section(checked, name, SECTIONS[name], where)
    return [flag(k, v, str(preset_path), k in added) for k, v in leaves(preset)]


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    print(" ".join(preset_flags(args.preset, args.params)))


if __name__ == "__main__":
    main()
