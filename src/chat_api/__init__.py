"""chat-api: a fast, secure gateway to OpenAI chat models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chat-api")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
