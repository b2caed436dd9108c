"""Model providers. Each SDK is imported only by its own module, loaded when it is chosen."""

OPENAI_DEFAULT_MODEL = "gpt-4.1-mini"
ANTHROPIC_DEFAULT_MODEL = "claude-haiku-4-5"
