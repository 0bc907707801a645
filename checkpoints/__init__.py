"""The registry of known published checkpoints (``registry.toml``); converted files land in this folder."""

from pathlib import Path

REGISTRY_PATH = Path(__file__).with_name("registry.toml")
