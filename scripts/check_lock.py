"""Fail when the committed dvc.lock is stale: a stage's code, params or raw input changed since
the numbers in git were produced. Missing outputs (a fresh clone) are fine: `dvc repro` makes them.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Statuses of a dependency that mean the committed results are not this code's results.
STALE = {"modified", "new", "not in cache"}


def _dep_set_changes() -> list[str]:
    """Deps or outs added to or removed from dvc.yaml since the lock was written. `dvc status`
    misses a removed one (the stage still looks unchanged), so compare dvc.yaml with the lock."""
    import yaml
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    lock = yaml.safe_load(open("dvc.lock", encoding="utf-8"))["stages"]
    out = []
    with Repo(".") as repo:
        for stage in repo.index.stages:
            if stage.name not in lock:
                continue
            for kind, declared_items, key in (("dep", stage.deps, "deps"), ("out", stage.outs, "outs")):
                declared = {str(d.def_path) for d in declared_items if not isinstance(d, ParamsDependency)}
                locked = {d["path"] for d in lock[stage.name].get(key, [])}
                for path in sorted(declared ^ locked):
                    change = "added to" if path in declared else "removed from"
                    out.append(f"{stage.name}: {kind} {path} {change} dvc.yaml")
    return out


def main() -> int:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"check_lock: dvc status failed: {proc.stderr.strip()}", file=sys.stderr)
        return 2
    stale = []
    for stage, entries in json.loads(proc.stdout or "{}").items():
        for entry in entries:
            if not isinstance(entry, dict):
                if entry == "changed command":
                    stale.append(f"{stage}: changed command")
                continue
            for path, status in entry.get("changed deps", {}).items():
                if isinstance(status, dict):  # a params file: {param: new | modified | deleted}
                    stale.extend(f"{stage}: param {key} ({path}) {s}" for key, s in status.items())
                elif status in STALE:
                    stale.append(f"{stage}: {path} {status}")
            for key, status in entry.get("changed params", {}).items() if isinstance(entry.get("changed params"), dict) else []:
                stale.append(f"{stage}: param {key} {status}")
    stale.extend(_dep_set_changes())
    if stale:
        print("dvc.lock is stale (run `dvc repro` and commit dvc.lock and metrics/):", file=sys.stderr)
        for line in stale:
            print(f"  {line}", file=sys.stderr)
        return 1
    print("dvc.lock matches the committed code and params")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
