"""An OpenAI-compatible HTTP server: a front with the router inside, worker processes, Redis events."""
