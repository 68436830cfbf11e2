"""The numbered errors of the reference, as one table used by the SDK and the manager.

Class tree::

    InfinibrainException                      (.code, .message)
    ├── InvalidArgumentException              100 101 200 201 203 205 206 207 301 302
    ├── SocketConnectionException             110
    ├── ConnectionFailedException             111
    ├── ClusterDisconnectedException          112  (keepalive, reaches manage_callback only)
    ├── ClusterConnectedException             113  (keepalive, reaches manage_callback only)
    ├── InferenceUnsubscribeException         114  (reaches manage_callback only)
    ├── InferenceNameNotFoundException        300 400
    ├── InvalidOperationException             303
    ├── CoprocessorNotFoundException          304
    ├── SendQueueFullException                305
    ├── SendQueueTimeoutException             306
    ├── ContainerNotFoundException            307
    ├── PermissionException                   308
    ├── APIConflictException                  309
    ├── ContainerReceiveTimeoutException      401
    ├── ContainerDisconnectException          402
    ├── InvalidInferenceNameException         403
    ├── RequestDeletedException               404  (ours: delete_queue removed the request)
    ├── SSHConnectionException                500
    ├── NotImplementedException               900
    └── UnknownException                      999  (no code in the reference; ours)

``message`` is the reference's text, verbatim (its ``{}`` filled in); ``detail`` says
what was wrong in this case (the argument, the board, the container's last log lines);
``str(exc)`` shows both. A code travels on the wire as an int with its message and
detail; ``error_from_code`` turns it back into the right class on the other side, so a
code raised and a code passed to a callback are always the same number.

The reference's own names work too: the short names of its chapter 8
(``InvalidArgument``, ``SendQueueFull``, ...) and the spellings printed in its chapters 4.3
and 4.4 (``CoprocesorNotFoundExpection``, ...) are the same classes. ``NotImplemented``
(the short name of NotImplementedException) is importable by name but left out of ``*``
imports, so that it never shadows Python's own ``NotImplemented`` unasked.

Pure data: any thread.
"""
from __future__ import annotations

from typing import Any


class InfinibrainException(Exception):
    """Base of every exception the SDK raises. ``code`` is the reference's number."""

    code: int = 999

    def __init__(self, message: str = "", code: int | None = None, detail: str = "") -> None:
        if code is not None:
            self.code = code
        self.message = message or MESSAGES.get(self.code, "")
        self.detail = detail
        super().__init__(self.message)

    @property
    def text(self) -> str:
        """The message and its detail: what ``str`` shows, without the code."""
        return f"{self.message}: {self.detail}" if self.detail else self.message

    def __str__(self) -> str:
        return f"[{self.code}] {self.text}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.code, self.detail))


class InvalidArgumentException(InfinibrainException):
    code = 100


class SocketConnectionException(InfinibrainException):
    code = 110


class ConnectionFailedException(InfinibrainException):
    code = 111


class ClusterDisconnectedException(InfinibrainException):
    code = 112


class ClusterConnectedException(InfinibrainException):
    code = 113


class InferenceUnsubscribeException(InfinibrainException):
    code = 114


class InferenceNameNotFoundException(InfinibrainException):
    code = 300


class InvalidOperationException(InfinibrainException):
    code = 303


class CoprocessorNotFoundException(InfinibrainException):
    code = 304


class SendQueueFullException(InfinibrainException):
    """305. ``retry_after``: seconds to wait before sending again, from how fast the
    inference's queue drains (None when the manager did not say)."""

    code = 305
    retry_after: float | None = None


class SendQueueTimeoutException(InfinibrainException):
    code = 306


class ContainerNotFoundException(InfinibrainException):
    code = 307


class PermissionException(InfinibrainException):
    code = 308


class APIConflictException(InfinibrainException):
    code = 309


class ContainerReceiveTimeoutException(InfinibrainException):
    code = 401


class ContainerDisconnectException(InfinibrainException):
    code = 402


class InvalidInferenceNameException(InfinibrainException):
    code = 403


class RequestDeletedException(InfinibrainException):
    code = 404


class SSHConnectionException(InfinibrainException):
    code = 500


class NotImplementedException(InfinibrainException):
    code = 900


class UnknownException(InfinibrainException):
    code = 999


# code -> (class, message as printed in the reference, typos included)
ERROR_TABLE: dict[int, tuple[type[InfinibrainException], str]] = {
    100: (InvalidArgumentException, "argument {} is required"),
    101: (InvalidArgumentException, "invalid key : {}"),
    110: (SocketConnectionException, "socket connection establishment failed"),
    111: (ConnectionFailedException, "socket connection disconnected"),
    112: (ClusterDisconnectedException, "socket connection disconnected"),
    113: (ClusterConnectedException, "socket connection connected"),
    114: (InferenceUnsubscribeException, "Inference {} became unsubscribe state"),
    200: (InvalidArgumentException, "Not conform to JSON Format"),
    201: (InvalidArgumentException, "No Required Key"),
    203: (InvalidArgumentException, "Tag version has changed from {} into {}"),
    205: (InvalidArgumentException, "Inference config file not found"),
    206: (InvalidArgumentException, "Inference config file JSON format error"),
    207: (InvalidArgumentException, "Inference config file mismatch"),
    300: (InferenceNameNotFoundException, "Specified InferenceName dose not exist"),
    301: (InvalidArgumentException, "Can not open configure file"),
    302: (InvalidArgumentException, "Specified Param Error"),
    303: (InvalidOperationException, "There are still processes in use"),
    304: (CoprocessorNotFoundException, "Specified CoprocessorName dose not exist"),
    305: (SendQueueFullException, "Send Wait Queue Full"),
    306: (SendQueueTimeoutException, "Send Wait Queue TimeOut"),
    307: (ContainerNotFoundException, "Specified Container dose not exist"),
    308: (PermissionException, "Can not delete queue (permission error)"),
    309: (APIConflictException, "{} is used by other process. Please retry a little later."),
    400: (InferenceNameNotFoundException, "Unregistered InferenceName"),
    401: (ContainerReceiveTimeoutException, "Response TimeOut Error"),
    402: (ContainerDisconnectException, "Response Disconnect Error"),
    403: (InvalidInferenceNameException, "{} does not accept data."),
    404: (RequestDeletedException, "Request deleted from the send wait queue"),
    500: (SSHConnectionException, "SSH error"),
    900: (NotImplementedException, "not support this command"),
    999: (UnknownException, "unknown error"),
}

MESSAGES: dict[int, str] = {code: text for code, (_, text) in ERROR_TABLE.items()}

# What an operator can do about each code (the `infinibrain` command prints it).
HINTS: dict[int, str] = {
    100: "check the argument the message names",
    101: "file_info keys are script, model, file and To",
    110: "is the manager running? start it with `infinibrain-manager`, check --host/--port, and CURVE keys if it uses CURVE",
    111: "the manager was lost; it reconnects by itself: try again in a moment",
    114: "the container went away; see `infinibrain logs NAME`",
    200: "the configuration must be a JSON object / TOML table",
    201: "add the key the message names",
    203: "set force_update = true to change image_tag",
    205: "the inference was never loaded here; deploy it first",
    206: "the inference config file in state_dir is damaged; deploy the inference again",
    207: "the inference config file does not match; deploy the inference again",
    300: "check the name with `infinibrain status`",
    301: "check the file's path and permissions on the main board",
    302: "fix the setting the message names (see `infinibrain logs NAME` if a container did not start)",
    303: "wait until its requests are done (`infinibrain queue NAME`), or delete them",
    304: "check the board's name with `infinibrain status`",
    305: "the send-wait queue is full: wait retry_after seconds (in the detail), or raise max_queue_size",
    306: "no container took the request in time: check `infinibrain status` (distribution on, containers connected)",
    307: "check the container's name with `infinibrain status`",
    308: "add --force to delete another process's requests",
    309: "another command is working on this inference: try again shortly",
    400: "check the inference name with `infinibrain status`",
    401: "the container did not answer in time: see `infinibrain logs NAME`, or raise wait_queue_timeout",
    402: "the container went away while serving it: see `infinibrain logs NAME`; retries= sends such requests elsewhere",
    403: "this inference takes no requests (input = None)",
    404: "delete_queue removed it before it was sent; send it again if it is still wanted",
    500: "check the board: is it on, is sshd running, are its key and known_hosts right?",
    900: "this command is not supported",
    999: "see the manager's log for the cause",
}


def exit_status(code: int) -> int:
    """The command-line exit status of numbered error ``code`` (one byte): the hundreds
    digit and the last digit, 110-114 as 12-16, 999 as 99; e.g. 305 -> 35, 500 -> 50."""
    if code == 999:
        return 99
    rest = code % 100
    return code // 100 * 10 + (rest if rest < 10 else rest % 10 + 2)

# Message of the Connector's receive timeout, which shares 401 with the host side.
RECEIVE_TIMEOUT_MESSAGE = "receive timeout"


def format_message(code: int, *fields: Any, detail: str = "") -> str:
    """The reference's message for ``code`` with its ``{}`` fields filled, plus a detail.

    The detail names what is wrong (the argument, the key, the board) after the verbatim
    text, so that the reference's wording stays searchable.
    """
    text = MESSAGES.get(code, MESSAGES[999])
    if "{}" in text:
        fields = fields or ("",) * text.count("{}")
        text = text.format(*fields)
    return f"{text}: {detail}" if detail else text


def make_error(code: int, *fields: Any, detail: str = "") -> InfinibrainException:
    """Build the exception for ``code``: the reference's message (``fields`` filled in) and a detail."""
    return error_from_code(code, format_message(code, *fields), detail)


def error_from_code(code: int, message: str, detail: str = "") -> InfinibrainException:
    """Turn a (code, message, detail) received from the wire back into its exception."""
    cls = ERROR_TABLE.get(code, (UnknownException, ""))[0]
    return cls(message, code, detail)


def argument_error(name: str, why: str = "") -> InvalidArgumentException:
    """100 naming the argument (and why it is refused)."""
    return make_error(100, name, detail=why)  # type: ignore[return-value]


# The reference's other names for the same classes.
SHORT_NAMES: dict[str, type[InfinibrainException]] = {
    "InvalidArgument": InvalidArgumentException,
    "SocketConnection": SocketConnectionException,
    "ConnectionFailed": ConnectionFailedException,
    "InferenceUnsubscribe": InferenceUnsubscribeException,
    "InferenceNameNotFound": InferenceNameNotFoundException,
    "InvalidOperation": InvalidOperationException,
    "CoprocessorNotFound": CoprocessorNotFoundException,
    "SendQueueFull": SendQueueFullException,
    "SendQueueTimeout": SendQueueTimeoutException,
    "ContainerNotFound": ContainerNotFoundException,
    "Permission": PermissionException,
    "APIConflict": APIConflictException,
    "ContainerReceiveTimeout": ContainerReceiveTimeoutException,
    "ContainerDisconnect": ContainerDisconnectException,
    "InvalidInferenceName": InvalidInferenceNameException,
    "SSHConnection": SSHConnectionException,
    "Unknown": UnknownException,
    # as printed in chapters 4.3 and 4.4
    "CoprocesorNotFoundExpection": CoprocessorNotFoundException,
    "ContainerNotFoundExpection": ContainerNotFoundException,
    "SSHConnectionExpection": SSHConnectionException,
    "UnknownExpection": UnknownException,
}
globals().update(SHORT_NAMES)
NotImplemented = NotImplementedException  # noqa: A001 - the reference's name; never in __all__

EXCEPTIONS = [name for name, value in list(globals().items())
              if isinstance(value, type) and issubclass(value, InfinibrainException) and name != "NotImplemented"]

# What ``from infinibrain.errors import *`` gives: the exception classes (by every name
# but NotImplemented), not the table and helpers (import those by name).
__all__ = EXCEPTIONS
