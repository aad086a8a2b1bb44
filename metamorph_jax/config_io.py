"""The one reader of JSON config files (Hugging Face config.json, diffusers configs,
scheduler_config.json, our model_config.json).

Models take plain dicts; whoever holds a path reads it here, so a missing file or bad
JSON is one error that names the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from metamorph_jax.input_errors import InputError


class ConfigFileError(InputError, ValueError):
    """A config file that is missing or not valid JSON (the message names the file)."""


def read_json(path: str | os.PathLike, filename: str = "config.json") -> dict:
    """The JSON object in `path`, or in `path/filename` when `path` is a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(source: str | os.PathLike | dict, filename: str = "config.json"
                ) -> tuple[dict, str]:
    """(config dict, a name for error messages) from a dict, a JSON file or its folder."""
    if isinstance(source, dict):
        return dict(source), "<config dict>"
    path = Path(source)
    return read_json(path, filename), str(path / filename if path.is_dir() else path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
