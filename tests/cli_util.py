"""Running the real `modelcypher` command line and snapshotting directories for the tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import yaml


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelcypher", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snapshot(*dirs: Path) -> dict[str, str]:
    out = {}
    for d in dirs:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out
