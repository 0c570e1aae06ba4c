"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) around an ``AsyncLLMEngine``.

``server.app.create_app(engine, ServerSettings(...))`` builds the app; ``infinite-llm serve``
runs it. Nothing is imported here, so the CLI can read ``server.settings`` without torch.
"""
