"""`unimodel status [--json]` (also `python -m unimodel.status`).

Exit status: 0 healthy; 1 something is wrong (the PROBLEMS section, or `problems` in the JSON); 2 etcd
could not be read or the options are wrong."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from unimodel.core.settings import CommonSettings, env_name
from unimodel.core.store import EtcdStore, StoreError
from unimodel.local.credentials import LocalCredentials
from unimodel.status.collect import collect
from unimodel.status.render import render_json, render_text
from unimodel.status.view import ClusterView

PROG = "unimodel status"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the cluster as etcd and the services see it: services, workers with their models "
        "(state, load), registered models and batcher queues. Exit 0 healthy, 1 problems found, 2 etcd unreadable.",
    )
    fields = CommonSettings.model_fields
    parser.add_argument("--etcd-endpoints", default=None,
                        help=f"{fields['etcd_endpoints'].description} (env {env_name('etcd_endpoints')}; "
                        f"default {fields['etcd_endpoints'].default})")
    parser.add_argument("--etcd-prefix", default=None,
                        help=f"{fields['etcd_prefix'].description} (env {env_name('etcd_prefix')}; "
                        f"default {fields['etcd_prefix'].default})")
    parser.add_argument(
        "--state-dir", default=None,
        help="a local cluster's state directory: with no etcd user set, its etcd credentials are used "
        "(default: env UNIMODEL_STATE_DIR, else .unimodel, as `unimodel up`)",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each service's answer (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


async def _status(settings: CommonSettings, timeout_s: float) -> ClusterView:
    store = EtcdStore(settings.etcd_endpoint_list, call_timeout_s=timeout_s, auth=settings.etcd_auth())
    try:
        return await collect(store, settings.etcd_prefix, settings.etcd_endpoints, timeout_s)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        print(f"{PROG}: error: --timeout must be > 0", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("etcd_endpoints", args.etcd_endpoints), ("etcd_prefix", args.etcd_prefix)) if v}
    if not os.environ.get(env_name("etcd_user")):
        # the local cluster's credentials (`unimodel up` made them), as its services get them
        local = LocalCredentials.find(Path(args.state_dir or os.environ.get("UNIMODEL_STATE_DIR") or ".unimodel"))
        if local is not None:
            auth = local.etcd_auth()
            overrides |= {"etcd_user": auth.user, "etcd_password_file": auth.password_file}
    try:
        settings = CommonSettings(**overrides)  # the rest (and unset ones) from UNIMODEL_* env, as the services
    except ValidationError as exc:
        print(f"{PROG}: error: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    try:
        view = asyncio.run(_status(settings, args.timeout))
    except StoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(render_json(view) if args.json else render_text(view, int(time.time() * 1000)))
    return 0 if view.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
