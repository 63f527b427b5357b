"""`unimodel models prepare|list` (also `python -m unimodel.models`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unimodel.core import errors
from unimodel.models.prepare import CATALOG, ENV_REPOSITORY, default_repository, listing, prepare

PROG = "unimodel models"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Build and inspect the demo / test model repository.")
    sub = parser.add_subparsers(dest="action", metavar="{prepare,list}", required=True)
    repo_help = f"model repository folder (env {ENV_REPOSITORY}; default .unimodel/models)"
    p = sub.add_parser("prepare", help="export the models into the repository (skips prepared ones)")
    p.add_argument("--repository", type=Path, default=None, help=repo_help)
    p.add_argument("--only", default="", help=f"comma separated model names (default: all of {', '.join(CATALOG)})")
    p.add_argument("--force", action="store_true", help="rebuild models that are already prepared")
    ls = sub.add_parser("list", help="list the models, their tensors and whether they are prepared")
    ls.add_argument("--repository", type=Path, default=None, help=repo_help)
    return parser


def _out(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repository = (args.repository or default_repository()).resolve()
    if args.action == "list":
        rows = listing(repository)
        width = max(len(r.name) for r in rows)
        print(f"repository: {repository}")
        for r in rows:
            state = "prepared" if r.prepared else "not prepared"
            print(f"{r.name:<{width}}  {r.engine:<5}  {state:<12}  in: {r.inputs}  out: {r.outputs}")
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        prepare(repository, only or None, force=args.force, out=_out)
    except errors.InvalidArgument as exc:
        print(f"{PROG} prepare: error: {exc}", file=sys.stderr)
        return 2
    except errors.UnimodelError as exc:
        print(f"{PROG} prepare: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} prepare: interrupted; unfinished models are rebuilt by the next run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
