import sys

from unimodel.core.lifecycle import run_service
from unimodel.embedder.service import EmbedderService
from unimodel.embedder.settings import EmbedderSettings


def main(argv: list[str] | None = None) -> int:
    return run_service(EmbedderService, EmbedderSettings, argv)


if __name__ == "__main__":
    sys.exit(main())
