"""Compare rebuilt proxy rewards with the shipped ones (``make proxies``).

    python scripts/compare_proxies.py runs/proxies

For each proxy folder under the argument: whether its weights are byte-identical to the shipped
weights (the build is deterministic on CPU for a given thread count), its build time, and its
held-out strict agreement with gold beside the shipped card's. Exits 1 when a rebuild differs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from stagerl.proxies.proxy import META, PROXY_KINDS, WEIGHTS, shipped_proxy_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(root: str) -> int:
    differs = 0
    for name in PROXY_KINDS:
        built, shipped = Path(root) / name, shipped_proxy_dir(name)
        if not (built / WEIGHTS).is_file():
            print(f"{name}: not built under {root}")
            continue
        same = _digest(built / WEIGHTS) == _digest(shipped / WEIGHTS)
        differs += not same
        mine, theirs = (json.loads((d / META).read_text()) for d in (built, shipped))
        agree = [f"{where} {mine['agreement'][where]['strict_agreement']:.3f} (shipped "
                 f"{theirs['agreement'][where]['strict_agreement']:.3f})"
                 for where in mine["agreement"]]
        print(f"{name}: weights {'identical to' if same else 'DIFFER from'} the shipped ones; "
              f"built in {mine['seconds']['total']:.0f} s; strict agreement {', '.join(agree)}")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/proxies"))
