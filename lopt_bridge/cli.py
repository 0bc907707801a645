"""Console entry points: ``lopt-convert`` and ``lopt-parity`` (their commands live in the packages)."""

from __future__ import annotations


def convert_main() -> None:
    """``lopt-convert``: convert published learned-optimizer checkpoints to safetensors."""
    from lopt_bridge.converter.commands import main

    main()


def parity_main() -> None:
    """``lopt-parity``: record, check and report parity against the JAX reference."""
    from lopt_bridge.parity_tests.commands import main

    main()


if __name__ == "__main__":
    convert_main()
