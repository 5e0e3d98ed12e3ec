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
