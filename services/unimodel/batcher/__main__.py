import sys

from unimodel.batcher.service import BatcherService
from unimodel.batcher.settings import BatcherSettings
from unimodel.core.lifecycle import run_service


def main(argv: list[str] | None = None) -> int:
    return run_service(BatcherService, BatcherSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
