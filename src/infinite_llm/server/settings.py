"""``ServerSettings``: the server's own knobs (the engine's are in ``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_WAITING_REQUESTS = 1024
DEFAULT_MAX_BODY_BYTES = 16 << 20  # a 128k-token prompt as JSON token ids is about 1 MB


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...]  # the first is the one answers carry
    api_key: str | None = None  # required as a bearer token on /v1/* when set
    max_waiting_requests: int | None = DEFAULT_MAX_WAITING_REQUESTS  # None: no limit
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Render chat requests with a chat_template they bring (a Jinja template from the client;
    # off by default, as in vLLM).
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(
                f"max_waiting_requests must be at least 1, got {self.max_waiting_requests}"
            )
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
