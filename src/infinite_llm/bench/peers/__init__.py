"""Other engines run side by side with ours (vLLM), each in its own venv behind a subprocess."""
