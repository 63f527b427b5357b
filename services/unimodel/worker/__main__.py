import sys

from unimodel.core.lifecycle import run_service
from unimodel.worker.service import WorkerService
from unimodel.worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    return run_service(WorkerService, WorkerSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
