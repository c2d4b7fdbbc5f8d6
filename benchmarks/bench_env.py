"""What every benchmark records about where it ran (imported by the benchmark scripts)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess


def cpu_model() -> str:
    """``lscpu``'s model name, else the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
