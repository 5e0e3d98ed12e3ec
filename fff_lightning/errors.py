"""One exception type for every mistake a user can make in a config or on the command line."""


class ConfigError(ValueError):
    """A bad value in a run's configuration.

    The CLI prints it as ``error: <field>: <message>`` and exits with code 2, without a traceback.

    Args:
        field: dotted name of the offending field, as it is written in a YAML config (``fff.activation``).
        message: what is wrong and what is allowed.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # crosses process boundaries intact (tokenizing with num_proc workers)
        return (type(self), (self.field, self.message))


def config_error_in(e: BaseException) -> str | None:
    """The message of the first ConfigError in an exception's chain (jsonargparse wraps them), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return str(e)
        e = e.__cause__ or e.__context__
    return None


_NOISE = ("Does not validate against", "Problem with given class_path", "Given value", "Subtypes:", "Errors:",
          "Expected a <class 'NoneType'>")  # fmt: skip


def one_line(message: str) -> str:
    """jsonargparse's nested parse error as one line: the key, then the first line that says what is wrong
    (``model.fff: Option 'widht' is not accepted``)."""
    import re

    lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip(" -")]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if key:
        lines = [key.group(2), *lines[1:]] if key.group(2) else lines[1:]
    reason = next((ln for ln in lines if not ln.startswith(_NOISE)), lines[0] if lines else message)
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason)
    return f"{key.group(1)}: {reason}" if key else reason


class Diverged(RuntimeError):
    """The training loss or a gradient is not finite: the run stops there, and nothing after it is saved."""

    exit_code = 3


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. During training a checkpoint was saved at a step boundary and the message says how to
    resume; before training nothing was made (``release``: the run's unused folder goes).

    A ``BaseException``, as ``KeyboardInterrupt`` is: code that catches ``Exception`` (a cache read, a retry) must
    not swallow it."""

    def __init__(self, message: str, signum: int, release: bool = False):
        """``signum`` 0: a process other than the first of several, which stops quietly with status 0."""
        super().__init__(message)
        self.exit_code = 128 + signum if signum else 0  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.release = release
