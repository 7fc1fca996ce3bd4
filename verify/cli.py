"""``verify``: check a converted EfficientDet (entry point ``verify = verify.cli:main``).

Subcommands live in their own modules and are registered here.
"""

from __future__ import annotations

import click

from converter.interrupts import sigterm_as_interrupt
from verify.cli_utils import CONTEXT_SETTINGS, EXIT_INTERRUPTED, fail, package_version
from verify.coco_cli import coco
from verify.parity_cli import parity


class _InterruptibleGroup(click.Group):
    """Ctrl-C and SIGTERM end any subcommand with one line and exit code 130 (clean-ups run)."""

    def invoke(self, ctx: click.Context):
        with sigterm_as_interrupt():
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt:
                fail("interrupted", EXIT_INTERRUPTED)


@click.group(cls=_InterruptibleGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_version(), "--version", prog_name="verify")
def main() -> None:
    """Verify a PyTorch EfficientDet converted from a google/automl checkpoint."""


main.add_command(coco)
main.add_command(parity)


if __name__ == "__main__":
    main()
