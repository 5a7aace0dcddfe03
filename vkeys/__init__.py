"""vkeys: the admin command line for virtual keys. A gRPC client only: it imports the
generated `keys.v1` protos and nothing of the server (`extauthz`)."""

from vkeys.commands import main

__all__ = ["main"]
