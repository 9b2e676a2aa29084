"""The exception hierarchy of Kiki Coordinator.

::

    CoordinatorError
    ├── ConfigError            a configuration value is wrong (names the key path)
    ├── TransportError         Redis refused or failed a command
    │   ├── ConnectionLost     Redis is unreachable (retried by long-running parts)
    │   └── GroupMissing       the stream or group vanished (FLUSHALL, restart); recreated
    ├── CodecError             an entry or payload cannot be decoded (poison message)
    ├── LeaseLost              another consumer took over the entry a handler is working on
    ├── BacklogFull            a send was refused because the target inbox is over its limit
    ├── RequestTimeout         no reply arrived before the request's deadline
    └── RemoteError            the handler of a request raised; carries its error type
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Root of every error raised by the coordinator."""


class ConfigError(CoordinatorError, ValueError):
    """A configuration value is missing or wrong; the message names the key path."""


class TransportError(CoordinatorError):
    """Redis answered a command with an error."""


class ConnectionLost(TransportError, ConnectionError):
    """Redis could not be reached or the connection dropped."""


class CodecError(CoordinatorError, ValueError):
    """Bytes that should hold an envelope or a payload could not be decoded."""


class LeaseLost(CoordinatorError):
    """This node no longer owns the entry: another replica took it over."""


class BacklogFull(CoordinatorError):
    """The target inbox holds more unhandled messages than its configured limit."""


class RequestTimeout(CoordinatorError, TimeoutError):
    """A request got no reply before its deadline."""


class RemoteError(CoordinatorError):
    """The remote handler of a request raised.

    :param error_type: the exception class name on the remote side
    :param message: the exception message on the remote side
    """

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


class GroupMissing(TransportError):
    """The stream or its consumer group does not exist (NOGROUP); recreate it and go on."""
