"""``cqa-rlhf fetch SOURCE OUT``: save a ``datasets`` source (``hf://owner/name`` from the Hub, or
parquet/JSON-lines/CSV files) as a ``save_to_disk`` folder, once, where there is network. DVC
cannot track a Hub id; the folder it can (``dvc add OUT``), and ``data.source: OUT`` reads it
offline from then on."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from cqa_rlhf.config import HFSourceConfig
from cqa_rlhf.data.hf_source import load_splits
from cqa_rlhf.errors import cli
from cqa_rlhf.io import replace_dir, staging_dir


def fetch(source: str, out: Path, revision: str | None = None) -> dict[str, int]:
    """Save ``source`` under ``out`` (whole or not at all); split name -> rows."""
    import datasets

    with tempfile.TemporaryDirectory(prefix=".hf-cache-", dir=out.parent) as cache:
        splits = load_splits(source, HFSourceConfig(revision=revision), Path(cache))
        tmp = staging_dir(out)
        try:
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    replace_dir(tmp, out)
    return {name: ds.num_rows for name, ds in splits.items()}


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="hf://owner/name, or a parquet/JSON-lines/CSV file or folder")
    ap.add_argument("out", type=Path, help="the save_to_disk folder to write")
    ap.add_argument("--revision", help="a Hub source's branch, tag or commit")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = fetch(args.source, args.out, args.revision)
    print(f"fetch: {args.source} -> {args.out} ({', '.join(f'{k} {v} rows' for k, v in sorted(rows.items()))})")


if __name__ == "__main__":
    main()
