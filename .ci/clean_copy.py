"""Copy a checkout's files as a fresh clone would have them: what git tracks plus the files it does not ignore
(uncommitted work included; build output, caches and egg-info left behind).

    python .ci/clean_copy.py SOURCE DESTINATION
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def clean_copy(src: Path, dst: Path) -> None:
    listed = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (src / name).is_file():  # tracked but deleted in the work tree: left out, as a commit would
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


if __name__ == "__main__":
    clean_copy(Path(sys.argv[1]), Path(sys.argv[2]))
