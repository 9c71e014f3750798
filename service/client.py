"""The Python client, kept importable as `service.client`: it lives in its own distribution now,
samplebay-client (clients/python, import name `samplebay_client`), which the server's install brings along."""

from samplebay_client import *  # noqa: F403
from samplebay_client import __all__  # noqa: F401
