"""trainerd: a fault-tolerant, long-running LoRA fine-tuning daemon."""


def package_version() -> str:
    """The installed distribution's version (``trainerd --version``, the metrics' build info);
    ``unknown`` when run from a checkout that was never installed."""
    try:
        from importlib.metadata import version

        return version("trainerd")
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return "unknown"
