"""``verify``: check a converted EfficientDet (entry point ``verify = verify.cli:main``).

Subcommands live in their own modules and are registered here.
"""

from __future__ import annotations

import click

from verify.cli_utils import CONTEXT_SETTINGS, package_version
from verify.coco_cli import coco
from verify.parity_cli import parity


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_version(), "--version", prog_name="verify")
def main() -> None:
    """Verify a PyTorch EfficientDet converted from a google/automl checkpoint."""


main.add_command(coco)
main.add_command(parity)


if __name__ == "__main__":
    main()
