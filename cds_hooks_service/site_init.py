"""`cds-hooks-service init DIR`: copy the shipped rules and cards out for a site to edit.

DIR/rules and DIR/cards get the rules, value sets, terminology and card templates this version ships
(the same layout as the source repository). The service uses them once ``CDS_RULES_DIR=DIR/rules`` is set
(the cards are found beside it, in DIR/cards). Existing folders are never overwritten.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .config import shipped_dir

_IGNORE = shutil.ignore_patterns("__pycache__", "__init__.py", "*.pyc")


def init_site(dest: Path) -> tuple[Path, Path]:
    """Copy the shipped rules and cards to dest/rules and dest/cards; FileExistsError if either exists."""
    dest = Path(dest).resolve()
    targets = {name: dest / name for name in ("rules", "cards")}
    for target in targets.values():
        if target.exists():
            raise FileExistsError(f"{target} already exists; nothing was copied (choose an empty directory)")
    dest.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        shutil.copytree(shipped_dir(name), target, ignore=_IGNORE)
    return targets["rules"], targets["cards"]


def cmd_init(args) -> int:
    try:
        rules, cards = init_site(args.dir)
    except (FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"copied the shipped rules to {rules} and card templates to {cards}")
    print("use them with:")
    print(f"  export CDS_RULES_DIR={rules}")
    print("  cds-hooks-service validate && cds-hooks-service test")
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="copy the shipped rules and cards to DIR for a site to edit")
    p.add_argument("dir", type=Path, help="target directory (DIR/rules and DIR/cards must not exist)")
    p.set_defaults(func=cmd_init)
