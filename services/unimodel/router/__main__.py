import sys

from unimodel.core.lifecycle import run_service
from unimodel.router.service import RouterService
from unimodel.router.settings import RouterSettings


def main(argv: list[str] | None = None) -> int:
    return run_service(RouterService, RouterSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
