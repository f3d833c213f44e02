"""Directors by name, as ``avatar serve --director NAME`` selects them."""

from __future__ import annotations

from collections.abc import Callable

from engines.director.base import Director, StaticDirector

DIRECTORS = ("embedded", "llm", "static")


def director_factory(name: str, *, llm_url: str | None = None, llm_model: str = "local",
                     llm_key: str | None = None, llm_timeout_s: float = 8.0,
                     llm_rounds: int = 2) -> Callable[[], Director]:
    """A factory making one director per session; ``ValueError`` for bad settings."""
    if name == "static":
        return StaticDirector
    if name == "embedded":
        from engines.director.embedded import EmbeddedDirector

        return EmbeddedDirector
    if name == "llm":
        from engines.director.llm import LLMConfig, LLMDirector

        if not llm_url:
            raise ValueError("--director llm needs --llm-url (an OpenAI-compatible base URL, "
                             "e.g. http://127.0.0.1:8000/v1)")
        config = LLMConfig(base_url=llm_url, model=llm_model, api_key=llm_key,
                           timeout_s=llm_timeout_s, request_timeout_s=llm_timeout_s,
                           max_rounds=llm_rounds)
        return lambda: LLMDirector(config)
    raise ValueError(f"unknown director {name!r}; choose one of {', '.join(DIRECTORS)}")
