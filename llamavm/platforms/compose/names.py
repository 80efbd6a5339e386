"""What every part of a Compose project agrees on: the project's name, its label, the user
llama-server runs as, and where a container sees the models and the API key."""

#: The compose project name (`-p`, and COMPOSE_PROJECT_NAME in the project's .env), the
#: container names' prefix.
PROJECT = "llamavm"
#: The label prefix of the project's containers: `<LABEL>.model` on every model's container.
LABEL = "io.llamavm"
#: The account llama-server runs as in the container.
UID = 10001
#: Where a container sees the models and the API key.
MODELS = "/models"
KEY_FILE = "/run/secrets/api_key"


def published(bind: str, port: int) -> str:
    """A port published on the bind address, as compose.yaml spells it (an IPv6 address in
    brackets)."""
    host = f"[{bind}]" if ":" in bind else bind
    return f"{host}:{port}:{port}"
