"""quantkit: GPTQ and bitsandbytes artifacts from BF16 checkpoints, and what they cost."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, **kwargs):
    """Load any checkpoint quantkit understands (BF16, GPTQ, bitsandbytes) as a torch model.

    See `quantkit.loading.load` for the keyword arguments.
    """
    from quantkit.loading import load as _load

    return _load(path, **kwargs)
