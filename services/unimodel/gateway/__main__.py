import sys

from unimodel.core.lifecycle import run_service
from unimodel.gateway.service import GatewayService
from unimodel.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    return run_service(GatewayService, GatewaySettings, argv)


if __name__ == "__main__":
    sys.exit(main())
