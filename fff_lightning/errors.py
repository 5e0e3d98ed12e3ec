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
    (``model.fff: Option 'widht' is not accepted``); a value of the wrong type as its key's full path, the type
    expected and the value given (``model.fff.width: expected an int or a list of ints, got 'thirtytwo'``)."""
    import re

    typed = wrong_type(message)
    if typed:
        return typed
    lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip(" -")]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if key:
        lines = [key.group(2), *lines[1:]] if key.group(2) else lines[1:]
    reason = next((ln for ln in lines if not ln.startswith(_NOISE)), lines[0] if lines else message)
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason)
    return f"{key.group(1)}: {reason}" if key else reason


_EXPECTED = r"Expected an? (?P<type><class '[\w.]+'>|typing\.Literal\[.*\]|[\w.]+\[.*\])"
_TYPE_LINES = (r"Does not validate against any of the Union subtypes", r"Errors:", r"Subtypes: \[(?P<subtypes>.*)\]",
               rf"(- )?{_EXPECTED}(\. Got value: (?P<got>.*))?", r"Given value type: .*",
               r"Given value: (?P<given>.*)")  # fmt: skip


def wrong_type(message: str) -> str | None:
    """``<key.path>: expected <types>, got <value>`` when jsonargparse's error says only that a value has the wrong
    type (the innermost ``Parser key`` of a nested error holds nothing else), else None."""
    import re

    keys, inner, depth = [], [], -1
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip())
        key = re.match(r'\s*(?:- )?Parser key "([^"]+)":\s*(.*)$', line)
        if key and indent > depth:  # a key nested in the previous one's explanation
            keys.append(key.group(1))
            inner, depth = [key.group(2)] if key.group(2) else [], indent
        elif keys and indent > depth and line.strip():
            inner.append(line.strip())
        elif keys and line.strip() and inner:
            break  # the innermost key's explanation ended
    if not keys or not inner:
        return None
    found: dict[str, str] = {}
    expected = []
    for line in inner:
        m = next((m for m in (re.fullmatch(p, line) for p in _TYPE_LINES) if m), None)
        if m is None:
            return None  # something else is wrong too: said as jsonargparse says it
        found.update({k: v for k, v in m.groupdict().items() if v is not None and k != "type"})
        if m.groupdict().get("type"):
            expected.append(m.group("type"))
    given = found.get("given", found.get("got"))
    types = _split(found["subtypes"]) if "subtypes" in found else expected
    if given is None or not types:
        return None
    return f"{'.'.join(keys)}: expected {_alternatives(types)}, got {_value(given)}"


def _split(text: str) -> list[str]:
    """A comma-separated list of types, split where no bracket is open."""
    parts, level, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "[(":
            level += 1
        elif c in "])":
            level -= 1
        if c == "," and level == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()] if text.strip() else parts


_NOUNS = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string", "NoneType": "null",
          "list": "a list", "dict": "a mapping", "tuple": "a list"}  # fmt: skip


def _alternatives(types: list[str]) -> str:
    """``an int, a list of ints or null``; the values of Literal types together (``one of 16, 32, bf16-true``)."""
    import re

    words, literals = [], []
    for t in types:
        cls = re.fullmatch(r"<class '([\w.]+)'>|([\w.]+)", t)
        lit = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
        seq = re.fullmatch(r"(?:list|tuple|collections\.abc\.Sequence|typing\.List)\[(.*)\]", t)
        if lit:
            literals += [v.strip("'\"") for v in _split(lit.group(1)) if v.strip("'\"") not in literals]
            continue
        if cls:
            name = (cls.group(1) or cls.group(2)).rsplit(".", 1)[-1]
            word = _NOUNS.get(name, f"a {name}")
        elif seq:
            inner = _alternatives(_split(seq.group(1)))
            word = "a list of " + (inner.split(" ", 1)[1] + "s" if inner.startswith(("a ", "an ")) else inner)
        elif t.startswith(("dict[", "typing.Dict[")):
            word = "a mapping"
        else:
            word = t
        if word not in words:
            words.append(word)
    if literals:
        words.insert(0, f"one of {', '.join(literals)}")
    if "a number" in words and "an int" in words:  # an int is a number
        words.remove("an int")
    if "null" in words:  # last: "an int or null"
        words = [w for w in words if w != "null"] + ["null"]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _value(text: str) -> str:
    """A given value as YAML writes it: numbers, lists and mappings bare, other text quoted."""
    import re

    text = text.strip()
    spelled = {"True": "true", "False": "false", "None": "null"}.get(text)
    if spelled:
        return spelled
    if re.fullmatch(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?", text) or text[:1] in "[{":
        return text[:200]
    return repr(text[:200])


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
