"""One logging format for the CLI; library modules only call logging.getLogger."""

import logging


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    from quantkit.secrets import RedactFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
