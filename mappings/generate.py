"""Regenerates ``mappings/<variant>.tsv`` from the rules; ``--check`` fails when out of date.

    python -m mappings.generate [--check]
"""
from __future__ import annotations

import sys

import click

from model.config import get_config
from model.registry import VARIANTS

from .table import mapping_table, table_path

HEADER = "# tf_name\tpt_name\tlayout\ttf_shape\tpt_shape\n"


def render(variant: str) -> str:
    return HEADER + "".join(e.to_tsv() + "\n" for e in mapping_table(get_config(variant)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--check", is_flag=True, help="Only compare; exit 1 if a table is out of date.")
def main(check: bool) -> None:
    """Write one table per released variant (90 classes) into mappings/."""
    stale = []
    for variant in VARIANTS:
        path = table_path(variant)
        text = render(variant)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text)
    if check and stale:
        click.echo(f"out of date: {', '.join(stale)}; run `make mappings`", err=True)
        sys.exit(1)
    click.echo(f"{len(VARIANTS) - len(stale)} up to date, "
               f"{len(stale)} {'stale' if check else 'written'}")


if __name__ == "__main__":
    main()
