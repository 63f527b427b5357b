"""`unimodel <command>`: run one service, or the whole local cluster (`up`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "up": "unimodel.local.cluster",
    "gateway": "unimodel.gateway.__main__",
    "router": "unimodel.router.__main__",
    "batcher": "unimodel.batcher.__main__",
    "cache": "unimodel.cache.__main__",
    "embedding-worker": "unimodel.embedder.__main__",
    "gpu-worker": "unimodel.worker.__main__",
    "models": "unimodel.models.__main__",
    "status": "unimodel.status.__main__",
    "healthcheck": "unimodel.status.healthcheck",
    "etcd-auth": "unimodel.local.etcd_auth",
    "credentials": "unimodel.local.credentials",
}
ALIASES = {"embedder": "embedding-worker", "worker": "gpu-worker"}

USAGE = """usage: unimodel <command> [options]

commands:
  up                 start the local cluster (nats-server, etcd, all services)
  gateway            public REST + gRPC API            (python -m unimodel.gateway)
  router             picks a worker for each batch     (python -m unimodel.router)
  batcher            per-model batching queues         (python -m unimodel.batcher)
  cache              semantic cache                    (python -m unimodel.cache)
  embedding-worker   text embeddings                   (python -m unimodel.embedder)
  gpu-worker         hosts models on engines           (python -m unimodel.worker)
  models             prepare | list the model repository  (python -m unimodel.models)
  status             services, workers, models and queues as etcd and the services see them [--json]
  healthcheck        exit 0 when the service in this container is ready (gRPC health; a container HEALTHCHECK)
  etcd-auth          turn etcd authentication on for UniModel (root + the services' user), or rotate
  credentials DIR    random NATS/etcd passwords and the nats-server config with per-service permissions

`unimodel <command> --help` lists a command's options; every option has a UNIMODEL_* env var."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = ALIASES.get(args[0], args[0])
    if command not in COMMANDS:
        print(f"unimodel: error: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
