"""Where answers come from: OpenAI (or any compatible server), or the offline demo."""

from __future__ import annotations

from chat_api.config import Settings
from chat_api.providers.base import Completion, Provider, UpstreamStream
from chat_api.providers.demo import DemoProvider
from chat_api.providers.openai_http import OpenAIHTTPProvider

__all__ = ["Completion", "Provider", "UpstreamStream", "build_provider"]


def build_provider(settings: Settings) -> Provider | None:
    """The provider the settings ask for, or None when there is no key and no demo."""
    if settings.demo:
        return DemoProvider(settings)
    if settings.openai_api_key is None:
        return None
    if settings.upstream_client == "sdk":
        from chat_api.providers.openai_sdk import OpenAISDKProvider  # the SDK loads only if chosen

        return OpenAISDKProvider(settings)
    return OpenAIHTTPProvider(settings)
