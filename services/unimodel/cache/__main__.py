import sys

from unimodel.cache.service import CacheService
from unimodel.cache.settings import CacheSettings
from unimodel.core.lifecycle import run_service


def main(argv: list[str] | None = None) -> int:
    return run_service(CacheService, CacheSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
